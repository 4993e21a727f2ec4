"""The training program: ``train_and_evaluate(config, workdir)``.

Data flows one way: config -> data, model, optimizer (defjax transforms) ->
the shard_map step of ``parallel`` -> evaluation, metrics, checkpoints.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import signal
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from defjax import checkpoint as ckpt
from defjax import compress as compress_lib
from defjax import data as data_lib
from defjax import feedback
from defjax import models as models_lib
from defjax import parallel

METHODS = ('sgd', 'ef', 'def', 'def_a', 'saef', 'psync')
SCHEDULES = ('step', 'cosine')

EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 4


class ConfigError(ValueError):
  """The config cannot run; the message says what to change."""


class Diverged(Exception):
  """The loss or the parameters became non-finite at ``step``."""

  def __init__(self, step: int, summary: dict):
    super().__init__(f'diverged at step {step}: non-finite loss or parameters')
    self.step = step
    self.summary = summary


class Interrupted(Exception):
  """SIGTERM/SIGINT: a checkpoint was saved at ``step``; rerun to resume."""

  def __init__(self, step: int, signum: int):
    super().__init__(
        f'received {signal.Signals(signum).name}: saved a checkpoint at step'
        f' {step}; rerun the same command to resume'
    )
    self.step = step


# ------------------------------------------------------------------ config


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the config before any compute; raises ConfigError (one line)."""
  o = config.optim
  if o.method not in METHODS:
    raise ConfigError(f'unknown optim.method {o.method!r}; choose one of {", ".join(METHODS)}')
  if config.model not in models_lib.MODELS:
    raise ConfigError(f'unknown model {config.model!r}; choose one of {", ".join(models_lib.MODELS)}')
  if config.dataset not in data_lib.DATASETS:
    raise ConfigError(
        f'unknown dataset {config.dataset!r}; choose one of {", ".join(data_lib.DATASETS)}')
  if o.schedule not in SCHEDULES:
    raise ConfigError(f'unknown optim.schedule {o.schedule!r}; choose one of {", ".join(SCHEDULES)}')
  try:
    compress_lib.check_ratio(o.ratio)
    feedback.check_lam(o.lam)
  except ValueError as e:
    raise ConfigError(f'optim.{e}') from None
  for node, key, minimum in ((config, 'num_workers', 1), (config, 'batch_size', 1),
                             (config, 'steps_per_dispatch', 0), (o, 'dense_warmup_steps', 0)):
    value = node[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      what = 'a positive integer' if minimum == 1 else f'an integer >= {minimum}'
      raise ConfigError(f'{"optim." if node is o else ""}{key} must be {what}, got {value!r}')
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ConfigError('set num_epochs > 0 or num_train_steps > 0')
  for key, bounds, ok in (('lr', '> 0', lambda v: v > 0),
                          ('momentum', 'in [0, 1)', lambda v: 0 <= v < 1),
                          ('weight_decay', '>= 0', lambda v: v >= 0),
                          ('warmup_epochs', '>= 0', lambda v: v >= 0)):
    what = f'a number {bounds}'
    try:
      value = compress_lib.as_real_scalar(o[key], key, what)
    except ValueError as e:
      raise ConfigError(f'optim.{e}') from None
    if not (math.isfinite(value) and ok(value)):
      raise ConfigError(f'optim.{key} must be {what}, got {o[key]!r}')
  if any(not 0 < f < 1 for f in o.decay_at):
    raise ConfigError(f'optim.decay_at must be fractions in (0, 1), got {tuple(o.decay_at)}')
  if config.dataset in data_lib.STREAMED and (config.crop_padding or config.flip):
    raise ConfigError(
        f'{config.dataset} is augmented on the host (random-resized crop and flip):'
        ' set crop_padding=0 and flip=False')
  try:
    parallel.make_layout(config.num_workers)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def resolved_lam(optim) -> float:
  """The lam a method runs with: EF 0, SAEF/PSync 1, DEF/DEF-A optim.lam."""
  return {'ef': 0.0, 'saef': 1.0, 'psync': 1.0}.get(optim.method, float(optim.lam))


def output_is_averaged(method: str) -> bool:
  """DEF outputs y = x - mean_k e_k and PSync mean_k x_k (the same formula);
  EF, DEF-A, SAEF and SGD output x."""
  return method in ('def', 'psync')


# Steps per dispatch when config.steps_per_dispatch is 0, by platform. On CPU
# (bench/dispatch.py, the README's Performance section) the quick start's step
# is compute-bound and a rolled loop of it runs ~6x slower per step, so 1; no
# other platform has been measured yet, so 1 there too.
AUTO_STEPS_PER_DISPATCH = {'cpu': 1}


def steps_per_dispatch(config) -> int:
  """Steps run per compiled call: the config's, or the platform's measured best."""
  if config.steps_per_dispatch:
    return config.steps_per_dispatch
  return AUTO_STEPS_PER_DISPATCH.get(jax.devices()[0].platform, 1)


# --------------------------------------------------------------- optimizer


def learning_rate_schedule(optim, *, steps_per_epoch: int, total_steps: int):
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


def build_optimizer(optim, *, schedule, axis_name, seed: int = 0):
  """The per-worker transform of ``optim.method`` and its compressor.

  ``seed`` seeds the shared block sequence unless ``optim.block_seed`` is set.
  """
  inner = optax.chain(
      optax.add_decayed_weights(optim.weight_decay),
      optax.sgd(schedule, momentum=optim.momentum or None),
  )
  if optim.method == 'sgd':
    return feedback.data_parallel(inner, axis_name=axis_name), None
  block_seed = optim.block_seed
  compressor = compress_lib.rbgs(
      optim.ratio, seed=seed if block_seed is None else block_seed, per_leaf=optim.per_leaf)
  if optim.dense_warmup_steps > 0:
    compressor = compress_lib.dense_warmup(compressor, optim.dense_warmup_steps)
  if optim.method == 'psync':
    return feedback.psync(inner, compressor, axis_name=axis_name), compressor
  lam = resolved_lam(optim)
  return feedback.error_feedback(inner, compressor, lam=lam, axis_name=axis_name), compressor


# -------------------------------------------------------------- utilities


def params_sha256(params) -> str:
  """SHA-256 over the parameters' bytes in tree order (a fingerprint)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    h.update(np.ascontiguousarray(_host(leaf)).tobytes())
  return h.hexdigest()


def _host(x) -> np.ndarray:
  """A replicated (or host) array as numpy, also on multi-process meshes."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def _all_finite(tree) -> bool:
  # Reduce on the devices: copying every worker's state to the host at each
  # checkpoint would move K times the model size.
  return all(bool(_host(jnp.isfinite(x).all())) for x in jax.tree.leaves(tree))


class _SignalFlag:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    for s in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[s] = signal.signal(s, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def __exit__(self, *exc):
    for s, h in self._previous.items():
      signal.signal(s, h)


# ------------------------------------------------------------------ model


def _make_loss_fn(model, info: data_lib.DatasetInfo, config):
  base_key = jax.random.PRNGKey(config.seed)
  mean = jnp.asarray(info.mean, jnp.float32)
  std = jnp.asarray(info.std, jnp.float32)
  augment = config.crop_padding > 0 or config.flip

  def loss_fn(params, batch_stats, batch):
    images, labels, ids = batch
    # (step, worker) ids make crops and dropout a function of the step: resumable.
    key = jax.random.fold_in(jax.random.fold_in(base_key, ids[0]), ids[1])
    if augment:
      images = data_lib.augment(images, key, pad=config.crop_padding, flip=config.flip)
    x = data_lib.standardize(images, mean, std)
    variables = {'params': params}
    if batch_stats:
      variables['batch_stats'] = batch_stats
    logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'],
                                  rngs={'dropout': jax.random.fold_in(key, 1)})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, updates.get('batch_stats', {})

  return loss_fn


def _make_eval_fn(model, info):
  mean = jnp.asarray(info.mean, jnp.float32)
  std = jnp.asarray(info.std, jnp.float32)

  @jax.jit
  def eval_fn(params, batch_stats, images, labels, valid):
    variables = {'params': params}
    if batch_stats:
      variables['batch_stats'] = batch_stats
    logits = model.apply(variables, data_lib.standardize(images, mean, std), train=False)
    correct = (jnp.argmax(logits, -1) == labels) & valid
    return correct.sum()

  return eval_fn


# -------------------------------------------------------------------- data


class _InMemory:
  """A decoded split behind the interface of ``data.Stream``."""

  def __init__(self, split: data_lib.Split):
    self.split = split
    self.image_shape = tuple(split.images.shape[1:])

  def __len__(self):
    return len(self.split)

  def batch(self, indices, rng_key=None):
    del rng_key  # augmentation happens on device
    return self.split.images[indices], self.split.labels[indices]


def _source(config, data_dir, split):
  if config.dataset in data_lib.STREAMED:
    stream = data_lib.stream(config.dataset, data_dir, split=split,
                             image_size=config.image_size)
    stream.image_shape = (config.image_size, config.image_size, 3)
    return stream
  return _InMemory(data_lib.load(config.dataset, data_dir, split=split))


# ------------------------------------------------------------------- train


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, log=print) -> dict:
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
  o = config.optim
  data_dir = config.data_dir or None
  try:
    info = data_lib.info(config.dataset, data_dir)
    train = _source(config, data_dir, 'train')
    test = _source(config, data_dir, 'test')
  except FileNotFoundError as e:
    raise ConfigError(str(e)) from None
  except ValueError as e:
    raise ConfigError(str(e)) from None
  try:
    os.makedirs(workdir, exist_ok=True)
    # One probe per process: hosts sharing a workdir must not remove each other's.
    probe = os.path.join(workdir, f'.write_test.{os.getpid()}.{jax.process_index()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f'cannot write to workdir {workdir!r}: {e.strerror}') from None

  layout = parallel.make_layout(config.num_workers)
  K = config.num_workers
  rows = layout.worker_rows()
  order = data_lib.WorkerBatches(
      len(train), num_workers=K, batch_size=config.batch_size, seed=config.seed,
      worker_slice=rows)
  steps_per_epoch = order.steps_per_epoch
  if steps_per_epoch < 1:
    raise ConfigError(
        f'the train set ({len(train)} examples) is smaller than one global batch'
        f' ({K} x {config.batch_size})')
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else int(config.num_epochs * steps_per_epoch))
  eval_every = config.eval_every_steps or steps_per_epoch

  model = models_lib.get_model(config.model, info.num_classes)
  dummy = jnp.zeros((1, *train.image_shape), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.PRNGKey(config.seed), dummy)
  params = jax.device_put(variables['params'], layout.replicated)
  batch_stats = variables.get('batch_stats', {})
  if not config.sync_batch_stats:
    batch_stats = jax.tree.map(lambda x: jnp.stack([x] * K), batch_stats)
  batch_stats = jax.device_put(
      batch_stats, layout.replicated if config.sync_batch_stats else layout.per_worker)

  schedule = learning_rate_schedule(o, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  tx, compressor = build_optimizer(o, schedule=schedule, axis_name=layout.axis_name,
                                   seed=config.seed)
  opt_state = parallel.init_worker_state(tx, params, layout)
  loss_fn = _make_loss_fn(model, info, config)
  spd = steps_per_dispatch(config)
  # n > 1: a lax.scan program; its bits are the same for every n > 1 (also
  # for the shorter calls before an evaluation) but differ from the plain
  # one-step program's in float rounding on convolutional models.
  step_fn = parallel.make_train_step(
      loss_fn, tx, layout, sync_model_state=config.sync_batch_stats, multi_step=spd > 1)
  averaged = parallel.make_averaged_params(layout)
  eval_fn = _make_eval_fn(model, info)

  d = parallel.num_params(params)
  n_stats = parallel.num_params(batch_stats) // (1 if config.sync_batch_stats else K)
  payload = d if compressor is None else compressor.payload(params)
  # Per worker per step: the gradient block, synced BN statistics, the loss.
  bytes_per_step = 4 * (payload + (n_stats if config.sync_batch_stats else 0) + 1)
  dense_bytes = 4 * (d + (n_stats if config.sync_batch_stats else 0) + 1)
  def bytes_sent(step):
    warm = min(step, o.dense_warmup_steps) if compressor is not None else 0
    return warm * dense_bytes + (step - warm) * bytes_per_step

  # ---- resume
  mngr = ckpt.manager(os.path.join(workdir, 'checkpoints'), max_to_keep=config.max_to_keep)
  start_step, loss_sum, loss_count, elapsed0 = 0, 0.0, 0, 0.0
  found = ckpt.latest_meta(mngr)
  reshard_info = {}
  state = {'params': params, 'batch_stats': batch_stats, 'opt_state': opt_state}
  if found is not None:
    saved_step, meta = found
    saved_k = meta['fingerprint'].get('num_workers')
    if config.resume_reshard and saved_k != K:
      ckpt.compare(meta['fingerprint'], ckpt.fingerprint(config), allow=('num_workers',))
      per_worker = ['opt_state'] + ([] if config.sync_batch_stats else ['batch_stats'])
      saved_shapes = {
          k: jax.tree.map(lambda x: jax.ShapeDtypeStruct((saved_k, *x.shape[1:]), x.dtype), v)
          if k in per_worker else v for k, v in state.items()}
      raw = ckpt.restore_host(mngr, saved_step, saved_shapes)
      y_before = _host_output(raw)
      for key in per_worker:
        raw[key] = ckpt.reshard_workers(raw[key], saved_k, K)
      change = max((float(np.abs(a - b).max()) for a, b in zip(
          jax.tree.leaves(y_before), jax.tree.leaves(_host_output(raw)))), default=0.0)
      reshard_info = {'resharded_from_workers': saved_k, 'reshard_output_change': change}
      state = jax.tree.map(lambda x, t: jax.device_put(x.astype(t.dtype), t.sharding), raw, state)
      log(f'resharded the checkpoint from {saved_k} to {K} workers: the output'
          f' model y = x - mean_k e_k moved by at most {change:.2g}')
    else:
      ckpt.compare(meta['fingerprint'], ckpt.fingerprint(config))
      state = ckpt.restore(mngr, saved_step, state)
    start_step, loss_sum, loss_count, elapsed0 = (
        saved_step, meta['loss_sum'], meta['loss_count'], meta['wall_time'])
    log(f'resuming from the checkpoint at step {saved_step}')
  params, batch_stats, opt_state = state['params'], state['batch_stats'], state['opt_state']

  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  _truncate_metrics(metrics_path, start_step)
  log(f'{config.model}: d = {d:,} parameters, {o.method} ratio {o.ratio:g}'
      f' (block {payload:,} values), K = {K} workers on {layout.num_devices}'
      f' {jax.devices()[0].platform} device(s), {steps_per_epoch} steps/epoch,'
      f' {total_steps} steps, {bytes_per_step:,} bytes/worker/step')

  # ---- evaluation: the test set in batches split over the devices
  n_dev = layout.num_devices
  eval_bs = max(n_dev, config.eval_batch_size // n_dev * n_dev)
  n_test = len(test)
  n_batches = math.ceil(n_test / eval_bs)

  def evaluate(p, bs):
    correct = 0
    for i in range(n_batches):
      lo = i * eval_bs
      idx = np.arange(lo, lo + eval_bs)
      valid = idx < n_test
      idx = np.where(valid, idx, 0)
      # Each device's rows are read (decoded, for a stream) once, for both arrays.
      rows_read = {}

      def read(r):
        key = r.indices(eval_bs)
        if key not in rows_read:
          rows_read[key] = test.batch(idx[r])
        return rows_read[key]

      imgs = jax.make_array_from_callback(
          (eval_bs, *test.image_shape), layout.per_worker, lambda s: read(s[0])[0])
      labs = jax.make_array_from_callback((eval_bs,), layout.per_worker, lambda s: read(s[0])[1])
      val = jax.make_array_from_callback((eval_bs,), layout.per_worker, lambda s: valid[s[0]])
      correct += int(_host(eval_fn(p, bs, imgs, labs, val)))
    return correct / n_test

  def eval_stats(bs):
    if config.sync_batch_stats:
      return bs
    return jax.tree.map(lambda x: x.mean(0), bs)

  def batches_at(step, n):
    """Steps [step, step + n) as (n, K, ...) arrays ((K, ...) if spd is 1).

    Only the rows of this process's workers are read (decoded, for a stream).
    """
    per_step = []
    for t in range(step, step + n):
      # A stream decodes and crops on the host, keyed by (seed, step): resumable.
      images, labels = train.batch(order.indices(t), (config.seed, t))
      ids = np.stack([np.full(K, t), np.arange(K)], 1)[rows]  # (step, worker) ids
      per_step.append((np.asarray(images, np.uint8), np.asarray(labels, np.int32),
                       ids.astype(np.int32)))
    lead = 1 if spd > 1 else 0  # the step axis, if any
    sharding = layout.per_step_and_worker if lead else layout.per_worker

    def to_global(arrays):
      local = np.stack(arrays) if lead else arrays[0]  # (n,) + (this process's workers, ...)

      def fill(index):  # one device's global worker rows -> this process's rows
        start, stop, _ = index[lead].indices(K)
        return local[(slice(None),) * lead + (slice(start - rows.start, stop - rows.start),)]

      return jax.make_array_from_callback(local.shape[:lead] + (K,) + local.shape[lead + 1:],
                                          sharding, fill)

    return tuple(to_global(list(arrays)) for arrays in zip(*per_step))

  def save(step, ls, lc, elapsed):
    if step in mngr.all_steps():  # e.g. a signal right after a periodic save
      return
    if not _all_finite(params) or not _all_finite(opt_state):
      diverge(step)  # never write a non-finite state over a good checkpoint
    ckpt.save(mngr, step, {'params': params, 'batch_stats': batch_stats, 'opt_state': opt_state},
              {'step': step, 'loss_sum': ls, 'loss_count': lc, 'wall_time': elapsed,
               'fingerprint': ckpt.fingerprint(config)})

  summary_base = {'config': config.to_dict(), 'steps_per_epoch': steps_per_epoch,
                  'num_params': d, 'bytes_per_step': bytes_per_step, **reshard_info}
  # Dispatch the next steps before reading the last ones' losses, except on
  # the CPU backend: there all devices share the host's cores, and a run that
  # queues work ahead only makes device threads wait longer at collectives.
  lookahead = jax.devices()[0].platform != 'cpu'
  t0 = time.time() - elapsed0
  last_record: dict[str, Any] = {}
  pending = None  # (first step, losses) of the dispatch not yet read

  def fetch(pending, ls, lc):
    """Adds one dispatch's losses in step order; diverges at a non-finite one."""
    first, losses = pending
    for i, value in enumerate(np.atleast_1d(_host(losses)).tolist()):
      if not math.isfinite(value):
        diverge(first + i + 1)
      ls, lc = ls + value, lc + 1
    return ls, lc

  def diverge(step):
    summary = dict(summary_base, status='diverged', diverged_at_step=step, steps=step,
                   wall_time=time.time() - t0, bytes_sent=bytes_sent(step),
                   final_test_accuracy=None, final_train_loss=None)
    _write_json(os.path.join(workdir, 'summary.json'), summary)
    raise Diverged(step, summary)

  def next_stop(step):
    """The next step after ``step`` that evaluates, checkpoints or ends."""
    stops = [total_steps, (step // eval_every + 1) * eval_every]
    if config.checkpoint_every_steps:
      every = config.checkpoint_every_steps
      stops.append((step // every + 1) * every)
    return min(stops)

  with _SignalFlag() as flag, _progress(total_steps, start_step) as bar:
    step = start_step
    while step < total_steps:
      n = min(spd, next_stop(step) - step)
      params, batch_stats, opt_state, loss = step_fn(
          params, batch_stats, opt_state, batches_at(step, n))
      if pending is not None:
        loss_sum, loss_count = fetch(pending, loss_sum, loss_count)
      pending = (step, loss)
      step += n
      is_eval = step % eval_every == 0 or step == total_steps
      is_ckpt = (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0)
      if not lookahead or is_eval or is_ckpt or flag.signum is not None:
        loss_sum, loss_count = fetch(pending, loss_sum, loss_count)
        pending = None
      bar.update(n, loss_sum / max(loss_count, 1))
      if is_eval:
        if not _all_finite(params):
          diverge(step)
        out = averaged(params, opt_state) if output_is_averaged(o.method) else params
        stats = eval_stats(batch_stats)
        acc_x = evaluate(params, stats)
        acc = evaluate(out, stats) if out is not params else acc_x
        last_record = {
            'step': step, 'epoch': step / steps_per_epoch,
            'train_loss': loss_sum / max(loss_count, 1),
            'test_accuracy': acc, 'test_accuracy_x': acc_x,
            'lr': float(schedule(step - 1)), 'wall_time': time.time() - t0,
            'bytes_sent': bytes_sent(step)}
        loss_sum, loss_count = 0.0, 0
        if jax.process_index() == 0:
          with open(metrics_path, 'a') as f:
            f.write(json.dumps(last_record) + '\n')
        bar.write(
            f'step {step}/{total_steps} epoch {last_record["epoch"]:.2f}: train loss'
            f' {last_record["train_loss"]:.4f}, test accuracy {100 * acc:.2f}%'
            + ('' if out is params else f' (x: {100 * acc_x:.2f}%)')
            + f', lr {last_record["lr"]:.4g}, {last_record["wall_time"]:.0f}s')
        final_params = out
      if is_ckpt or step == total_steps or flag.signum is not None:
        save(step, loss_sum, loss_count, time.time() - t0)
      if flag.signum is not None and step < total_steps:
        raise Interrupted(step, flag.signum)

  if start_step >= total_steps:  # resumed a finished run: recompute the output
    final_params = averaged(params, opt_state) if output_is_averaged(o.method) else params
    last_record = _last_metrics(metrics_path)
  summary = dict(
      summary_base, status='completed', steps=total_steps,
      final_test_accuracy=last_record.get('test_accuracy'),
      final_test_accuracy_x=last_record.get('test_accuracy_x'),
      final_train_loss=last_record.get('train_loss'),
      wall_time=time.time() - t0, bytes_sent=bytes_sent(total_steps),
      params_sha256=params_sha256(final_params))
  if jax.process_index() == 0:
    _write_json(os.path.join(workdir, 'summary.json'), summary)
  return summary


# ------------------------------------------------------------- output files


def _host_output(state) -> Any:
  """y = x - mean_k e_k of a host (numpy) state with stacked worker errors."""
  ef = feedback._single_state(state['opt_state'])
  if ef is None:
    return state['params']
  return jax.tree.map(lambda x, e: x - e.mean(0).astype(x.dtype), state['params'], ef.error)


def _write_json(path: str, obj) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


def _truncate_metrics(path: str, step: int) -> None:
  """Drops records after ``step`` (written before a kill, not in the checkpoint)."""
  if jax.process_index() != 0:
    return
  if step == 0:
    if os.path.exists(path):
      os.remove(path)
    return
  if not os.path.exists(path):
    return
  with open(path) as f:
    keep = [l for l in f if l.strip() and json.loads(l)['step'] <= step]
  with open(path + '.tmp', 'w') as f:
    f.writelines(keep)
  os.replace(path + '.tmp', path)


def _last_metrics(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    lines = [l for l in f if l.strip()]
  return json.loads(lines[-1]) if lines else {}


class _progress:
  """A tqdm bar with the running loss and throughput (silent if not a TTY-less
  process 0... tqdm handles non-TTY output by printing sparse updates)."""

  def __init__(self, total, initial):
    self.total, self.initial = total, initial

  def __enter__(self):
    from tqdm import tqdm
    self.bar = tqdm(total=self.total, initial=self.initial, unit='step',
                    dynamic_ncols=True, mininterval=2.0,
                    disable=jax.process_index() != 0)
    return self

  def update(self, n, loss):
    self.bar.update(n)
    self.bar.set_postfix(loss=f'{loss:.4f}', refresh=False)

  def write(self, msg):
    if jax.process_index() == 0:
      self.bar.write(msg)

  def __exit__(self, *exc):
    self.bar.close()
