"""Two cooperating OS processes, for the benchmarks with real collectives.

``bench.collectives`` (jax.distributed) and ``bench.peer_torch``
(torch.distributed) both start themselves twice as workers on a free
loopback port, pin each worker to its own core and read worker 0's
measurements back from a JSON file. No JAX import here: the PyTorch workers
must not start JAX.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def pin_to_core(index: int) -> None:
  """Pins this process to core ``index`` when the machine has that core, so
  that the two workers do not share one; BENCH_PIN=0 in the environment
  leaves both free (``bench.collective_settings`` compares the two)."""
  if os.environ.get('BENCH_PIN', '1') == '0':
    return
  if index < os.cpu_count() and hasattr(os, 'sched_setaffinity'):
    os.sched_setaffinity(0, {index})


def parser(description: str, ratios: Sequence[int]) -> argparse.ArgumentParser:
  """The command line of a two-process benchmark: ``--ratios`` for the user,
  and the hidden ``--rank``, ``--port`` and ``--out`` that ``run_pair`` gives
  the workers it starts (``--rank`` set means: be that worker)."""
  p = argparse.ArgumentParser(
      description=description,
      formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
      '--ratios',
      type=lambda s: [int(r) for r in s.split(',')],
      default=list(ratios),
  )
  for name in ('--rank', '--port'):
    p.add_argument(name, type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument('--out', default=None, help=argparse.SUPPRESS)
  return p


def run_pair(
    module: str,
    worker_args: Sequence[str],
    env: Optional[dict] = None,
    timeout_s: float = 540,
) -> dict:
  """Runs ``python -m module *worker_args --rank i --port PORT --out FILE`` for
  i = 0, 1 and returns the JSON that worker 0 wrote to FILE.

  ``env`` is added to this process's environment (the project root is put on
  PYTHONPATH). Raises RuntimeError if a worker fails; both are killed when the
  time is up.
  """
  port = free_port()
  fd, out_path = tempfile.mkstemp(suffix='.json')
  os.close(fd)
  full_env = dict(os.environ, **(env or {}))
  full_env['PYTHONPATH'] = ROOT + os.pathsep + os.environ.get('PYTHONPATH', '')
  try:
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                '-m',
                module,
                *worker_args,
                '--rank',
                str(i),
                '--port',
                str(port),
                '--out',
                out_path,
            ],
            env=full_env,
            cwd=ROOT,
        )
        for i in range(2)
    ]
    deadline = time.time() + timeout_s
    try:
      for i, p in enumerate(procs):
        rc = p.wait(timeout=max(1, deadline - time.time()))
        if rc != 0:
          raise RuntimeError(f'{module} worker {i} exited with {rc}')
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
    with open(out_path) as f:
      return json.load(f)
  finally:
    os.remove(out_path)
