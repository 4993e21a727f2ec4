"""Memory traffic of the optimizer and the train step as XLA compiles them:
what DEF's bookkeeping costs next to SGD, measured without a clock.

The optimizer step (``tx.update`` on given gradients, ``apply_updates`` and
the next gradient point z = x - lam e) is a few elementwise passes over d
values, so its time is its memory traffic. For each variant this compiles
the step and reports XLA's own count of bytes accessed (``cost_analysis``),
in units of one d-float vector, next to the floor of the algorithm:

* SGD reads g, m, x and writes m, x: 5;
* DEF reads g, m, x, e and writes m, e and the next gradient point z (x
  changes only on the block): 7. EF, SAEF and PSync compile to DEF's
  program (lam is state), so they count what DEF counts.

``copies`` counts the full-size copy instructions XLA inserted (a donated
buffer that is still read after its new value is written is copied first).
Parts: the optimizer alone on one device (what ``bench.overhead`` times as
optimizer-only) for VGG-16 (CIFAR) and the ~15M-parameter MLP of
``bench.collectives`` / ``bench.peer_torch``; and the whole train step
(``DataParallelLayout.train_step``, K = 8 on 8 CPU devices), whose bytes include
the model's, so that what DEF adds is the difference to SGD. Deterministic:
nothing is timed, so a loaded machine gives the same table.

Run: python -m bench.opt_bytes [--models vgg16,mlp] [--step-models vgg16,cnn] [--ratio 256]
"""

from __future__ import annotations

import re

from bench import common

import jax  # noqa: E402  (after bench.common: 8 CPU devices)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import defjax  # noqa: E402
from defjax import feedback  # noqa: E402

# variant -> (method, per-leaf blocks); 'def' is the library's default block.
VARIANTS = {
    'sgd': ('sgd', False),
    'def': ('def', False),
    'def_per_leaf': ('def', True),
}
FLOOR = {'sgd': 5, 'def': 7}


def abstract_params(model: str):
  if model == 'mlp':
    from bench import collectives

    x0 = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    return jax.eval_shape(
        lambda x: collectives.mlp_model().init(
            jax.random.PRNGKey(0), x, train=False
        ),
        x0,
    )['params']
  return common.Setup(model, 1, 1).abstract_params


def optimizer_step(tx):
  """The jitted optimizer step on one device, as ``bench.overhead`` times it."""

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    point = feedback.eval_point(params, state)
    # SGD's point is x itself: returning it would only add an output copy.
    return (params, state) if point is params else (params, state, point)

  return jax.jit(step, donate_argnums=(0, 1))


def make_tx(variant: str, ratio: float, axis_name):
  method, per_leaf = VARIANTS[variant]
  compressor = (
      defjax.rbgs(ratio, per_leaf=per_leaf) if method != 'sgd' else None
  )
  return method, common.make_tx(method, ratio, axis_name, compressor=compressor)


def traffic(compiled, d: int) -> tuple[float, int]:
  """Bytes accessed / 4d, and the full-size copies (>= 1% of d values)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  sizes = [
      int(np.prod([int(n) for n in dims.split(',') if n] or [1]))
      for dims in re.findall(
          r'= f32\[([0-9,]*)\]\{[0-9,]*\} copy\(', compiled.as_text()
      )
  ]
  return float(cost['bytes accessed']) / (4 * d), sum(
      s >= 0.01 * d for s in sizes
  )


def optimizer_only(model: str, variant: str, ratio: float) -> dict:
  params = abstract_params(model)
  d = common.abstract_size(params)
  method, tx = make_tx(variant, ratio, None)
  state = jax.eval_shape(tx.init, params)
  bytes_d, copies = traffic(
      optimizer_step(tx).lower(params, state, params).compile(), d
  )
  return {
      'part': 'optimizer',
      'model': model,
      'd': d,
      'variant': variant,
      'bytes_d': bytes_d,
      'floor_d': FLOOR[method],
      'copies': copies,
  }


def train_step(
    model: str, batch: int, variant: str, ratio: float, workers: int = 8
) -> dict:
  """The whole train step (``DataParallelLayout.train_step``, K workers on K CPU
  devices): its bytes include the model's; what DEF adds is the difference."""
  setup = common.Setup(model, workers, batch)
  _, tx = make_tx(variant, ratio, setup.layout.axis_name)
  bytes_d, copies = traffic(
      setup.step(tx).lower(*setup.abstract_args(tx)).compile(), setup.num_params
  )
  return {
      'part': f'train step, batch {batch}',
      'model': model,
      'd': setup.num_params,
      'variant': variant,
      'bytes_d': bytes_d,
      'copies': copies,
  }


COLUMNS = (
    'part',
    'model',
    'd',
    'variant',
    'bytes_d',
    'floor_d',
    'x_sgd',
    'floor_x_sgd',
    'plus_sgd',
    'copies',
)


def main(argv=None):
  a = common.arguments(
      __doc__,
      argv,
      models='vgg16,mlp',
      step_models='vgg16,cnn',
      batch=16,
      ratio=256.0,
  )
  groups = [
      [optimizer_only(m, v, a.ratio) for v in VARIANTS]
      for m in a.models.split(',')
      if m
  ]
  groups += [
      [train_step(m, a.batch, v, a.ratio) for v in VARIANTS]
      for m in a.step_models.split(',')
      if m
  ]
  rows = []
  for group in groups:
    sgd = group[0]
    for r in group:
      r['x_sgd'] = r['bytes_d'] / sgd['bytes_d']
      r['plus_sgd'] = r['bytes_d'] - sgd['bytes_d']
      if 'floor_d' in r:
        r['floor_x_sgd'] = r['floor_d'] / sgd['floor_d']
    rows += group
  notes = (
      f'RBGS ratio {a.ratio:g}, lam 0.3, momentum SGD with weight decay. bytes_d: bytes XLA'
      ' accesses in the compiled program (cost_analysis) / 4d, i.e. in passes over one'
      ' d-float vector; floor_d: what the optimizer must read and write (SGD 5, DEF 7; EF, SAEF'
      " and PSync compile to DEF's program);"
      " x_sgd and plus_sgd: over / minus SGD's bytes_d in the same part; copies: full-size"
      ' copy instructions (of at least 1% of d values). optimizer: tx.update + apply_updates +'
      ' the next gradient point on one device; train step: DataParallelLayout.train_step with K = 8'
      ' workers on 8 CPU devices. Nothing is timed.'
  )
  common.write('opt_bytes', {'rows': rows}, common.table(rows, COLUMNS), notes)
  return rows


if __name__ == '__main__':
  main()
