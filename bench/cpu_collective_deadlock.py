r"""Reproduces an XLA:CPU deadlock: independent collective programs in flight.

Eight CPU devices; a tree of per-worker arrays (K = 8 rows, sharded over the
devices); the mean over workers of each leaf, dispatched leaf by leaf
(``eager``: one small multi-device program with an all-reduce per leaf, none
depending on another) or as one jitted program (``jit``). Eager dispatch
intermittently deadlocks: the programs' participants interleave across the
device threads so that no rendezvous completes; with XLA's default 40 s
termination timeout the process then aborts (SIGABRT, "Termination timeout
for all reduce"), with defjax's flags it waits up to 30 minutes. It was the
abort behind issue #12 (defjax/training/trainer.py averaged unsynced batch-norm
statistics this way); defjax now runs one collective program at a time
(``defjax.xla_cpu.run_alone``).

  python -m bench.cpu_collective_deadlock [--mode eager|jit] [--tries 5]

Each try runs in a subprocess with a 60 s limit and reports completed /
deadlocked; the outcome depends on the machine's load (on a busy 2-core
machine, 2026-11-29: eager deadlocked in 4 of 6 tries, jit in none).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = r"""
import os, sys
os.environ['XLA_FLAGS'] = ('--xla_force_host_platform_device_count=8'
                           ' --xla_cpu_collective_call_terminate_timeout_seconds=3600')
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
sh = NamedSharding(jax.make_mesh((8,), ('data',)), P('data'))
leaves = [jax.device_put(np.random.rand(8, 64 + i).astype(np.float32), sh) for i in range(40)]
mean_all = jax.jit(lambda xs: [x.mean(0) for x in xs])
for _ in range(20):
  out = [x.mean(0) for x in leaves] if sys.argv[1] == 'eager' else mean_all(leaves)
  jax.block_until_ready(out)
"""


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--mode', choices=('eager', 'jit'), default='eager')
  p.add_argument('--tries', type=int, default=5)
  p.add_argument('--timeout', type=float, default=60.0)
  args = p.parse_args(argv)
  deadlocked = 0
  for i in range(args.tries):
    try:
      subprocess.run(
          [sys.executable, '-c', CHILD, args.mode],
          check=True,
          timeout=args.timeout,
          capture_output=True,
      )
      print(f'try {i + 1}: completed', flush=True)
    except subprocess.TimeoutExpired:
      deadlocked += 1
      print(
          f'try {i + 1}: no progress in {args.timeout:g} s (deadlocked)',
          flush=True,
      )
  print(f'{args.mode}: {deadlocked} of {args.tries} tries deadlocked')
  return 0


if __name__ == '__main__':
  sys.exit(main())
