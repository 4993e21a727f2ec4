"""Does DEF trail SGD on the long CIFAR-10 run because it fits the training
set less well (optimization), or because it generalizes worse?

The loss logged during training is taken where each method takes its
gradient (the detached points x - lam e_k for DEF) on augmented batches, in
training mode, so it does not compare the final models. This restores each
run's newest checkpoint and measures every model the run evaluates (x, and
the averaged output where the method has one: DEF's y = x - mean_k e_k)
the same way on both splits: mean cross-entropy
and accuracy on the 50,000 training images without augmentation and on the
10,000 test images, batch norm in evaluation mode with the statistics the
run evaluated with. If DEF's training loss is as low as SGD's, the gap is
generalization; if it is higher, DEF has not fit the data as far.

    python results/cifar10_long/fit_probe.py RUN_DIR... --out FILE.json

A run's checkpoints are not committed (``.gitignore``): this reads the ones a
finished run leaves in ``RUN_DIR/checkpoints`` on the machine that ran it.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from defjax import methods  # noqa: E402
from defjax.training import data as data_lib  # noqa: E402
from defjax.training import trainer  # noqa: E402

import bn_probe  # noqa: E402  (beside this script: its record writer)

BATCH = 500  # divides both splits: no padded batch


def probe(run_dir: pathlib.Path) -> dict:
  restored = trainer.restore(str(run_dir))
  config, info, run = restored.config, restored.info, restored.run
  x, opt_state = restored.state['params'], restored.state['opt_state']
  stats = jax.device_get(
      trainer.eval_stats(config, restored.state['batch_stats'])
  )
  models = {'x': jax.device_get(x)}
  if methods.get(config.optim.method).averaged_output:
    models['y'] = jax.device_get(run.output(x, opt_state))
  mean = jnp.asarray(info.mean, jnp.float32)
  std = jnp.asarray(info.std, jnp.float32)

  @jax.jit
  def sums(params, images, labels):
    logits = run.model.apply(
        {'params': params, 'batch_stats': stats},
        data_lib.standardize(images, mean, std),
        train=False,
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return loss.sum(), (jnp.argmax(logits, -1) == labels).sum()

  out = {
      'run': str(run_dir),
      'method': config.optim.method,
      'ratio': config.optim.ratio,
      'step': restored.step,
  }
  for split in ('train', 'test'):
    data = data_lib.load(config.dataset, config.data_dir or None, split=split)
    n = len(data.labels)
    assert n % BATCH == 0, (split, n)
    for name, params in models.items():
      loss = correct = 0.0
      for lo in range(0, n, BATCH):
        s, c = sums(
            params,
            jnp.asarray(data.images[lo : lo + BATCH]),
            jnp.asarray(data.labels[lo : lo + BATCH]),
        )
        loss += float(s)
        correct += int(c)
      out[f'{name}_{split}_loss'] = loss / n
      out[f'{name}_{split}_accuracy'] = correct / n
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('runs', nargs='+', type=pathlib.Path)
  parser.add_argument('--out', type=pathlib.Path, required=True)
  args = parser.parse_args(argv)
  bn_probe.probe_all(
      probe, args.runs, args.out, 'results/cifar10_long/fit_probe.py'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
