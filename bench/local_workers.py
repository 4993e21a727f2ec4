"""More workers than devices: vmapped against unrolled local gradients.

K = 8 DEF workers (ratio 256, per-leaf blocks, lam 0.3) on 8 CPU devices
(one worker each) against the same K = 8 on 2 devices, 4 workers per device,
their gradients computed under ``jax.vmap`` or by one copy of the model per
worker (``make_layout(local_gradients=...)``). DEF's workers take their
gradients at different points x - lam e_k, so under vmap every convolution
gets per-worker weights (a grouped convolution). The three programs are timed
in alternating rounds; ``x_8_devices`` is the step time over the 8-device
step's in the same round. All three must give the same parameters to float
rounding (``max_abs_diff`` after 3 steps).

Run: python -m bench.local_workers [--quick]
"""

from __future__ import annotations

from bench import common  # noqa: F401  (sets 8 host devices before jax)

import argparse  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import defjax  # noqa: E402
from defjax import layouts  # noqa: E402
from defjax.layouts import data_parallel  # noqa: E402

VARIANTS = (
    ('8 devices', 8, 'vmap'),
    ('2 devices, vmap', 2, 'vmap'),
    ('2 devices, unroll', 2, 'unroll'),
)
# (model, per-worker batch, timed rounds, steps per timed sample)
SETTINGS = (('cnn', 16, 7, 3), ('vgg16_slim', 16, 4, 1))


def measure(
    model: str,
    batch: int,
    rounds: int,
    steps: int,
    variants=VARIANTS,
    num_workers: int = 8,
) -> dict:
  runners, final = {}, {}
  for name, num_devices, local_gradients in variants:
    layout = data_parallel.make_layout(
        num_workers,
        devices=jax.devices()[:num_devices],
        local_gradients=local_gradients,
    )
    setup = common.Setup(model, num_workers, batch, layout=layout)
    data = setup.batches(2)
    tx = common.make_tx(
        'def', 256, layout.axis_name, compressor=defjax.rbgs(256, per_leaf=True)
    )
    params, model_state = setup.variables()
    opt_state = layout.init_state(tx, params)
    step = layout.train_step(setup.loss_fn, tx, donate=False)
    compiled = step.lower(params, model_state, opt_state, data[0]).compile()
    state = (params, model_state, opt_state)
    for i in range(3):
      *state, _ = compiled(*state, data[i % 2])
    final[name] = [
        np.asarray(layouts.host_value(x)) for x in jax.tree.leaves(state[0])
    ]
    runners[name] = common.step_runner(
        compiled, [params, model_state, opt_state], data, steps
    )
    print(f'  {model} {name}: compiled', flush=True)
  base = VARIANTS[0][0]
  res = common.alternate(runners, rounds=rounds, baseline=base, warmup=1)
  rows = []
  for name, num_devices, local_gradients in variants:
    rows.append(
        {
            'model': model,
            'batch_per_worker': batch,
            'workers': num_workers,
            'variant': name,
            'devices': num_devices,
            'local_gradients': local_gradients,
            'step_ms': 1e3 * res['times_s'][name]['median'] / steps,
            **common.ratio_cells(
                res['ratio_to_' + base].get(name),
                'x_8_devices',
                'x_min',
                'x_max',
            ),
            'max_abs_diff': max(
                float(np.abs(a - b).max())
                for a, b in zip(final[name], final[base])
            ),
        }
    )
  return {
      'model': model,
      'rounds': rounds,
      'steps_per_sample': steps,
      'rows': rows,
      'raw_sample_s': res['raw_s'],
  }


COLUMNS = (
    'model',
    'batch_per_worker',
    'variant',
    'step_ms',
    'x_8_devices',
    'x_min',
    'x_max',
    'max_abs_diff',
)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
      '--quick', action='store_true', help='the CNN only, 2 rounds'
  )
  a = parser.parse_args(argv)
  settings = (('cnn', 16, 2, 1),) if a.quick else SETTINGS
  results = [measure(*s) for s in settings]
  rows = [r for res in results for r in res['rows']]
  common.write(
      'local_workers',
      {'results': results, 'rows': rows},
      common.table(rows, COLUMNS),
      'K = 8 DEF workers (ratio 256, per-leaf). x_8_devices: step time over the'
      ' 8-device step in the same round (min / median / max over rounds).',
  )


if __name__ == '__main__':
  main()
