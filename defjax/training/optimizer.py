"""From ``config.optim`` to the per-worker transform and its schedule.

The local optimizer is the paper's (momentum SGD with weight decay); the
method's row in ``defjax.methods`` decides what wraps it: the dense
all-reduce (SGD), PSync, or error feedback at lam with RBGS.
"""

from __future__ import annotations

from typing import Callable

import optax

from defjax import compress
from defjax import feedback
from defjax import methods


def learning_rate_schedule(optim, *, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """``optim.schedule`` ('step' or 'cosine') after ``optim.warmup_epochs``."""
  warmup = int(round(optim.warmup_epochs * steps_per_epoch))
  if optim.schedule == 'cosine':
    main = optax.cosine_decay_schedule(optim.lr, max(1, total_steps - warmup))
  else:
    boundaries = {}
    epochs = total_steps / steps_per_epoch
    for f in optim.decay_at:  # decays that land on one step (short runs) compound
      # The authors decay at the start of epoch int(f * E); step int(f * T)
      # differs from that whenever f * E is not a whole number (E = 6: 3, 4.5).
      at = (int(f * epochs) * steps_per_epoch if optim.decay_whole_epochs
            else int(f * total_steps))
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


def compressor(optim, *, seed: int, rbgs: RBGS = compress.rbgs) -> compress.Compressor:
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


def build(optim, *, schedule, axis_name, seed: int = 0, rbgs: RBGS = compress.rbgs):
  """The per-worker transform of ``optim.method`` and its compressor (None
  for the dense all-reduce)."""
  method = methods.get(optim.method)
  inner = local_optimizer(optim, schedule)
  if not method.compresses:
    return feedback.data_parallel(inner, axis_name=axis_name), None
  c = compressor(optim, seed=seed, rbgs=rbgs)
  if method.name == 'psync':
    return feedback.psync(inner, c, axis_name=axis_name), c
  lam = method.resolved_lam(optim.lam)
  return feedback.error_feedback(inner, c, lam=lam, axis_name=axis_name), c
