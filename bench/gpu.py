"""One accelerator, K = 8 vmapped workers: SGD against DEF at ratios 64 and 256.

The setting of the paper's runs on a single GPU: the workers are simulated
with vmap on one device (``data_parallel.make_layout(8)`` puts all 8 there), each
with its own error and momentum, and the block all-reduce becomes a sum over
the vmapped axis. For each model and method this measures

* ``compile_s``: lowering + compiling the train step (``make_train_step``,
  the local workers' gradients vmapped; for VGG-16 also unrolled);
* ``steps_per_s``: median over alternating rounds (SGD, DEF@64, DEF@256, ...)
  of ``steps`` consecutive compiled steps, and the ratio of DEF's step time
  to SGD's within each round (min / median / max);
* ``peak_gib``: the device's peak bytes in use after the variant ran (the
  allocator's high-water mark, cumulative over the variants run so far,
  where the backend reports it; XLA:CPU does not) and ``program_gib``, the
  compiled step's own arguments + outputs + temporaries from XLA's memory
  analysis;
* ``wire_bytes``: what one worker all-reduces per step on a real cluster,
  ``wire.bytes_per_step`` of the RBGS payload (per-leaf blocks, the training
  configs' layout) and the batch-norm statistics. On one device no
  collective is compiled; ``bench/wire_bytes.py`` checks the formula against
  the compiled all-reduces on 8 devices.

Sized to run in about 5 minutes on one H200 (compiles dominate); ``--quick``
runs the small CNN only, as the suite does on the CPU.

Run: python -m bench.gpu [--quick] [--models vgg16,resnet50]   (make bench-gpu)
"""

from __future__ import annotations

from bench import common  # noqa: F401  (sets 8 host devices before jax)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

import defjax  # noqa: E402
from defjax.layouts import data_parallel  # noqa: E402
from defjax import wire  # noqa: E402

# (method, ratio, local_gradients): the local workers' gradients vmapped
# (the GPU default) and, for VGG-16, unrolled (one model copy per worker, the
# CPU default; its compile is about 8 times longer, so not for ResNet-50).
VARIANTS = (('sgd', 1, 'vmap'), ('def', 64, 'vmap'), ('def', 256, 'vmap'))
UNROLLED = (('def', 256, 'unroll'),)
# (model, per-worker batch, variants): the paper's CIFAR batch (8 x 16) for
# VGG-16, the usual 8 x 32 for ResNet-50 on ImageNet-sized inputs.
SETTINGS = (('vgg16', 16, VARIANTS + UNROLLED), ('resnet50', 32, VARIANTS))
GIB = 2.0**30


def variant_name(method: str, ratio: int, local_gradients: str = 'vmap') -> str:
  name = method if method == 'sgd' else f'{method}@{ratio}'
  return name if local_gradients == 'vmap' else f'{name} {local_gradients}'


def _peak_bytes():
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get('peak_bytes_in_use')


def measure(
    model: str,
    batch: int,
    *,
    variants=VARIANTS,
    num_workers: int = 8,
    rounds: int = 5,
    steps: int = 10,
    devices=None,
) -> dict:
  """Compiles and times every variant of one model on ``devices`` (default:
  the first device only); returns one row per variant."""
  layout = data_parallel.make_layout(
      num_workers, devices=devices or jax.devices()[:1]
  )
  setup = common.Setup(model, num_workers, batch, layout=layout)
  data = setup.batches(2)
  runners, rows = {}, {}
  for method, ratio, local_gradients in variants:
    name = variant_name(method, ratio, local_gradients)
    compressor = defjax.rbgs(ratio, per_leaf=True) if method != 'sgd' else None
    tx = common.make_tx(method, ratio, layout.axis_name, compressor=compressor)
    params, model_state = setup.variables()
    opt_state = layout.init_state(tx, params)
    t0 = time.perf_counter()
    step = dataclasses.replace(
        layout, local_gradients=local_gradients
    ).train_step(setup.loss_fn, tx)
    compiled = step.lower(params, model_state, opt_state, data[0]).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    program = (
        None
        if memory is None
        else (
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes
        )
    )
    payload = (
        setup.num_params
        if compressor is None
        else compressor.payload(setup.abstract_params)
    )
    rows[name] = {
        'model': model,
        'workers': num_workers,
        'batch_per_worker': batch,
        'devices': layout.num_devices,
        'variant': name,
        'd': setup.num_params,
        'compile_s': compile_s,
        'program_gib': None if program is None else program / GIB,
        'wire_bytes': wire.bytes_per_step(payload, setup.model_state_elements),
    }
    runners[name] = common.step_runner(
        compiled, [params, model_state, opt_state], data, steps
    )
    runners[name]()  # warm up, and let the allocator reach this variant's peak
    peak = _peak_bytes()
    rows[name]['peak_gib'] = None if peak is None else peak / GIB
    print(f'  {model} {name}: compiled in {compile_s:.1f} s', flush=True)
  res = common.alternate(runners, rounds=rounds, baseline='sgd', warmup=0)
  for name, row in rows.items():
    row['step_ms'] = 1e3 * res['times_s'][name]['median'] / steps
    row['steps_per_s'] = steps / res['times_s'][name]['median']
    row.update(
        common.ratio_cells(
            res['ratio_to_sgd'].get(name),
            'x_sgd_median',
            'x_sgd_min',
            'x_sgd_max',
        )
    )
  return {
      'model': model,
      'rounds': rounds,
      'steps_per_sample': steps,
      'rows': list(rows.values()),
      'raw_sample_s': res['raw_s'],
  }


COLUMNS = (
    'model',
    'variant',
    'workers',
    'batch_per_worker',
    'devices',
    'steps_per_s',
    'step_ms',
    'x_sgd_median',
    'x_sgd_min',
    'x_sgd_max',
    'compile_s',
    'peak_gib',
    'program_gib',
    'wire_bytes',
)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='the small CNN only')
  parser.add_argument(
      '--models',
      default=None,
      help='comma-separated models (default: vgg16,resnet50)',
  )
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=10)
  a = parser.parse_args(argv)
  settings = (('cnn', 16, VARIANTS + UNROLLED),) if a.quick else SETTINGS
  if a.models:
    known = {m: (b, v) for m, b, v in SETTINGS}
    settings = tuple(
        (m, *known.get(m, (16, VARIANTS))) for m in a.models.split(',')
    )
  t0 = time.perf_counter()
  results = [
      measure(m, b, variants=v, rounds=a.rounds, steps=a.steps)
      for m, b, v in settings
  ]
  rows = [r for res in results for r in res['rows']]
  device = jax.devices()[0]
  notes = (
      f'One {device.device_kind} ({jax.default_backend()}), K = 8 workers vmapped on it;'
      f' per-leaf RBGS; whole benchmark {time.perf_counter() - t0:.0f} s.'
      " x_sgd: step time over SGD's in the same round. wire_bytes: per worker and"
      ' step on a real cluster (one device compiles no collective).'
  )
  common.write(
      'gpu',
      {'results': results, 'rows': rows},
      common.table(rows, COLUMNS),
      notes,
  )
  from bench import run_all

  run_all.main(
      ['--summary-only']
  )  # summary.md, the docs page's tables, the README's headline


if __name__ == '__main__':
  main()
