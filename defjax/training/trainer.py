"""The training loop: ``train_and_evaluate(config, workdir)``.

Data flows one way: the config is checked (``config_checks``); the layout
of the workers (``defjax.layouts``), the input pipeline (``data``), the model
and its loss (``task``) and the per-worker transform (``optimizer``,
``methods``) are built; the layout makes the step and the output model; the
loop dispatches steps and, between dispatches, fetches the losses,
evaluates, writes ``metrics.jsonl`` (``runfiles``), saves and resumes
checkpoints (``checkpoint``) and obeys signals (``hooks``).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import signal
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from defjax import layouts
from defjax import methods
from defjax import xla_cpu
from defjax.training import checkpoint as ckpt
from defjax.training import data as data_lib
from defjax.training import models as models_lib
from defjax.training import optimizer
from defjax.training import runfiles
from defjax.training import task
from defjax.training.config_checks import ConfigError
from defjax.training.config_checks import validate
from defjax.training.hooks import Progress
from defjax.training.hooks import SignalFlag

# Steps per dispatch when config.steps_per_dispatch is 0, by platform. On CPU
# the quick start's step is compute-bound and a rolled loop of it runs
# several times slower per step (bench/dispatch.py; docs/benchmarks.md), so
# 1; no other platform has been measured yet, so 1 there too.
AUTO_STEPS_PER_DISPATCH = {'cpu': 1}


class Diverged(Exception):
  """The loss or the parameters became non-finite at ``step``."""

  status = 'diverged'  # in run.json (runfiles.Invocation)

  def __init__(self, step: int, summary: dict):
    super().__init__(f'diverged at step {step}: non-finite loss or parameters')
    self.step = step
    self.summary = summary


class Interrupted(Exception):
  """SIGTERM/SIGINT: a checkpoint was saved at ``step``; rerun to resume."""

  status = 'interrupted'

  def __init__(self, step: int, signum: int):
    super().__init__(
        f'received {signal.Signals(signum).name}: saved a checkpoint at step'
        f' {step}; rerun the same command to resume'
    )
    self.step = step


def steps_per_dispatch(config) -> int:
  """Steps run per compiled call: the config's, or the platform's measured best."""
  if config.steps_per_dispatch:
    return config.steps_per_dispatch
  return AUTO_STEPS_PER_DISPATCH.get(jax.devices()[0].platform, 1)


def params_sha256(params) -> str:
  """SHA-256 over the parameters' bytes in tree order (a fingerprint)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    h.update(np.ascontiguousarray(layouts.host_value(leaf)).tobytes())
  return h.hexdigest()


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, log=print
) -> dict:
  """Trains ``config`` with checkpoints and metrics in ``workdir``.

  Returns:
    The summary written to ``workdir/summary.json``.

  Raises:
    ConfigError: bad config or data path (before any compute).
    Diverged: non-finite loss or parameters (summary written first).
    Interrupted: SIGTERM/SIGINT (checkpoint saved first).
    checkpoint.CheckpointMismatch: the workdir holds another run's checkpoint.
  """
  validate(config)
  o, K = config.optim, config.num_workers
  layout = layouts.for_config(config)
  info, train, test = _open_data(config, layout)
  _check_writable(workdir)
  steps_per_epoch = train.steps_per_epoch
  total_steps = runfiles.total_steps(
      config.num_train_steps, config.num_epochs, steps_per_epoch
  )
  eval_every = config.eval_every_steps or steps_per_epoch
  run, state = build(
      config,
      layout,
      info,
      train.image_shape,
      steps_per_epoch=steps_per_epoch,
      total_steps=total_steps,
  )
  spd = steps_per_dispatch(config)
  # n > 1: a lax.scan program; its bits are the same for every n > 1 (also
  # for the shorter calls before an evaluation) but differ from the plain
  # one-step program's in float rounding on convolutional models.
  step_fn = layout.train_step(
      task.make_loss_fn(run.model, info, config),
      run.tx,
      run.specs,
      sync_model_state=config.sync_batch_stats,
      multi_step=spd > 1,
  )
  accuracy = task.make_evaluator(
      run.model, info, test, layout, config.eval_batch_size
  )
  traffic = _Traffic(
      config,
      state['params'],
      state['batch_stats'],
      run.compressor,
      layout,
      run.specs,
  )

  mngr = ckpt.manager(
      os.path.join(workdir, 'checkpoints'), max_to_keep=config.max_to_keep
  )
  resumed = ckpt.resume(mngr, config, state, per_worker=run.per_worker, log=log)
  del state  # a resumed run's fresh state: no second copy through the loop
  params, batch_stats, opt_state = (
      resumed.state['params'],
      resumed.state['batch_stats'],
      resumed.state['opt_state'],
  )
  start_step = step = resumed.step
  loss = _RunningLoss(
      resumed.meta.get('loss_sum', 0.0), resumed.meta.get('loss_count', 0)
  )
  batches = data_lib.GlobalBatches(
      train, layout, step, resumed.meta.get('data_state'), stacked=spd > 1
  )
  if jax.process_index() == 0:
    runfiles.truncate_metrics(workdir, step)
  log(
      f'{config.model}: d = {traffic.d:,} parameters, {o.method} ratio {o.ratio:g}'
      f' (block {traffic.payload:,} values), K = {K} workers on {layout.num_devices}'
      f' {jax.devices()[0].platform} device(s), {steps_per_epoch} steps/epoch,'
      f' {total_steps} steps, {traffic.bytes_per_step:,} bytes/worker/step'
  )

  summary_base = {
      'config': config.to_dict(),
      'steps_per_epoch': steps_per_epoch,
      'num_params': traffic.d,
      'bytes_per_step': traffic.bytes_per_step,
      **resumed.reshard_info,
  }
  t0 = time.time() - resumed.meta.get('wall_time', 0.0)
  clock = _TrainClock(resumed.meta.get('train_time', 0.0))

  def diverge(at):
    summary = dict(
        summary_base,
        status='diverged',
        diverged_at_step=at,
        steps=at,
        wall_time=time.time() - t0,
        bytes_sent=traffic.bytes_sent(at),
        final_test_accuracy=None,
        final_train_loss=None,
    )
    runfiles.write_summary(workdir, summary)
    raise Diverged(at, summary)

  # Dispatch the next steps before reading the last ones' losses, except on
  # the CPU backend: there all devices share the host's cores, and a run that
  # queues work ahead only makes device threads wait longer at collectives.
  lookahead = jax.devices()[0].platform != 'cpu'
  every = config.checkpoint_every_steps
  last_record: dict[str, Any] = {}
  with (
      runfiles.Invocation(
          workdir, start_step, total_steps, enabled=jax.process_index() == 0
      ),
      SignalFlag() as flag,
      Progress(total_steps, start_step) as bar,
      batches,
  ):
    while step < total_steps:
      stops = [total_steps, (step // eval_every + 1) * eval_every]
      stops += [(step // every + 1) * every] if every else []
      n = min(spd, min(stops) - step)
      clock.start()
      params, batch_stats, opt_state, losses = step_fn(
          params, batch_stats, opt_state, batches.next(n)
      )
      loss.settle(diverge)  # the previous dispatch's, while this one runs
      loss.pending = (step, losses)
      step += n
      is_eval = step % eval_every == 0 or step == total_steps
      is_ckpt = bool(every) and step % every == 0
      if not lookahead or is_eval or is_ckpt or flag.signum is not None:
        loss.settle(diverge)
      clock.stop()
      bar.update(n, loss.mean)
      if is_eval:
        if not _all_finite(params):
          diverge(step)
        # One multi-device program at a time (xla_cpu.run_alone).
        out = xla_cpu.run_alone(run.output(params, opt_state))
        stats = xla_cpu.run_alone(eval_stats(config, batch_stats))
        acc_x = accuracy(params, stats)
        acc = accuracy(out, stats) if out is not params else acc_x
        last_record = {
            'step': step,
            'epoch': step / steps_per_epoch,
            'train_loss': loss.mean,
            'test_accuracy': acc,
            'test_accuracy_x': acc_x,
            'lr': float(run.schedule(step - 1)),
            'wall_time': time.time() - t0,
            'train_time': clock.total,
            'bytes_sent': traffic.bytes_sent(step),
        }
        loss.reset()
        if jax.process_index() == 0:
          runfiles.append_metrics(workdir, last_record)
        bar.write(
            f'step {step}/{total_steps} epoch {last_record["epoch"]:.2f}: train loss'
            f' {last_record["train_loss"]:.4f}, test accuracy {100 * acc:.2f}%'
            + ('' if out is params else f' (x: {100 * acc_x:.2f}%)')
            + f', lr {last_record["lr"]:.4g}, {last_record["wall_time"]:.0f}s'
        )
      if is_ckpt or step == total_steps or flag.signum is not None:
        if (
            step not in mngr.all_steps()
        ):  # e.g. a signal right after a periodic save
          if not (_all_finite(params) and _all_finite(opt_state)):
            diverge(
                step
            )  # never write a non-finite state over a good checkpoint
          ckpt.save(
              mngr,
              step,
              {
                  'params': params,
                  'batch_stats': batch_stats,
                  'opt_state': opt_state,
              },
              {
                  'step': step,
                  'loss_sum': loss.sum,
                  'loss_count': loss.count,
                  'wall_time': time.time() - t0,
                  'train_time': clock.total,
                  'data_state': batches.state(),
                  'fingerprint': ckpt.fingerprint(config),
              },
          )
      if flag.signum is not None and step < total_steps:
        raise Interrupted(step, flag.signum)

  if (
      start_step >= total_steps
  ):  # resumed a finished run: its last record stands
    last_record = runfiles.last_metrics(workdir)
  summary = dict(
      summary_base,
      status='completed',
      steps=total_steps,
      final_test_accuracy=last_record.get('test_accuracy'),
      final_test_accuracy_x=last_record.get('test_accuracy_x'),
      final_train_loss=last_record.get('train_loss'),
      wall_time=time.time() - t0,
      train_time=clock.total,
      bytes_sent=traffic.bytes_sent(total_steps),
      params_sha256=params_sha256(run.output(params, opt_state)),
  )
  if jax.process_index() == 0:
    runfiles.write_summary(workdir, summary)
  return summary


# ------------------------------------------------------------------ pieces


class Run(NamedTuple):
  """A run's parts as its config makes them (``build``); its state is
  returned beside it, so that a run can drop the fresh one once resumed."""

  model: nn.Module
  specs: Any  # x's partition specs (the model axis; empty on 1-D layouts)
  schedule: optax.Schedule
  tx: optax.GradientTransformation  # the per-worker transform (optimizer.build)
  compressor: Any  # what a step sends; None for uncompressed SGD
  per_worker: tuple[str, ...]  # the state's entries led by the worker axis
  output: Callable  # (params, opt_state) -> the reported model (y or x)


def build(
    config, layout, info, image_shape, *, steps_per_epoch: int, total_steps: int
) -> tuple[Run, dict]:
  """``config``'s parts and its step-0 state (params, batch_stats,
  opt_state), placed on ``layout``.

  Raises:
    ConfigError: a warm-up that outlasts the run (known only once the data
      gives the steps per epoch).
  """
  o = config.optim
  try:
    schedule = optimizer.learning_rate_schedule(
        o, steps_per_epoch=steps_per_epoch, total_steps=total_steps
    )
  except ValueError as e:
    raise ConfigError(str(e)) from None
  model = models_lib.get_model(config.model, info.num_classes)
  params, batch_stats, specs = task.init_variables(
      model, config, image_shape, layout
  )
  tx, compressor = optimizer.build(
      o,
      schedule=schedule,
      axis_name=layout.axis_name,
      seed=config.seed,
      rbgs=functools.partial(layout.rbgs, param_specs=specs),
  )
  state = {
      'params': params,
      'batch_stats': batch_stats,
      'opt_state': layout.init_state(tx, params, specs),
  }
  per_worker = ('opt_state',) + (
      () if config.sync_batch_stats else ('batch_stats',)
  )
  # The reported model: y = x - mean_k e_k (DEF, PSync) or x.
  output = (
      layout.averaged_params(specs)
      if methods.get(o.method).averaged_output
      else lambda params, opt_state: params
  )
  return Run(model, specs, schedule, tx, compressor, per_worker, output), state


class Restored(NamedTuple):
  """A run's newest checkpoint and what it takes to evaluate it."""

  config: ml_collections.ConfigDict  # the run's, from its summary.json
  layout: layouts.Layout
  info: data_lib.DatasetInfo
  test: data_lib.EvalInput  # the test split
  run: Run
  state: dict  # the restored params, batch_stats and opt_state
  step: int  # the checkpoint's


def restore(
    workdir: str,
    *,
    defaults: ml_collections.ConfigDict | None = None,
    log=lambda *_: None,
) -> Restored:
  """The run in ``workdir``, rebuilt from its summary.json, at its newest
  checkpoint: a finished run's end, a diverged run's last good state.

  Checkpoints are not committed, so this works where the run ran, on as many
  devices as it had; it opens the test split, not the train input.

  Args:
    workdir: the run's folder (``summary.json`` and ``checkpoints/``).
    defaults: a full config the saved one is laid over, for summaries
      written before later config fields existed (``configs/default.py``'s
      ``get_config()``): a missing field then takes its value there, which
      is what the run ran with only if that default has not changed since.
    log: receives the checkpoint's step.

  Raises:
    FileNotFoundError: no summary.json or no checkpoint in ``workdir``, or
      the run's data is not on this machine.
    ValueError: the saved config names a dataset this version of defjax
      does not know.
    ConfigError: the saved config lacks a field of the run's identity
      (``runfiles.IDENTITY``) or one restore reads, and ``defaults`` does
      not supply it (every missing field is named).
    checkpoint.CheckpointMismatch: the checkpoint is of another config, or
      of another number of workers (a checkpoint is never resharded here).
  """
  summary = runfiles.read_summary(workdir)
  if summary is None:
    raise FileNotFoundError(f'no summary.json in {workdir} (unfinished run?)')
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'no checkpoints in {workdir}')
  config = ml_collections.ConfigDict(defaults or {})
  config.update(summary['config'])
  config.resume_reshard = False
  missing = [
      k
      for k in _RESTORE_READS
      if runfiles.config_value(config, k, _ABSENT) is _ABSENT
  ]
  if missing:
    where = (
        'defaults= does not have them either'
        if defaults is not None
        else "pass defaults=, a full config such as configs/default.py's"
        ' get_config(), to take them from it'
    )
    raise ConfigError(
        f'the config in {workdir}/summary.json lacks {", ".join(missing)}'
        f' (written before the fields existed?): {where}'
    )
  layout = layouts.for_config(config)
  info, test = _open_eval_data(config)
  steps_per_epoch = summary['steps_per_epoch']
  # The test split's image shape is the train input's: a run whose splits
  # differ in shape stops at its first evaluation and leaves no checkpoint.
  run, fresh = build(
      config,
      layout,
      info,
      test.image_shape,
      steps_per_epoch=steps_per_epoch,
      total_steps=runfiles.total_steps(
          config.num_train_steps, config.num_epochs, steps_per_epoch
      ),
  )
  mngr = ckpt.manager(directory, max_to_keep=config.max_to_keep)
  resumed = ckpt.resume(mngr, config, fresh, per_worker=run.per_worker, log=log)
  if resumed.step == 0:
    raise FileNotFoundError(f'no checkpoint in {directory}')
  return Restored(config, layout, info, test, run, resumed.state, resumed.step)


# What a saved config must hold for restore: the run's identity (which the
# checkpoint's fingerprint compares) and the fields restore itself reads.
_RESTORE_READS = runfiles.IDENTITY + (
    'data_dir',
    'image_size',
    'max_to_keep',
)
_ABSENT = object()


def _open_eval_data(config):
  """Dataset info and the test split."""
  data_dir = config.data_dir or None
  info = data_lib.info(config.dataset, data_dir)
  test = data_lib.eval_input(
      config.dataset, data_dir, image_size=config.image_size
  )
  return info, test


def _open_data(config, layout):
  """Dataset info, the train pipeline (this process's workers) and the test split."""
  try:
    info, test = _open_eval_data(config)
    train = data_lib.train_input(
        config.dataset,
        config.data_dir or None,
        num_workers=config.num_workers,
        batch_size=config.batch_size,
        seed=config.seed,
        worker_rows=layout.worker_rows(),
        image_size=config.image_size,
    )
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(str(e)) from None
  return info, train, test


def _check_writable(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    # One probe per process: hosts sharing a workdir must not remove each other's.
    probe = os.path.join(
        workdir, f'.write_test.{os.getpid()}.{jax.process_index()}'
    )
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ConfigError(
        f'cannot write to workdir {workdir!r}: {e.strerror}'
    ) from None


def eval_stats(config, batch_stats):
  """Batch-norm statistics to evaluate with: synced, or the workers' mean."""
  if config.sync_batch_stats:
    return batch_stats
  return _worker_mean(batch_stats)


@jax.jit
def _worker_mean(tree):
  # One program for all leaves: eager means, leaf by leaf, are independent
  # collective programs in flight together, which deadlocked XLA:CPU (the
  # abort of issue #12 in this very function; see defjax.xla_cpu).
  return jax.tree.map(lambda x: x.mean(0), tree)


def _all_finite(tree) -> bool:
  """Whether every value of ``tree`` is finite, reduced on the devices:
  copying every worker's state to the host would move K times the model."""
  return bool(layouts.host_value(_finite(tree)))


@jax.jit
def _finite(tree):
  # One program for the whole tree: leaf by leaf, each per-worker leaf's
  # reduction would be a separate collective program (defjax.xla_cpu).
  return jnp.all(
      jnp.stack(
          [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]
          or [jnp.bool_(True)]
      )
  )


class _Traffic:
  """Bytes one worker sends per step and in total (dense warm-up included),
  by the layout's formula (``Layout.bytes_per_step``)."""

  def __init__(self, config, params, batch_stats, compressor, layout, specs):
    self.d = optax.tree.size(params)
    synced = optax.tree.size(batch_stats) if config.sync_batch_stats else 0
    dense = layout.dense_payload(params, specs)
    self.payload = dense if compressor is None else compressor.payload(params)
    self.bytes_per_step = layout.bytes_per_step(self.payload, synced)
    self._dense = layout.bytes_per_step(dense, synced)
    self._warmup = (
        config.optim.dense_warmup_steps if compressor is not None else 0
    )

  def bytes_sent(self, step: int) -> int:
    warm = min(step, self._warmup)
    return warm * self._dense + (step - warm) * self.bytes_per_step


class _TrainClock:
  """Seconds spent in train steps, summed over resumes: evaluations,
  checkpoints and start-up are left out, and so is each invocation's first
  step, which compiles the step (what a time-to-accuracy curve plots)."""

  def __init__(self, total: float):
    self.total, self._started, self._first = total, None, True

  def start(self) -> None:
    self._started = time.time()

  def stop(self) -> None:
    if not self._first:
      self.total += time.time() - self._started
    self._first = False


class _RunningLoss:
  """The mean train loss since the last evaluation, read from the devices late.

  ``pending`` holds the last dispatch's (first step, losses) until
  ``settle`` reads them in step order (a non-finite one calls ``diverge``).
  """

  def __init__(self, total: float, count: int):
    self.sum, self.count, self.pending = total, count, None

  def settle(self, diverge) -> None:
    if self.pending is None:
      return
    first, losses = self.pending
    self.pending = None
    for i, value in enumerate(
        np.atleast_1d(layouts.host_value(losses)).tolist()
    ):
      if not math.isfinite(value):
        diverge(first + i + 1)
      self.sum, self.count = self.sum + value, self.count + 1

  @property
  def mean(self) -> float:
    return self.sum / max(self.count, 1)

  def reset(self) -> None:
    self.sum, self.count = 0.0, 0
