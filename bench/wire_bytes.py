"""All-reduce bytes per step, read from the compiled train step, vs the limit.

For each model, method and ratio this compiles the real shard_map train step
(``DataParallelLayout.train_step``, trainer-like loss, synced batch-norm
statistics) on 8 devices without running it, reads every collective from the
optimized HLO (``defjax.wire``) and compares the all-reduce payload with the
physical limit:

  limit = ceil(d / ratio) * 4   (the RBGS block; d * 4 for SGD)
        + batch-norm statistics * 4   (synced on purpose, as the authors do)
        + 4                           (the mean loss)

Run: python -m bench.wire_bytes [--models cnn,vgg16,resnet50] [--ratios ...]
"""

from __future__ import annotations

from bench import common  # noqa: F401  (sets 8 host devices before jax)

import argparse  # noqa: E402
import collections  # noqa: E402
import hashlib  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from defjax import wire  # noqa: E402

RATIOS = (1, 16, 64, 256, 1024)
MODELS = ('cnn', 'vgg16', 'resnet50')
# Per-worker batch for compilation only: the payload does not depend on it.
BATCH = {'cnn': 4, 'vgg16': 2, 'resnet50': 1}


def limit_bytes(
    d: int, model_state_elements: int, method: str, ratio: float
) -> int:
  sent = d if method == 'sgd' else common.ceil_div(d, ratio)
  return 4 * sent + 4 * model_state_elements + 4


def check(setup: common.Setup, method: str, ratio: float, cache=None) -> dict:
  """Compiles one step and returns its wire row (payload, limit, equal).

  ``cache`` maps the lowered program's text to an earlier row: EF, DEF, SAEF
  and PSync lower to the same program (lam lives in the optimizer state), so
  XLA would compile the same module again; the row says whose compile it used.
  """
  tx = common.make_tx(method, ratio, setup.layout.axis_name)
  lowered = setup.step(tx).lower(*setup.abstract_args(tx))
  key = hashlib.sha256(lowered.as_text().encode()).hexdigest()
  if cache is not None and key in cache:
    found, compile_s, same_as = cache[key][0], 0.0, cache[key][1]
  else:
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    found, same_as = wire.collectives(compiled), ''
    if cache is not None:
      cache[key] = (found, f'{method}@{ratio}')
  ar = [c for c in found if c.op == 'all-reduce']
  other = [c for c in found if c.op != 'all-reduce']
  payload = sum(c.bytes for c in ar)
  d = setup.num_params
  limit = limit_bytes(d, setup.model_state_elements, method, ratio)
  if payload == limit and not other:
    verdict = 'equal'
  elif payload < limit and not other:
    verdict = 'below'
  else:
    verdict = 'ABOVE'
  missing = ''
  if verdict == 'below' and method == 'sgd':
    # Which gradient leaves never reached the wire (XLA merged them with an
    # identical one): expected operand shapes minus the all-reduced ones.
    got = collections.Counter(s for c in ar for _, s in c.shapes)
    want = collections.Counter(
        tuple(a.shape)
        for a in jax.tree.leaves(
            (setup.abstract_params, setup.abstract_model_state)
        )
    )
    want[()] += 1
    missing = ' '.join(
        f'{list(k)}x{v}' for k, v in sorted((want - got).items())
    )
  return {
      'model': setup.name,
      'method': method,
      'ratio': ratio,
      'd': d,
      'bn_elements': setup.model_state_elements,
      'all_reduce_ops': len(ar),
      'all_reduce_bytes': payload,
      'other_collective_bytes': sum(c.bytes for c in other),
      'limit_bytes': limit,
      'equal': verdict == 'equal',
      'verdict': verdict,
      'excess_bytes': payload - limit,
      'compile_s': round(compile_s, 2),
      'same_program_as': same_as,
      'missing_operands': missing,
  }


def run(
    models=MODELS, methods=common.METHODS, ratios=RATIOS, num_workers=8
) -> list[dict]:
  rows = []
  for name in models:
    setup = common.Setup(name, num_workers, BATCH.get(name, 1))
    cache = {}
    for method in methods:
      for ratio in ratios:
        row = check(setup, method, ratio, cache)
        rows.append(row)
        same = row['same_program_as']
        print(
            f"{name:9s} {method:6s} ratio {ratio:5d}: payload {row['all_reduce_bytes']:>11,d} B"
            f" limit {row['limit_bytes']:>11,d} B {row['verdict']}"
            f" ({row['compile_s']:.1f}s compile{', same program as ' + same if same else ''})",
            flush=True,
        )
  return rows


COLUMNS = (
    'model',
    'method',
    'ratio',
    'd',
    'bn_elements',
    'all_reduce_ops',
    'all_reduce_bytes',
    'limit_bytes',
    'excess_bytes',
    'verdict',
    'same_program_as',
)


def main(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument('--models', default=','.join(MODELS))
  p.add_argument('--methods', default=','.join(common.METHODS))
  p.add_argument('--ratios', default=','.join(map(str, RATIOS)))
  p.add_argument('--workers', type=int, default=8)
  a = p.parse_args(argv)
  rows = run(
      a.models.split(','),
      a.methods.split(','),
      [int(r) for r in a.ratios.split(',')],
      a.workers,
  )
  n_eq = sum(r['verdict'] == 'equal' for r in rows)
  n_below = sum(r['verdict'] == 'below' for r in rows)
  notes = (
      f'{n_eq}/{len(rows)} configurations all-reduce exactly the limit, {n_below} less'
      f' than it, {len(rows) - n_eq - n_below} more. Compiled (not run) on'
      f' {common.jax.device_count()} {common.jax.default_backend()} devices, per-worker batch'
      f' {dict((m, BATCH.get(m, 1)) for m in a.models.split(","))}. Identical lowered programs'
      ' (EF/DEF/SAEF/PSync at one ratio: lam is state; SGD at every ratio) are compiled once;'
      ' same_program_as names the compile used.'
  )
  below = [r for r in rows if r['verdict'] == 'below']
  if below:
    gone = sorted({(r['model'], r['missing_operands']) for r in below})
    notes += (
        ' "below": the dense SGD all-reduce carries fewer operands than there are leaves, because'
        ' XLA merged gradient leaves that are the same value (CSE) before the all-reduce. Missing'
        ' operand shapes: '
        + '; '.join(f'{m}: {g}' for m, g in gone)
        + '. In ResNet-50 these are'
        " the BN bias (beta) gradients of bn3 and shortcut_bn of each stage's first bottleneck,"
        ' which both equal the sum of the gradient of relu(x + y) over N, H, W.'
    )
  common.write(
      'wire_bytes',
      {'rows': rows, 'workers': a.workers},
      common.table(rows, COLUMNS),
      notes,
  )
  return rows


if __name__ == '__main__':
  main()
