"""SGD vs DEF across two OS processes joined by real CPU collectives (gloo).

The parent starts two worker processes, each with one CPU device (pinned to
its own core when the machine has two or more), joined with
``jax.distributed.initialize('127.0.0.1:PORT', num_processes=2,
process_id=i)``. The mesh spans both processes' devices
(``data_parallel.make_layout(2)``), each process builds its own rows of the global
batch with ``jax.make_array_from_process_local_data``, and the all-reduce of
the train step crosses the process boundary through gloo over TCP loopback.

Variants (SGD, DEF at ratios 16..1024) are timed in alternation in both
processes in the same order; process 0's timings are reported. Speedup =
SGD step time / DEF step time in the same round (min / median / max).

Loopback is a fast link (several GB/s) next to the compute of one CPU core,
so this shows where compression stops paying on such a link; the cluster
projection (``bench/cluster_projection.py``) extrapolates to real networks.

Run: python -m bench.collectives [--models vgg16,mlp] [--ratios 16,64,256,1024]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from bench import procs

RATIOS = (16, 64, 256, 1024)
# model -> (per-worker batch, timed rounds, steps per sample)
SETTINGS = {'vgg16': (4, 4, 2), 'mlp': (8, 6, 3)}


def mlp_model():
  """A 3-layer MLP of about 15M parameters on 32x32x3 inputs (no batch norm)."""
  import flax.linen as nn

  class MLP(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, *, train: bool):
      del train
      x = x.reshape(x.shape[0], -1)
      for width in (3072, 1792):
        x = nn.relu(nn.Dense(width)(x))
      return nn.Dense(self.num_classes)(x)

  return MLP()


def worker(
    process_id: int,
    port: int,
    model_name: str,
    ratios,
    out_path: str,
    opt_only: bool = False,
) -> None:
  """One of the two processes: joins the job, times the variants."""
  import jax

  jax.config.update('jax_platforms', 'cpu')
  jax.distributed.initialize(
      f'127.0.0.1:{port}', num_processes=2, process_id=process_id
  )
  from bench import common
  import numpy as np
  from defjax import wire

  batch, rounds, steps = SETTINGS[model_name]
  if model_name == 'mlp':
    setup = common.Setup(
        'mlp', 2, batch, model=mlp_model(), input_shape=(32, 32, 3), classes=10
    )
  else:
    setup = common.Setup(model_name, 2, batch)
  lay = setup.layout
  assert jax.process_count() == 2 and lay.num_devices == 2, (
      jax.process_count(),
      lay.mesh,
  )
  rows = lay.worker_rows()

  def global_replicated(tree):
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(
            lay.replicated, np.asarray(a), a.shape
        ),
        tree,
    )

  x0 = np.zeros((1, *setup.input_shape), np.float32)
  v = jax.jit(
      lambda: setup.model.init(jax.random.PRNGKey(0), x0, train=False),
      out_shardings=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]),
  )()
  v = jax.tree.map(np.asarray, v)

  rng = np.random.default_rng(process_id)
  data = []
  for _ in range(2):
    n = rows.stop - rows.start
    x = rng.normal(size=(n, batch, *setup.input_shape)).astype(np.float32)
    y = rng.integers(0, setup.classes, size=(n, batch)).astype(np.int32)
    data.append(
        (
            jax.make_array_from_process_local_data(
                lay.per_worker, x, (2, batch, *setup.input_shape)
            ),
            jax.make_array_from_process_local_data(
                lay.per_worker, y, (2, batch)
            ),
        )
    )

  variants = {'sgd': common.make_tx('sgd', 1, lay.axis_name)}
  for r in ratios:
    variants[f'def@{r}'] = common.make_tx('def', r, lay.axis_name)
  runners, payload = {}, {}
  for name, tx in variants.items():
    params = global_replicated(v['params'])
    ms = global_replicated({k: w for k, w in v.items() if k != 'params'})
    opt = lay.init_state(tx, params)
    # Compile once and run the compiled executable (a jit call would compile again).
    step = setup.step(tx).lower(params, ms, opt, data[0]).compile()
    payload[name] = sum(
        c.bytes for c in wire.collectives(step) if c.op == 'all-reduce'
    )
    if not opt_only:
      runners[name] = common.step_runner(step, [params, ms, opt], data, steps)
  res = (
      common.alternate(runners, rounds=rounds, baseline='sgd', warmup=1)
      if not opt_only
      else {'times_s': {}, 'ratio_to_sgd': {}, 'raw_s': {}}
  )
  opt = time_optimizer_only(
      variants, v['params'], lay, global_replicated, rounds=max(rounds, 5)
  )
  if process_id == 0:
    out = {
        'model': model_name,
        'd': setup.num_params,
        'batch_per_worker': batch,
        'rounds': rounds,
        'steps_per_sample': steps,
        'payload_bytes': payload,
        'step_s': {
            n: {k: x / steps if k != 'n' else x for k, x in s.items()}
            for n, s in res['times_s'].items()
        },
        'ratio_to_sgd': res['ratio_to_sgd'],
        'raw_sample_s': res['raw_s'],
        'opt_step_s': opt['times_s'],
        'opt_ratio_to_sgd': opt['ratio_to_sgd'],
        'opt_minflt': opt['minflt'],
        'opt_raw_s': opt['raw_s'],
        'devices': [str(d) for d in lay.mesh.devices.flat],
        'collectives_impl': jax.config.jax_cpu_collectives_implementation,
    }
    with open(out_path, 'w') as f:
      json.dump(out, f)
  jax.distributed.shutdown()


def time_optimizer_only(
    variants, params_np, lay, global_replicated, rounds: int
) -> dict:
  """Optimizer + communication only: ``tx.update`` on given gradients, the
  all-reduce, ``apply_updates`` and the next gradient point (eval_point), with
  no model compute. The counterpart of ``bench/peer_torch.py``'s timing."""
  import jax
  import numpy as np
  import optax
  from jax.sharding import PartitionSpec as P
  from bench import common
  from defjax import feedback

  rng = np.random.default_rng(jax.process_index())
  grads = jax.tree.map(
      lambda a: jax.make_array_from_process_local_data(
          lay.per_worker,
          rng.normal(size=(1, *a.shape)).astype(np.float32),
          (2, *a.shape),
      ),
      params_np,
  )
  runners = {}
  for name, tx in variants.items():

    def worker(params, opt_state, grads, tx=tx):
      updates, opt_state = tx.update(grads, opt_state, params)
      return updates, opt_state

    # The optimizer mapped over the device's worker exactly as the train step
    # maps it (the update is equal on all workers: one copy, out_axes None).
    mapped = lay.map_workers(worker, in_axes=(None, 0, 0), out_axes=(None, 0))

    def local(params, opt_state, grads, mapped=mapped):
      updates, opt_state = mapped(params, opt_state, grads)
      params = optax.apply_updates(params, updates)
      point = feedback.eval_point(
          params, jax.tree.map(lambda x: x[0], opt_state)
      )
      return params, opt_state, point

    fn = jax.jit(
        jax.shard_map(
            local,
            mesh=lay.mesh,
            in_specs=(P(), P(lay.axis), P(lay.axis)),
            out_specs=(P(), P(lay.axis), P()),
            check_vma=False,
        ),
        donate_argnums=(0, 1),
    )
    params = global_replicated(params_np)
    state = [params, lay.init_state(tx, params)]

    def run(fn=fn, state=state):
      state[0], state[1], point = fn(state[0], state[1], grads)
      jax.block_until_ready((state, point))

    runners[name] = run
  # A bare all-reduce of d floats: the collective itself, for comparison.
  d = sum(a.size for a in jax.tree.leaves(params_np))
  flat = jax.make_array_from_process_local_data(
      lay.per_worker, np.ones((1, d), np.float32), (2, d)
  )
  psum = jax.jit(
      jax.shard_map(
          lambda g: jax.lax.psum(g, lay.axis),
          mesh=lay.mesh,
          in_specs=P(lay.axis),
          out_specs=P(lay.axis),
          check_vma=False,
      )
  )
  runners['allreduce_only'] = lambda: jax.block_until_ready(psum(flat))
  runners, faults = common.count_faults(runners)
  res = common.alternate(runners, rounds=rounds, baseline='sgd', warmup=1)
  res['minflt'] = {
      n: common.summarize(f[1:]) for n, f in faults.items()
  }  # after warm-up
  return res


def launch(
    model_name: str,
    ratios,
    timeout_s: float = 540,
    env=None,
    opt_only: bool = False,
) -> dict:
  """Starts the two worker processes and returns process 0's measurements.

  ``env``: more environment for the workers (``bench/allocator.py`` sets
  LD_PRELOAD); its XLA_FLAGS are added to the workers' own
  (``bench/collective_settings.py``)."""
  env = dict(env or {})
  # One CPU device per process; the parent's 8-device flag must not leak in.
  flags = [
      f
      for f in os.environ.get('XLA_FLAGS', '').split()
      if 'xla_force_host_platform_device_count' not in f
  ]
  flags += [
      '--xla_force_host_platform_device_count=1',
      *env.pop('XLA_FLAGS', '').split(),
  ]
  env = {'XLA_FLAGS': ' '.join(flags), 'JAX_PLATFORMS': 'cpu', **env}
  return procs.run_pair(
      'bench.collectives',
      ['--models', model_name, '--ratios', ','.join(map(str, ratios))]
      + (['--opt-only'] if opt_only else []),
      env,
      timeout_s,
  )


def rows_of(result: dict) -> list[dict]:
  rows = []
  for name, s in result['step_s'].items():
    r = result['ratio_to_sgd'].get(name)
    rows.append(
        {
            'model': result['model'],
            'd': result['d'],
            'batch': result['batch_per_worker'],
            'variant': name,
            'payload_bytes': result['payload_bytes'][name],
            'step_ms_median': 1e3 * s['median'],
            # speedup = SGD time / variant time, so invert the per-round ratios.
            'speedup_median': 1 / r['median'] if r else 1.0,
            'speedup_min': 1 / r['max'] if r else 1.0,
            'speedup_max': 1 / r['min'] if r else 1.0,
            'opt_ms_median': 1e3 * result['opt_step_s'][name]['median'],
        }
    )
  ar = result['opt_step_s'].get('allreduce_only')
  if ar:
    rows.append(
        {
            'model': result['model'],
            'd': result['d'],
            'variant': 'allreduce_only (d floats)',
            'payload_bytes': 4 * result['d'],
            'opt_ms_median': 1e3 * ar['median'],
        }
    )
  return rows


COLUMNS = (
    'model',
    'd',
    'batch',
    'variant',
    'payload_bytes',
    'step_ms_median',
    'speedup_median',
    'speedup_min',
    'speedup_max',
    'opt_ms_median',
)


def main(argv=None):
  p = procs.parser(__doc__, RATIOS)
  p.add_argument('--models', default='vgg16,mlp')
  # Workers only: time the optimizer step and the bare all-reduce, not the
  # train step (bench.collective_settings).
  p.add_argument('--opt-only', action='store_true', help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  ratios = a.ratios
  if a.rank is not None:
    procs.pin_to_core(a.rank)
    worker(a.rank, a.port, a.models, ratios, a.out, opt_only=a.opt_only)
    return None
  from bench import common

  results = []
  for m in a.models.split(','):
    t0 = time.perf_counter()
    results.append(launch(m, ratios))
    print(f'{m}: {time.perf_counter() - t0:.0f}s', flush=True)
  rows = [r for res in results for r in rows_of(res)]
  notes = (
      '2 processes x 1 CPU device, each pinned to its own core, joined by jax.distributed;'
      f' CPU collectives: {results[0]["collectives_impl"]} over TCP loopback. Speedup = SGD step'
      ' time / DEF step time in the same round (min/median/max). A speedup below 1 means'
      ' compression does not pay on this link: the compute and RBGS bookkeeping cost more than the'
      ' saved transfer. opt_ms: optimizer + communication only (tx.update, all-reduce,'
      ' apply_updates, next eval_point) on given gradients, no model compute; allreduce_only: a bare'
      ' psum of d floats across the two processes.'
  )
  common.write(
      'collectives',
      {'results': results, 'rows': rows},
      common.table(rows, COLUMNS),
      notes,
  )
  return results


if __name__ == '__main__':
  main()
