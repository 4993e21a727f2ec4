"""One-off A/B: the train step before and after the optimizer ran vmapped
over a device's single worker (commit 196f997).

Loads ``defjax/parallel.py`` as it was at ``--before`` (default 455571b, the
squeezed one-worker path) from this repository's history next to the
current one, builds both train steps for SGD and DEF (ratio 256, per-leaf
blocks) with K = 8 workers on 8 CPU devices, and times them in alternating
rounds. Prints ms per step (median) and the new / old step-time ratio per
round (min / median / max) for each method. Needs a git checkout.

Run: python -m bench.ab_squeezed_optimizer [--model cnn] [--batch 16] [--rounds 8] [--steps 10]
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys
import tempfile

from bench import common

import defjax  # noqa: E402  (after bench.common: 8 CPU devices)

ROOT = pathlib.Path(__file__).resolve().parent.parent


def old_parallel(commit: str):
  source = subprocess.run(
      ['git', 'show', f'{commit}:defjax/parallel.py'],
      cwd=ROOT,
      check=True,
      capture_output=True,
      text=True,
  ).stdout
  path = pathlib.Path(tempfile.mkdtemp()) / 'parallel_before.py'
  path.write_text(source)
  spec = importlib.util.spec_from_file_location('parallel_before', path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclasses look themselves up there
  spec.loader.exec_module(module)
  return module


def main(argv=None):
  a = common.arguments(
      __doc__, argv, before='455571b', model='cnn', batch=16, rounds=8, steps=10
  )
  setup = common.Setup(a.model, 8, a.batch)
  data = setup.batches(2)
  runners = {}
  for method in ('sgd', 'def'):
    # The old module's make_train_step reads the layout attributes the new
    # DataParallelLayout still has.
    old = old_parallel(a.before).make_train_step
    new = lambda loss_fn, tx, layout, **kw: layout.train_step(loss_fn, tx, **kw)
    for name, make_train_step in (('old', old), ('new', new)):
      compressor = None if method == 'sgd' else defjax.rbgs(256, per_leaf=True)
      tx = common.make_tx(
          method, 256, setup.layout.axis_name, compressor=compressor
      )
      params, model_state = setup.variables()
      opt_state = setup.layout.init_state(tx, params)
      step = make_train_step(
          setup.loss_fn, tx, setup.layout, sync_model_state=True
      )
      runners[f'{method}_{name}'] = common.step_runner(
          step, [params, model_state, opt_state], data, a.steps
      )
  res = common.alternate(runners, rounds=a.rounds, baseline='sgd_old', warmup=1)
  for name, t in res['times_s'].items():
    print(f'{name}: {1e3 * t["median"] / a.steps:.1f} ms/step (median)')
  for method in ('sgd', 'def'):
    ratio = common.summarize(
        [
            n / o
            for n, o in zip(
                res['raw_s'][f'{method}_new'], res['raw_s'][f'{method}_old']
            )
        ]
    )
    print(
        f'{method} new / old per round:',
        json.dumps({k: round(v, 3) for k, v in ratio.items()}),
    )


if __name__ == '__main__':
  main()
