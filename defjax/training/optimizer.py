"""From ``config.optim`` to the per-worker transform and its schedule.

The local optimizer is the paper's (momentum SGD with weight decay); the
method's row in ``defjax.methods`` decides what wraps it: the dense
all-reduce (SGD), PSync, or error feedback at lam with RBGS. EF21 takes the
same lr schedule, momentum and weight decay as its own arguments.
"""

from __future__ import annotations

from typing import Callable

import optax

from defjax import compress
from defjax import feedback
from defjax import methods


def decay_steps(optim, *, steps_per_epoch: int, total_steps: int) -> list[int]:
  """The steps at which the 'step' schedule divides the lr by 10, in order.

  With ``optim.decay_whole_epochs``, decay f comes at the start of epoch
  int(f * E), as the authors' code does; step int(f * T) differs from that
  whenever f * E is not a whole number (E = 6: epochs 3 and 4, steps 3 and
  4.5 epochs in). Their rule was written for 200-epoch runs: in a run shorter
  than 1 / f epochs, epoch int(f * E) is 0 and the decay would come before
  the first step (400 steps of the quick start trained at lr / 100
  throughout), and for 2 <= E < 8/3 both decays would fall on epoch 1. So a
  decay keeps its whole epoch only where that epoch is after step 0 and
  after the previous decay's; elsewhere, and without decay_whole_epochs, it
  comes at step int(f * T). Decays that still land on one step (a run of a
  few steps) compound.
  """
  epochs = total_steps / steps_per_epoch
  steps, last_epoch = [], 0
  for f in sorted(optim.decay_at):
    epoch = int(f * epochs)
    if optim.decay_whole_epochs and epoch > last_epoch:
      steps.append(epoch * steps_per_epoch)
      last_epoch = epoch
    else:
      steps.append(int(f * total_steps))
  return steps


def learning_rate_schedule(
    optim, *, steps_per_epoch: int, total_steps: int
) -> optax.Schedule:
  """``optim.schedule`` ('step' or 'cosine') after ``optim.warmup_epochs``.

  Raises:
    ValueError: if the warm-up does not end before the run does, or before
      the first decay of the 'step' schedule (the decays due during the
      warm-up would all come at its end).
  """
  warmup = int(round(optim.warmup_epochs * steps_per_epoch))
  decays = (
      []
      if optim.schedule == 'cosine'
      else decay_steps(
          optim, steps_per_epoch=steps_per_epoch, total_steps=total_steps
      )
  )
  end = min([total_steps] + decays)
  if warmup and warmup >= end:
    raise ValueError(
        f'optim.warmup_epochs={optim.warmup_epochs:g} is {warmup} steps, not shorter than'
        f' the {end} steps before the {"end of the run" if end == total_steps else "first lr decay"}'
        f' ({total_steps} steps, {steps_per_epoch} per epoch): shorten the warm-up'
    )
  if optim.schedule == 'cosine':
    main = optax.cosine_decay_schedule(optim.lr, max(1, total_steps - warmup))
  else:
    boundaries = {}
    for at in decays:
      b = at - warmup
      boundaries[b] = boundaries.get(b, 1.0) * 0.1
    main = optax.piecewise_constant_schedule(optim.lr, boundaries)
  if warmup <= 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, optim.lr, warmup), main], [warmup]
  )


def local_optimizer(optim, schedule) -> optax.GradientTransformation:
  """The paper's local step: momentum SGD, weight decay added to the gradient."""
  return optax.chain(
      optax.add_decayed_weights(optim.weight_decay),
      optax.sgd(schedule, momentum=optim.momentum or None),
  )


# rbgs(ratio, *, key, per_leaf) -> Compressor: RBGS as a layout needs it
# (``Layout.rbgs`` with the params' specs bound).
RBGS = Callable[..., compress.Compressor]


def compressor(
    optim, *, seed: int, rbgs: RBGS = compress.rbgs
) -> compress.Compressor:
  """RBGS at ``optim.ratio`` with ``optim.per_leaf``, after the dense warm-up.

  ``seed`` seeds the shared block sequence unless ``optim.block_seed`` is set.
  ``rbgs`` builds the compressor: ``defjax.rbgs``, or a layout's
  (``Layout.rbgs``: per-shard blocks on the sharded layout).
  """
  block_seed = seed if optim.block_seed is None else optim.block_seed
  c = rbgs(optim.ratio, key=block_seed, per_leaf=optim.per_leaf)
  if optim.dense_warmup_steps > 0:
    c = compress.dense_warmup(c, optim.dense_warmup_steps)
  return c


def build(
    optim, *, schedule, axis_name, seed: int = 0, rbgs: RBGS = compress.rbgs
):
  """The per-worker transform of ``optim.method`` and its compressor (None
  for the dense all-reduce)."""
  method = methods.get(optim.method)
  inner = local_optimizer(optim, schedule)
  if not method.compresses:
    return feedback.data_parallel(inner, axis_name=axis_name), None
  c = compressor(optim, seed=seed, rbgs=rbgs)
  if method.transform == 'psync':
    return feedback.psync(inner, c, axis_name=axis_name), c
  if method.transform == 'ef21':
    momentum = methods.resolved_momentum(method.name, optim.momentum)
    return (
        feedback.ef21(
            schedule,
            c,
            momentum=momentum,
            weight_decay=optim.weight_decay,
            axis_name=axis_name,
        ),
        c,
    )
  lam = method.resolved_lam(optim.lam)
  return feedback.error_feedback(inner, c, lam=lam, axis_name=axis_name), c
