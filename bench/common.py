"""Shared pieces of the benchmarks: devices, models, methods, timing, output.

Import this module before jax in a benchmark script: it asks XLA for 8 host
CPU devices (unless XLA_FLAGS already says how many), so that the shard_map
train step runs real collectives on a CPU-only machine. On a GPU machine the
flag only affects the host platform and the GPUs are used unchanged.
"""

from __future__ import annotations

import os

if 'xla_force_host_platform_device_count' not in os.environ.get(
    'XLA_FLAGS', ''
):
  os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '')
      + ' --xla_force_host_platform_device_count=8'
  ).strip()

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable, Optional, Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from configs import default as default_config  # noqa: E402
from defjax import compress  # noqa: E402
from defjax import xla_cpu  # noqa: E402
from defjax.layouts import data_parallel  # noqa: E402
from defjax.training import optimizer  # noqa: E402
from defjax.training import runfiles  # noqa: E402

xla_cpu.tolerate_slow_cpu_devices()
from defjax.training.models import get_model  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / 'results'

# The methods timed (defjax.methods; DEF-A is a DEF run's other output), DEF
# at the paper's lam.
METHODS = ('sgd', 'ef', 'def', 'saef', 'psync')
DEF_LAM = 0.3

# name -> (input shape without batch, number of classes)
MODEL_INPUTS = {
    'cnn': ((28, 28, 1), 10),
    'vgg16': ((32, 32, 3), 10),
    'vgg16_slim': ((32, 32, 3), 10),
    'resnet20': ((32, 32, 3), 10),
    'resnet50': ((224, 224, 3), 1000),
}


def optim_config(method: str = 'sgd', ratio: float = 1):
  """The training configs' ``optim`` (configs/default.py: the paper's momentum
  SGD, lr 0.05, wd 5e-4) for ``method`` at ``ratio``, DEF at ``DEF_LAM``, one
  global RBGS block."""
  optim = default_config.get_config().optim
  optim.update(method=method, ratio=float(ratio), lam=DEF_LAM, per_leaf=False)
  return optim


def inner_optimizer():
  """The paper's local optimizer: momentum SGD with weight decay."""
  optim = optim_config()
  return optimizer.local_optimizer(optim, optim.lr)


def make_tx(method: str, ratio: float, axis_name, *, compressor=None):
  """The per-worker transform of ``method`` with RBGS at ``ratio``, built as
  the training program builds it (``optimizer.build``); ``compressor``
  replaces RBGS."""
  optim = optim_config(method, ratio)
  rbgs = compress.rbgs if compressor is None else lambda ratio, **_: compressor
  tx, _ = optimizer.build(
      optim, schedule=optim.lr, axis_name=axis_name, rbgs=rbgs
  )
  return tx


def make_loss(model):
  """``loss_fn(params, model_state, batch)`` as the trainer builds it.

  Softmax cross-entropy; batch-norm statistics come back through
  ``mutable=['batch_stats']`` and are synced by the step.
  """

  def loss_fn(params, model_state, batch):
    x, y = batch
    variables = {'params': params, **model_state}
    rngs = {'dropout': jax.random.PRNGKey(0)}  # the VGGs' classifier
    if model_state:
      logits, new_state = model.apply(
          variables, x, train=True, mutable=['batch_stats'], rngs=rngs
      )
    else:
      logits, new_state = (
          model.apply(variables, x, train=True, rngs=rngs),
          model_state,
      )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, new_state

  return loss_fn


def abstract_size(tree) -> int:
  """The number of values in a tree of ShapeDtypeStructs.

  optax.tree.size would do for arrays, but its jnp.size deprecates
  ShapeDtypeStruct leaves (an error in a future JAX).
  """
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


class Setup:
  """A model, its loss, abstract/concrete variables and per-worker batches."""

  def __init__(
      self,
      model_name: str,
      num_workers: int,
      batch: int,
      seed: int = 0,
      *,
      model=None,
      input_shape=None,
      classes=None,
      layout=None,
  ):
    if model is None:
      shape, classes = MODEL_INPUTS[model_name]
      model = get_model(model_name, num_classes=classes)
    else:
      shape = input_shape
    self.name = model_name
    self.model = model
    self.layout = (
        data_parallel.make_layout(num_workers) if layout is None else layout
    )
    self.batch = batch
    self.input_shape = shape
    self.classes = classes
    self.loss_fn = make_loss(self.model)
    self.seed = seed
    x = jnp.zeros((1, *shape), jnp.float32)
    self.abstract_variables = jax.eval_shape(
        lambda: self.model.init(jax.random.PRNGKey(seed), x, train=False)
    )

  @property
  def abstract_params(self):
    return self.abstract_variables['params']

  @property
  def abstract_model_state(self):
    return {k: v for k, v in self.abstract_variables.items() if k != 'params'}

  @property
  def num_params(self) -> int:
    return abstract_size(self.abstract_params)

  @property
  def model_state_elements(self) -> int:
    return abstract_size(self.abstract_model_state)

  def _sds(self, tree, sharding):
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
        tree,
    )

  def abstract_args(self, tx):
    """ShapeDtypeStructs of (params, model_state, opt_state, batch) with shardings."""
    lay = self.layout
    params = self._sds(self.abstract_params, lay.replicated)
    model_state = self._sds(self.abstract_model_state, lay.replicated)
    opt = jax.eval_shape(
        jax.vmap(tx.init, in_axes=None, axis_size=lay.num_workers),
        self.abstract_params,
    )
    opt = self._sds(opt, lay.per_worker)
    k = lay.num_workers
    batch = (
        jax.ShapeDtypeStruct(
            (k, self.batch, *self.input_shape),
            jnp.float32,
            sharding=lay.per_worker,
        ),
        jax.ShapeDtypeStruct(
            (k, self.batch), jnp.int32, sharding=lay.per_worker
        ),
    )
    return params, model_state, opt, batch

  def variables(self):
    x = jnp.zeros((1, *self.input_shape), jnp.float32)
    v = jax.jit(
        lambda: self.model.init(jax.random.PRNGKey(self.seed), x, train=False)
    )()
    params = jax.device_put(v['params'], self.layout.replicated)
    ms = jax.device_put(
        {k: w for k, w in v.items() if k != 'params'}, self.layout.replicated
    )
    return params, ms

  def batches(self, n: int, seed: int = 0):
    """``n`` random per-worker batches, already on the devices."""
    rng = np.random.default_rng(seed)
    k = self.layout.num_workers
    out = []
    for _ in range(n):
      x = rng.normal(size=(k, self.batch, *self.input_shape)).astype(np.float32)
      y = rng.integers(0, self.classes, size=(k, self.batch)).astype(np.int32)
      out.append(jax.device_put((x, y), self.layout.per_worker))
    return out

  def step(self, tx, donate: bool = True, check_collectives: bool = True):
    return self.layout.train_step(
        self.loss_fn,
        tx,
        sync_model_state=True,
        donate=donate,
        check_collectives=check_collectives,
    )


# ------------------------------------------------------------------- timing


def summarize(values: Sequence[float]) -> dict:
  v = sorted(float(x) for x in values)
  return {
      'min': v[0],
      'median': statistics.median(v),
      'max': v[-1],
      'n': len(v),
  }


def alternate(
    runners: dict[str, Callable[[], Any]],
    rounds: int,
    baseline: str,
    warmup: int = 1,
) -> dict:
  """Times each runner once per round, in turn (A B C A B C ...).

  Each runner must block until its work is done. Returns per-variant time
  summaries and, for every other variant, the per-round ratio to
  ``baseline`` summarized (min/median/max): measured in the same round, the
  ratio is robust to a shared machine slowing down between rounds.
  """
  names = list(runners)
  for _ in range(warmup):
    for n in names:
      runners[n]()
  times = {n: [] for n in names}
  for r in range(rounds):
    # Rotate the order so no variant always runs right after the same one.
    order = names[r % len(names) :] + names[: r % len(names)]
    for n in order:
      t0 = time.perf_counter()
      runners[n]()
      times[n].append(time.perf_counter() - t0)
  out = {'times_s': {n: summarize(t) for n, t in times.items()}, 'raw_s': times}
  out['ratio_to_' + baseline] = {
      n: summarize([a / b for a, b in zip(times[n], times[baseline])])
      for n in names
      if n != baseline
  }
  return out


def count_faults(runners: dict[str, Callable[[], Any]]) -> tuple[dict, dict]:
  """Wraps each runner to count this process's minor page faults per call.

  Returns (wrapped runners, {name: [faults of each call]}): a page fault is
  the kernel mapping a page on first touch, which XLA:CPU pays for every
  buffer that the allocator hands out as fresh memory (``bench/allocator.py``).
  """
  faults = {n: [] for n in runners}

  def wrap(name, run):
    def counted():
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      run()
      faults[name].append(
          resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
      )

    return counted

  return {n: wrap(n, r) for n, r in runners.items()}, faults


def ratio_cells(
    ratio: Optional[dict], median: str, low: str, high: str
) -> dict:
  """A table row's cells for one variant's per-round ratio summary (from
  ``alternate``): {median: ..., low: min, high: max}; the baseline has no
  ratio of its own and gets 1.0 in each."""
  if ratio is None:
    return {median: 1.0, low: 1.0, high: 1.0}
  return {median: ratio['median'], low: ratio['min'], high: ratio['max']}


def time_fn(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict:
  for _ in range(warmup):
    fn()
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return summarize(ts)


# ------------------------------------------------------------------- output


def machine() -> dict:
  dev = jax.devices()[0]
  return {
      'platform': platform.platform(),
      'python': platform.python_version(),
      'cpu_count': os.cpu_count(),
      'jax': jax.__version__,
      'backend': jax.default_backend(),
      'device_kind': dev.device_kind,
      'num_devices': jax.device_count(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      # tcmalloc here changes XLA:CPU's page faults (bench/allocator.py).
      'ld_preload': os.environ.get('LD_PRELOAD', ''),
      # A load above the core count means other work shared the machine.
      'loadavg': (
          [round(x, 2) for x in os.getloadavg()]
          if hasattr(os, 'getloadavg')
          else None
      ),
  }


def arguments(
    doc: str, argv: Optional[Sequence[str]] = None, **defaults
) -> argparse.Namespace:
  """Parses one ``--name`` option per keyword (``_`` written as ``-``), of its default's type."""
  p = argparse.ArgumentParser(description=doc.split('\n')[0])
  for name, default in defaults.items():
    p.add_argument(
        '--' + name.replace('_', '-'), type=type(default), default=default
    )
  return p.parse_args(argv)


def command() -> str:
  if sys.argv and sys.argv[0].endswith('.py'):
    mod = pathlib.Path(sys.argv[0]).stem
    return (
        'python -m bench.'
        + mod
        + ''.join(' ' + shlex.quote(a) for a in sys.argv[1:])
    )
  return ' '.join(shlex.quote(a) for a in sys.argv)


def table(rows: Sequence[dict], columns: Sequence[str]) -> str:
  """A Markdown table of ``rows`` (dicts) restricted to ``columns``."""

  def fmt(v):
    if isinstance(v, float):
      if v == 0 or 1e-3 <= abs(v) < 1e6:
        return f'{v:.4g}'
      return f'{v:.3e}'
    return str(v)

  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  for r in rows:
    lines.append('| ' + ' | '.join(fmt(r.get(c, '')) for c in columns) + ' |')
  return '\n'.join(lines)


def write(
    name: str, result: dict, table_md: str, notes: Optional[str] = None
) -> pathlib.Path:
  """Prints the table and writes ``bench/results/<name>.json``."""
  RESULTS.mkdir(parents=True, exist_ok=True)
  doc = {
      'name': name,
      'date': (
          datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec='seconds'
          )
      ),
      'machine': machine(),
      'command': command(),
      'git': runfiles.git_state(RESULTS),
      'table_md': table_md,
      'notes': notes or '',
      **result,
  }
  path = RESULTS / f'{name}.json'
  path.write_text(json.dumps(doc, indent=1, default=_json_default) + '\n')
  print(table_md)
  if notes:
    print('\n' + notes)
  print(f'\nwrote {path}')
  return path


def _json_default(o):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  raise TypeError(type(o))


def ceil_div(a: int, b: float) -> int:
  return max(1, math.ceil(a / b))


def step_runner(step, state, data, steps):
  """A timed unit: ``steps`` calls of a compiled train step on ``state``.

  ``state`` is the list [params, model_state, opt_state], updated in place
  so that each call continues from the last; batches alternate over ``data``.
  """

  def run():
    loss = None
    for i in range(steps):
      state[0], state[1], state[2], loss = step(
          state[0], state[1], state[2], data[i % 2]
      )
    jax.block_until_ready((state, loss))

  return run
