"""Do batch-norm statistics explain DEF's gap to SGD on the long CIFAR-10 run?

DEF's running statistics are the workers' mean of the statistics seen at
their detached points x - lam e_k, yet the test evaluates x (DEF-A) and
y = x - mean_k e_k (DEF). This restores a run's newest checkpoint and
evaluates each model twice: with the stored statistics and with statistics
recomputed at that very model ("precise BN": the mean over ``--batches``
augmented train batches of 128 of each batch's mean and variance). If the
recomputed ones close the gap, the gap is the statistics; if not, it is the
weights.

    python results/cifar10_long/bn_probe.py RUN_DIR... --out FILE.json

A run's checkpoints are not committed (``.gitignore``): this reads the ones a
finished run leaves in ``RUN_DIR/checkpoints`` on the machine that ran it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from defjax import methods  # noqa: E402
from defjax.training import data as data_lib  # noqa: E402
from defjax.training import runfiles  # noqa: E402
from defjax.training import task  # noqa: E402
from defjax.training import trainer  # noqa: E402
from defjax.training.models import layers  # noqa: E402

BATCH = 128
MOMENTUM = layers.BN_MOMENTUM  # the models' running-average momentum


def probe(run_dir: pathlib.Path, batches: int) -> dict:
  restored = trainer.restore(str(run_dir))
  config, info, run = restored.config, restored.info, restored.run
  x, opt_state = restored.state['params'], restored.state['opt_state']
  # What the run evaluated with: the synced statistics, or the workers' mean.
  stored = trainer.eval_stats(config, restored.state['batch_stats'])
  models = {'x': x}
  if methods.get(config.optim.method).averaged_output:
    models['y'] = run.output(x, opt_state)
  train = data_lib.load(
      config.dataset, config.data_dir or None, split='train'
  )
  model = run.model
  accuracy = task.make_evaluator(
      model, info, restored.test, restored.layout, config.eval_batch_size
  )
  mean = jnp.asarray(info.mean, jnp.float32)
  std = jnp.asarray(info.std, jnp.float32)

  @jax.jit
  def moments(p, old, images, key):
    images = data_lib.augment(
        images, key, pad=config.crop_padding, flip=config.flip
    )
    _, new = model.apply(
        {'params': p, 'batch_stats': old},
        data_lib.standardize(images, mean, std),
        train=True,
        mutable=['batch_stats'],
        rngs={'dropout': key},
    )
    return jax.tree.map(
        lambda n, o: (n - MOMENTUM * o) / (1 - MOMENTUM),
        new['batch_stats'],
        old,
    )

  rows = np.random.default_rng(0).permutation(len(train.labels))
  rows = rows[: batches * BATCH].reshape(batches, BATCH)
  old = jax.device_get(stored)

  def recomputed(p):
    p = jax.device_get(p)
    total = None
    for i, r in enumerate(rows):
      m = moments(p, old, jnp.asarray(train.images[r]), jax.random.PRNGKey(i))
      total = m if total is None else jax.tree.map(jnp.add, total, m)
    return jax.tree.map(lambda t: t / batches, total)

  def relative(a, b):
    a = jax.tree.leaves(jax.device_get(a))
    b = jax.tree.leaves(jax.device_get(b))
    num = sum(float(((u - v) ** 2).sum()) for u, v in zip(a, b))
    return float(np.sqrt(num / sum(float((v**2).sum()) for v in b)))

  out = {
      'run': str(run_dir),
      'method': config.optim.method,
      'ratio': config.optim.ratio,
      'step': restored.step,
      'recompute_batches': batches,
      'batch_size': BATCH,
  }
  for name, p in models.items():
    fresh = recomputed(p)
    out[f'{name}_stored_stats'] = accuracy(p, stored)
    out[f'{name}_recomputed_stats'] = accuracy(p, fresh)
    out[f'{name}_stats_change'] = relative(stored, fresh)
  if 'y' in models:
    out['mean_error_over_x'] = relative(models['y'], x)
  return out


def probe_all(probe_one, runs, out: pathlib.Path, script: str) -> None:
  """``probe_one`` on each run folder, each result printed as it comes;
  then ``out`` holds them all with the command (``script`` and this
  process's arguments), date, machine, versions and commit. fit_probe.py
  writes its record with it too."""
  results = []
  for run in runs:
    results.append(probe_one(run))
    print(json.dumps(results[-1]), flush=True)
  record = {
      'command': ['python', script, *sys.argv[1:]],
      'date': runfiles.utc_now(),
      **runfiles.environment(pathlib.Path(__file__).parent),
      'results': results,
  }
  out.write_text(json.dumps(record, indent=2) + '\n')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('runs', nargs='+', type=pathlib.Path)
  parser.add_argument('--batches', type=int, default=40)
  parser.add_argument('--out', type=pathlib.Path, required=True)
  args = parser.parse_args(argv)
  probe_all(
      lambda run: probe(run, args.batches),
      args.runs,
      args.out,
      'results/cifar10_long/bn_probe.py',
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
