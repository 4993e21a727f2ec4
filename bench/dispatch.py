"""Steps per dispatch: time per training step for n steps per compiled call.

Each variant trains the quick start's model and setting (Fashion-MNIST CNN,
K = 8 workers x 16 examples, DEF at ratio 256 with per-leaf blocks)
as the trainer does: per dispatch, the host batch of n steps goes to the
devices, one call runs the n steps (``make_train_step(multi_step=True)``, a
``lax.scan``), and the n losses come back to the host before the next call
(on CPU the trainer syncs every dispatch). ``single`` is the plain one-step
program (``multi_step=False``), dispatched and synced every step; ``n=16
unrolled`` unrolls the scan at compile time. Variants
are timed in alternation, each over the same number of steps; the ratio to
``single`` is taken within each round.

The trainer's CPU default (trainer.AUTO_STEPS_PER_DISPATCH) comes from this.

Run: python -m bench.dispatch [--quick]
"""

from __future__ import annotations

from bench import common  # noqa: F401  (sets 8 host devices before jax)

import argparse  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import defjax  # noqa: E402

# (name, steps per dispatch (0: the plain one-step program), lax.scan unroll)
VARIANTS = (
    ('single', 0, 1),
    ('n=1', 1, 1),
    ('n=16', 16, 1),
    ('n=16 unrolled', 16, True),
)


def runner(setup, tx, n, steps, rng, unroll=1):
  """``steps`` training steps, n per dispatch (n = 0: the plain step)."""
  params, ms = setup.variables()
  state = [params, ms, setup.layout.init_state(tx, params)]
  step = setup.layout.train_step(
      setup.loss_fn, tx, multi_step=n > 0, unroll=unroll
  )
  k, b = setup.layout.num_workers, setup.batch
  per = max(n, 1)
  x = rng.normal(size=(per, k, b, *setup.input_shape)).astype(np.float32)
  y = rng.integers(0, setup.classes, size=(per, k, b)).astype(np.int32)
  if n == 0:
    x, y = x[0], y[0]
  sharding = setup.layout.per_step_and_worker if n else setup.layout.per_worker

  def run():
    for _ in range(steps // per):
      batch = jax.device_put(
          (x, y), sharding
      )  # host -> devices, as the trainer
      state[0], state[1], state[2], loss = step(
          state[0], state[1], state[2], batch
      )
      np.asarray(
          loss
      )  # the trainer reads the losses after every dispatch on CPU

  return run


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--quick', action='store_true')
  args = parser.parse_args()
  rounds, steps = (2, 32) if args.quick else (3, 64)
  setup = common.Setup('cnn', 8, 16)
  rng = np.random.default_rng(0)
  rows, result = [], {
      'settings': {
          'model': 'cnn',
          'num_workers': 8,
          'batch': 16,
          'steps_per_sample': steps,
          'rounds': rounds,
      }
  }
  for method in ('def',):
    compressor = defjax.rbgs(256, per_leaf=True) if method == 'def' else None
    tx = common.make_tx(
        method, 256, setup.layout.axis_name, compressor=compressor
    )
    runners = {
        name: runner(setup, tx, n, steps, rng, unroll)
        for name, n, unroll in VARIANTS
    }
    timed = common.alternate(runners, rounds, baseline='single')
    result[method] = timed
    for name in runners:
      t = timed['times_s'][name]
      ratio = timed['ratio_to_single'].get(name)
      rows.append(
          {
              'method': method,
              'variant': name,
              'ms/step (median)': round(1000 * t['median'] / steps, 2),
              'min': round(1000 * t['min'] / steps, 2),
              'max': round(1000 * t['max'] / steps, 2),
              'x single (median)': round(ratio['median'], 3) if ratio else 1.0,
          }
      )
  table = common.table(rows, list(rows[0]))
  notes = (
      'single: the one-step program, one dispatch and one host sync per step'
      ' (the trainer with steps_per_dispatch=1). n=N: N steps in one lax.scan call,'
      ' one sync per call (the trainer with steps_per_dispatch=N); unrolled: the'
      ' same with the loop unrolled at compile time.'
  )
  common.write('dispatch', result, table, notes)
  print(table)


if __name__ == '__main__':
  main()
