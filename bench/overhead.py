"""Step time of DEF, EF and PSync vs data-parallel SGD on the same devices.

Every variant runs the real shard_map train step (``DataParallelLayout.train_step``)
on the same model, devices and per-worker batch. Variants are timed in
alternation (A B C ... A B C ...), and the ratio to SGD is taken within each
round, so a shared machine slowing down between rounds moves both sides of a
ratio. Reported: min / median / max of the per-round ratios.

Two extra variants help to say where time goes:

* ``def_identity``: DEF with the identity compressor (dense all-reduce, the
  error-feedback bookkeeping without RBGS's flatten/gather/scatter);
* ``local``: SGD without the gradient all-reduce (compute only, plus the
  scalar loss and batch-norm syncs). ``sgd - local`` is the cost of the dense
  all-reduce on this machine; ``local`` is the compute time the cluster
  projection uses.

Run: python -m bench.overhead [--quick]
"""

from __future__ import annotations

from bench import common  # noqa: F401  (sets 8 host devices before jax)

import argparse  # noqa: E402
import collections  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402

import defjax  # noqa: E402

VARIANTS = ('sgd', 'def', 'ef', 'psync', 'def_identity', 'local')

# (model, per-worker batch, timed rounds, steps per timed sample, variants).
# EF, DEF and PSync compile to the same program (lam is optimizer state, see
# bench/wire_bytes.py), so on the small CNN their spread shows the timing
# noise. VGG-16 on a 2-core CPU takes seconds per step: DEF only, few rounds
# (the optimizer-only table covers def_identity for VGG's parameters).
SETTINGS = (
    ('cnn', 16, 12, 5, VARIANTS),
    ('cnn', 128, 8, 2, VARIANTS),
    ('vgg16', 16, 3, 1, ('sgd', 'def', 'local')),
)


def make_variant_tx(variant: str, ratio: float, axis_name):
  if variant == 'def_identity':
    return common.make_tx('def', ratio, axis_name, compressor=defjax.identity())
  if variant == 'local':
    return defjax.data_parallel(common.inner_optimizer(), axis_name=None)
  return common.make_tx(variant, ratio, axis_name)


def hlo_profile(compiled) -> dict:
  """Count and result megabytes of the ops that move data in the optimized HLO
  (top-level and inside fusions), to see what a method adds to the step."""
  from defjax import wire

  text = compiled.as_text()
  ops = (
      'scatter',
      'gather',
      'concatenate',
      'slice',
      'dynamic-slice',
      'dynamic-update-slice',
      'copy',
      'sort',
      'all-reduce',
      'all-reduce-start',
  )
  pat = re.compile(
      r'=\s*(\([^()]*\)|\S+)\s+(' + '|'.join(map(re.escape, ops)) + r')\('
  )
  count, mbytes = collections.Counter(), collections.Counter()
  for m in pat.finditer(text):
    op = m.group(2).removesuffix('-start')
    count[op] += 1
    mbytes[op] += wire.array_bytes(m.group(1)) / 1e6
  return {
      op: {'count': count[op], 'MB': round(mbytes[op], 2)}
      for op in sorted(count)
  }


def measure(
    model: str,
    batch: int,
    rounds: int,
    steps: int,
    ratio: float = 256,
    variants=VARIANTS,
    num_workers: int = 8,
    profile: bool = True,
) -> dict:
  """Times ``variants`` on one setting; returns times, ratios to SGD, HLO counts."""
  setup = common.Setup(model, num_workers, batch)
  data = setup.batches(2)
  runners, hlo = {}, {}
  for v in variants:
    tx = make_variant_tx(v, ratio, setup.layout.axis_name)
    params, ms = setup.variables()
    opt = setup.layout.init_state(tx, params)
    # Compile once and run the compiled executable (a jit call would compile again).
    # 'local' has no gradient all-reduce on purpose: skip the step's check.
    step = (
        setup.step(tx, check_collectives=v != 'local')
        .lower(params, ms, opt, data[0])
        .compile()
    )
    if profile:
      hlo[v] = hlo_profile(step)
    runners[v] = common.step_runner(step, [params, ms, opt], data, steps)
    print(f'  compiled {model} b={batch} {v}', flush=True)
  res = common.alternate(runners, rounds=rounds, baseline='sgd', warmup=1)
  per_step = {
      v: {k: x / steps if k != 'n' else x for k, x in s.items()}
      for v, s in res['times_s'].items()
  }
  return {
      'model': model,
      'batch_per_worker': batch,
      'workers': num_workers,
      'ratio': ratio,
      'rounds': rounds,
      'steps_per_sample': steps,
      'd': setup.num_params,
      'step_s': per_step,
      'ratio_to_sgd': res['ratio_to_sgd'],
      'raw_sample_s': res['raw_s'],
      'hlo_ops': hlo,
  }


def optimizer_cost(
    model: str = 'vgg16', ratio: float = 256, rounds: int = 5
) -> dict:
  """The optimizer alone on one device: ``tx.update`` + ``apply_updates`` +
  the next ``eval_point`` on given gradients (no model compute, no workers).

  Isolates the RBGS / error-feedback bookkeeping that the full step adds to
  SGD: 'def' (flat RBGS), 'def_per_leaf', 'def_identity' (error feedback
  without RBGS) and 'sgd'.
  """
  import numpy as np
  import optax
  from defjax import feedback

  setup = common.Setup(model, 1, 1)
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda a: jax.numpy.asarray(rng.normal(size=a.shape).astype(np.float32)),
      setup.abstract_params,
  )
  grads = jax.tree.map(lambda a: 1e-2 * a, params)
  txs = {
      'sgd': defjax.data_parallel(common.inner_optimizer()),
      'def': common.make_tx('def', ratio, None),
      'def_per_leaf': common.make_tx(
          'def', ratio, None, compressor=defjax.rbgs(ratio, per_leaf=True)
      ),
      'def_identity': common.make_tx(
          'def', ratio, None, compressor=defjax.identity()
      ),
  }
  runners = {}
  for name, tx in txs.items():

    def fn(params, state, grads, tx=tx):
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
      return params, state, feedback.eval_point(params, state)

    fn = jax.jit(fn, donate_argnums=(0, 1))
    state = [jax.tree.map(jax.numpy.copy, params), tx.init(params)]

    def run(fn=fn, state=state):
      state[0], state[1], point = fn(state[0], state[1], grads)
      jax.block_until_ready((state, point))

    runners[name] = run
  res = common.alternate(runners, rounds=rounds, baseline='sgd', warmup=1)
  return {
      'model': model,
      'd': setup.num_params,
      'ratio': ratio,
      'rounds': rounds,
      'step_s': res['times_s'],
      'ratio_to_sgd': res['ratio_to_sgd'],
  }


def rows_of(result: dict) -> list[dict]:
  rows = []
  for v, s in result['step_s'].items():
    rows.append(
        {
            'model': result['model'],
            'batch': result['batch_per_worker'],
            'variant': v,
            'step_ms_median': 1e3 * s['median'],
            **common.ratio_cells(
                result['ratio_to_sgd'].get(v),
                'ratio_median',
                'ratio_min',
                'ratio_max',
            ),
        }
    )
  return rows


COLUMNS = (
    'model',
    'batch',
    'variant',
    'step_ms_median',
    'ratio_median',
    'ratio_min',
    'ratio_max',
)


def main(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument('--ratio', type=float, default=256)
  p.add_argument(
      '--quick', action='store_true', help='cnn only, few rounds (smoke run)'
  )
  a = p.parse_args(argv)
  settings = (('cnn', 16, 3, 2, VARIANTS),) if a.quick else SETTINGS
  results = []
  for model, batch, rounds, steps, variants in settings:
    print(
        f'{model} batch {batch}/worker: {rounds} rounds x {steps} steps',
        flush=True,
    )
    results.append(
        measure(model, batch, rounds, steps, ratio=a.ratio, variants=variants)
    )
  rows = [r for res in results for r in rows_of(res)]
  opt = None if a.quick else optimizer_cost('vgg16', a.ratio)
  table_md = common.table(rows, COLUMNS)
  if opt:
    opt_rows = [
        {
            'variant': v,
            'opt_ms_median': 1e3 * s['median'],
            'ratio_median': (
                opt['ratio_to_sgd'][v]['median']
                if v in opt['ratio_to_sgd']
                else 1.0
            ),
            'extra_ms_vs_sgd': (
                1e3 * (s['median'] - opt['step_s']['sgd']['median'])
            ),
        }
        for v, s in opt['step_s'].items()
    ]
    table_md += (
        '\n\nOptimizer only (VGG-16 params, one device, no model compute):\n\n'
        + common.table(
            opt_rows,
            ('variant', 'opt_ms_median', 'extra_ms_vs_sgd', 'ratio_median'),
        )
    )
  notes = (
      f'RBGS ratio {a.ratio:g}, {results[0]["workers"]} workers on {jax.device_count()}'
      f' {jax.default_backend()} devices ({common.machine()["cpu_count"]} CPU cores).'
      ' ratio = step time / SGD step time in the same round (min/median/max over rounds).'
      ' Target: <= 1.10 at the larger batches. The machine may be shared: compare ratios,'
      ' not absolute times.'
  )
  common.write(
      'overhead',
      {'results': results, 'rows': rows, 'optimizer_only': opt},
      table_md,
      notes,
  )
  return results


if __name__ == '__main__':
  main()
