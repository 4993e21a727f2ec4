"""Cost of the compressors: RBGS vs Top-K vs Random-K on one worker.

Times ``jit(aggregate)(tree, state, axis_name=None)``, the compressor's whole
work inside a step (select, gather the kept values, scatter the mean back,
zero them in the residual; with one worker there is no collective), and
``jit(compress)`` for reference, on

* one flat float32 leaf of d values (d = 15M and 25M),
* the leaf shapes of a VGG-16 whose widths are scaled to about d values
  (RBGS flat and per-leaf, as the authors' code does it).

The compressors are timed in alternation (rbgs, randomk, topk, rbgs, ...);
the speedup of RBGS over Top-K is the per-round time ratio topk / rbgs,
reported as min / median / max.

Run: python -m bench.compressor_cost [--sizes 15e6,25e6] [--ratios 64,256,1024]
"""

from __future__ import annotations

from bench import common  # noqa: F401

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import defjax  # noqa: E402
from defjax.training.models import vgg  # noqa: E402

SIZES = (15_000_000, 25_000_000)
RATIOS = (64, 256, 1024)


def vgg_like_shapes(target: int, classes: int = 10) -> list[tuple[int, ...]]:
  """Leaf shapes of a CIFAR VGG-16 (conv kernel, bias, BN scale and bias per
  layer, then the classifier) with widths scaled so that d is about ``target``.
  """

  def shapes(f):
    out, cin = [], 3
    for item in vgg.VGG16:
      if item == 'M':
        continue
      c = max(1, round(item * f))
      out += [(3, 3, cin, c), (c,), (c,), (c,)]
      cin = c
    return out + [(cin, classes), (classes,)]

  d = lambda f: sum(math.prod(s) for s in shapes(f))
  f = math.sqrt(target / d(1.0))
  return shapes(f)


def make_tree(d: int, layout: str, seed: int = 0):
  rng = np.random.default_rng(seed)
  if layout == 'flat':
    return {'w': jnp.asarray(rng.standard_normal(d, dtype=np.float32))}
  shapes = vgg_like_shapes(d)
  return {
      f'p{i:02d}': jnp.asarray(rng.standard_normal(s, dtype=np.float32))
      for i, s in enumerate(shapes)
  }


def compressors(ratio: float, layout: str) -> dict:
  if layout == 'flat':
    return {
        'rbgs': defjax.rbgs(ratio),
        'randomk': defjax.randomk(ratio),
        'topk': defjax.topk(ratio),
    }
  return {
      'rbgs': defjax.rbgs(ratio),
      'rbgs_per_leaf': defjax.rbgs(ratio, per_leaf=True),
      'topk': defjax.topk(ratio),
  }


def selectors(ratio: float) -> dict:
  """Selection only: the kept values of a flat vector (no dense outputs).

  Mirrors the index rules of ``defjax.compress`` (RBGS: circular block at a
  shared random start; Random-K: b shared random indices; Top-K: largest
  |values|). The aggregate above must also write two dense d-vectors (C(A)
  and the residual), which costs the same for every compressor; this column
  shows the O(b) vs O(d) difference of the selection itself.
  """

  def rbgs(flat, key):
    d = flat.shape[0]
    b = common.ceil_div(d, ratio)
    i = jax.random.randint(key, (), 0, d, dtype=jnp.int32) + jnp.arange(
        b, dtype=jnp.int32
    )
    return flat.at[jnp.where(i >= d, i - d, i)].get(
        unique_indices=True, mode='promise_in_bounds'
    )

  def randomk(flat, key):
    d = flat.shape[0]
    return flat[
        jax.random.randint(
            key, (common.ceil_div(d, ratio),), 0, d, dtype=jnp.int32
        )
    ]

  def topk(flat, key):
    del key
    _, idx = jax.lax.top_k(jnp.abs(flat), common.ceil_div(flat.shape[0], ratio))
    return flat[idx]

  return {'rbgs': rbgs, 'randomk': randomk, 'topk': topk}


def measure(
    d: int, ratio: float, layout: str = 'flat', rounds: int = 5
) -> dict:
  """Times aggregate (and compress) of each compressor on one tree."""
  tree = make_tree(d, layout)
  d_actual = sum(x.size for x in jax.tree.leaves(tree))
  runners, compress_s = {}, {}
  for name, comp in compressors(ratio, layout).items():
    state = comp.init(tree)
    agg = jax.jit(lambda t, s, comp=comp: comp.aggregate(t, s, None))
    cmp_ = jax.jit(comp.compress)
    jax.block_until_ready(agg(tree, state))
    runners[name] = lambda agg=agg, state=state: jax.block_until_ready(
        agg(tree, state)
    )
    compress_s[name] = common.time_fn(
        lambda: jax.block_until_ready(cmp_(tree, state)), repeats=2
    )
  # The memory floor of any aggregate with dense outputs: write a zero tree
  # and a copy of the input (C(A) and the residual), nothing else.
  floor = jax.jit(
      lambda t: (jax.tree.map(jnp.zeros_like, t), jax.tree.map(jnp.negative, t))
  )
  jax.block_until_ready(floor(tree))
  runners['dense_floor'] = lambda: jax.block_until_ready(floor(tree))
  res = common.alternate(runners, rounds=rounds, baseline='rbgs', warmup=0)
  select = None
  if layout == 'flat':
    key = jax.random.PRNGKey(0)
    sel = {n: jax.jit(f) for n, f in selectors(ratio).items()}
    select = common.alternate(
        {
            n: lambda f=f: jax.block_until_ready(f(tree['w'], key))
            for n, f in sel.items()
        },
        rounds=rounds,
        baseline='rbgs',
        warmup=1,
    )
  return {
      'd': int(d_actual),
      'leaves': len(jax.tree.leaves(tree)),
      'layout': layout,
      'ratio': ratio,
      'aggregate_s': res['times_s'],
      'compress_s': compress_s,
      'ratio_to_rbgs': res['ratio_to_rbgs'],
      'select_s': select['times_s'] if select else None,
      'select_ratio_to_rbgs': select['ratio_to_rbgs'] if select else None,
  }


def rows_of(result: dict) -> list[dict]:
  rows = []
  floor = result['aggregate_s'].get('dense_floor')
  for name, s in result['aggregate_s'].items():
    if name == 'dense_floor':
      continue
    r = result['ratio_to_rbgs'].get(name)
    rows.append(
        {
            'd': result['d'],
            'layout': result['layout'],
            'ratio': result['ratio'],
            'compressor': name,
            'aggregate_ms': 1e3 * s['median'],
            'x_floor': s['median'] / floor['median'] if floor else None,
            'compress_ms': 1e3 * result['compress_s'][name]['median'],
            'x_rbgs_median': r['median'] if r else 1.0,
            'x_rbgs_min': r['min'] if r else 1.0,
            'x_rbgs_max': r['max'] if r else 1.0,
        }
    )
    sel = result.get('select_s') or {}
    if name in sel:
      sr = result['select_ratio_to_rbgs'].get(name)
      rows[-1]['select_ms'] = 1e3 * sel[name]['median']
      rows[-1]['select_x_rbgs'] = sr['median'] if sr else 1.0
  return rows


COLUMNS = (
    'd',
    'layout',
    'ratio',
    'compressor',
    'aggregate_ms',
    'x_floor',
    'compress_ms',
    'x_rbgs_median',
    'x_rbgs_min',
    'x_rbgs_max',
    'select_ms',
    'select_x_rbgs',
)


def main(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument('--sizes', default=','.join(str(s) for s in SIZES))
  p.add_argument('--ratios', default=','.join(map(str, RATIOS)))
  p.add_argument('--rounds', type=int, default=5)
  a = p.parse_args(argv)
  results = []
  for d in [int(float(s)) for s in a.sizes.split(',')]:
    for layout in ('flat', 'vgg_like'):
      for ratio in [int(r) for r in a.ratios.split(',')]:
        t0 = time.perf_counter()
        results.append(measure(d, ratio, layout, a.rounds))
        print(
            f'  d={d} {layout} ratio {ratio}: {time.perf_counter() - t0:.1f}s',
            flush=True,
        )
  rows = [r for res in results for r in rows_of(res)]
  at256 = [r for r in rows if r['ratio'] == 256 and r['compressor'] == 'topk']
  verdict = ', '.join(
      f"d={r['d']} {r['layout']}: {r['x_rbgs_median']:.1f}x" for r in at256
  )
  sel256 = ', '.join(
      f"d={r['d']}: {r['select_x_rbgs']:.0f}x"
      for r in at256
      if 'select_x_rbgs' in r
  )
  notes = (
      f'One worker (axis_name=None), jitted, block_until_ready; {a.rounds} alternating rounds'
      f' on {jax.default_backend()} ({common.machine()["cpu_count"]} CPU cores, possibly shared).'
      ' x_rbgs = time / RBGS time in the same round (median, min, max). aggregate = the'
      " compressor's work in a step, which writes two dense d-vectors (C(A) and the residual)"
      ' whatever the compressor; x_floor = aggregate time / the time of writing just those two'
      ' dense outputs (a zero tree and a negated copy; measured in the same rounds), so 1.0'
      ' means the compressor adds nothing to the unavoidable memory traffic;'
      ' select = choosing and gathering the kept values only.'
      f' Top-K / RBGS at ratio 256, aggregate: {verdict}; selection only: {sel256}'
      ' (target: >= 100x for the aggregate).'
  )
  common.write(
      'compressor_cost',
      {'results': results, 'rows': rows},
      common.table(rows, COLUMNS),
      notes,
  )
  return results


if __name__ == '__main__':
  main()
