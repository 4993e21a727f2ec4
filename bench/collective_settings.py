"""The 2-process optimizer + communication step under each process setting.

``bench.collectives`` runs its two worker processes pinned to a core each,
with XLA:CPU's defaults. This benchmark times the same optimizer step of the
15M-parameter MLP (SGD, DEF at ratio 256, and a bare all-reduce of d floats;
K = 2, gloo over loopback, no model compute) under the settings a user can
choose, next to ``bench.peer_torch``'s PyTorch reference (pinned, one thread)
in the same rounds:

* ``pinned``: each process on its own core (the default of both benchmarks);
* ``unpinned``: both processes free to use every core;
* ``unpinned-eigen-1-thread``: the same with XLA:CPU's Eigen thread pool
  off (``--xla_cpu_multi_thread_eigen=false``);
* ``pinned-sync-dispatch``: pinned, with JAX's asynchronous CPU dispatch
  off (``JAX_CPU_ENABLE_ASYNC_DISPATCH=false``).

The collective implementation is not a column: gloo is the only one that
works here (``mpi_collectives`` reports what ``jax_cpu_collectives_implementation
= 'mpi'`` needs).

ms: median over rounds of each launch's median; x_pinned: over ``pinned`` in
the same round (median); vs_torch: over PyTorch's same variant in the same
round (median).

Run: python -m bench.collective_settings [--rounds 3] [--settings pinned,unpinned]
"""

from __future__ import annotations

from bench import common  # noqa: F401  (before jax: the parent's devices)

import statistics  # noqa: E402

RATIO = 256


def settings() -> dict[str, dict]:
  """Environment of each setting's two worker processes (XLA_FLAGS are added
  to ``collectives.launch``'s)."""
  return {
      'pinned': {},
      'unpinned': {'BENCH_PIN': '0'},
      'unpinned-eigen-1-thread': {
          'BENCH_PIN': '0',
          'XLA_FLAGS': '--xla_cpu_multi_thread_eigen=false',
      },
      'pinned-sync-dispatch': {'JAX_CPU_ENABLE_ASYNC_DISPATCH': 'false'},
  }


def mpi_collectives() -> str:
  """Whether jax's MPI collectives start here, in one line (in a child
  process: MPItrampoline exits the process when it finds no MPI)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  code = (
      'from jax._src.lib import _jax\n'
      'c = _jax.make_mpi_collectives(); c.Init(); c.Finalize(); print("available")'
  )
  try:
    done = subprocess.run(
        [sys.executable, '-c', code],
        capture_output=True,
        text=True,
        timeout=120,
    )
  except subprocess.TimeoutExpired:
    return 'not available: MPI initialisation did not finish in 120 s'
  if done.returncode == 0 and 'available' in done.stdout:
    return 'available'
  said = (done.stderr or done.stdout).strip().splitlines()
  return 'not available: ' + ' '.join(said[:2])[:240]


def one_round(names) -> dict:
  from bench import collectives, peer_torch

  out = {}
  for name, env in settings().items():
    if name not in names:
      continue
    res = collectives.launch('mlp', [RATIO], env=env, opt_only=True)
    out[name] = {n: s['median'] for n, s in res['opt_step_s'].items()}
    print(
        f'  {name}: '
        + ', '.join(f'{n} {1e3 * t:.1f} ms' for n, t in out[name].items()),
        flush=True,
    )
  if peer_torch.torch_available():
    times = peer_torch.launch([RATIO])['times']
    out['torch'] = {
        n: common.summarize(s['opt'])['median'] for n, s in times.items()
    }
  return out


def rows_of(rounds: list[dict]) -> list[dict]:
  rows = []
  for name in rounds[0]:
    program = 'PyTorch' if name == 'torch' else 'defjax'
    for variant in rounds[0][name]:
      vals = [r[name][variant] for r in rounds]
      row = {
          'program': program,
          'setting': 'pinned, 1 thread' if name == 'torch' else name,
          'variant': variant,
          'ms': 1e3 * statistics.median(vals),
      }
      if name != 'torch' and 'pinned' in rounds[0]:
        row['x_pinned'] = statistics.median(
            r[name][variant] / r['pinned'][variant] for r in rounds
        )
      if (
          name != 'torch'
          and 'torch' in rounds[0]
          and variant in rounds[0]['torch']
      ):
        row['vs_torch'] = statistics.median(
            r[name][variant] / r['torch'][variant] for r in rounds
        )
      rows.append(row)
  return rows


COLUMNS = ('program', 'setting', 'variant', 'ms', 'x_pinned', 'vs_torch')


def main(argv=None):
  a = common.arguments(__doc__, argv, rounds=3, settings=','.join(settings()))
  names = a.settings.split(',')
  rounds = []
  for r in range(a.rounds):
    print(f'round {r + 1}/{a.rounds}', flush=True)
    rounds.append(one_round(names))
  rows = rows_of(rounds)
  notes = (
      f'{a.rounds} rounds; 15M-parameter MLP, K = 2 processes x 1 CPU device, gloo over'
      ' loopback; optimizer + communication only (bench.collectives --opt-only), DEF at'
      f' ratio {RATIO} with one global block; PyTorch: bench.peer_torch. MPI collectives:'
      f' {mpi_collectives()}.'
  )
  common.write(
      'collective_settings',
      {'rounds': rounds, 'rows': rows},
      common.table(rows, COLUMNS),
      notes,
  )
  return rows


if __name__ == '__main__':
  main()
