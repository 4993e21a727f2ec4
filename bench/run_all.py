"""Runs every benchmark in sequence and writes bench/results/summary.md.

Each benchmark runs in its own process (the device count is fixed when JAX
starts, and the collectives benchmark starts processes of its own), writes
``bench/results/<name>.json`` and prints its table; the summary collects one
section per benchmark: the table, the date, the machine and the exact command.

Run: python -m bench.run_all [--only wire_bytes,overhead] [--skip peer_torch] [--summary-only]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / 'bench' / 'results'
# In order: cluster_projection reads overhead.json.
BENCHMARKS = ('wire_bytes', 'overhead', 'compressor_cost', 'collectives', 'cluster_projection',
              'peer_torch')
TIMEOUT_S = 900


def run_one(name: str, args=()) -> dict:
  cmd = [sys.executable, '-m', f'bench.{name}', *args]
  env = dict(os.environ)
  env['PYTHONPATH'] = str(ROOT) + os.pathsep + env.get('PYTHONPATH', '')
  t0 = time.perf_counter()
  print(f'=== {name}: {" ".join(cmd[1:])}', flush=True)
  try:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=TIMEOUT_S, capture_output=True, text=True)
    rc, out = proc.returncode, proc.stdout + proc.stderr
  except subprocess.TimeoutExpired as e:
    rc, out = 'timeout', (e.stdout or b'').decode() if isinstance(e.stdout, bytes) else (e.stdout or '')
  wall = time.perf_counter() - t0
  print(out[-3000:], flush=True)
  print(f'=== {name}: rc={rc} in {wall:.0f}s', flush=True)
  return {'name': name, 'rc': rc, 'wall_s': wall, 'tail': out[-2000:]}


def section(name: str, run: dict | None) -> str:
  path = RESULTS / f'{name}.json'
  lines = [f'## {name}', '']
  fresh = path.exists() and (run is None or run['rc'] == 0)
  if not fresh:
    lines += [f'Did not produce results (rc={run["rc"] if run else "not run"}).', '']
    if run:
      lines += ['```', run['tail'].strip()[-1500:], '```', '']
    return '\n'.join(lines)
  doc = json.loads(path.read_text())
  m = doc['machine']
  lines += [
      f'- date: {doc["date"]}',
      f'- machine: {m["platform"]}, {m["cpu_count"]} CPUs, jax {m["jax"]}, backend'
      f' {m["backend"]} ({m["device_kind"]} x {m["num_devices"]})'
      + (f', load average {m["loadavg"][0]} at the end' if m.get('loadavg') else ''),
      f'- command: `{doc["command"]}`' + (f' (wall {run["wall_s"]:.0f} s)' if run else ''),
      '',
      doc['table_md'],
      '',
  ]
  if doc.get('notes'):
    lines += [doc['notes'], '']
  return '\n'.join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument('--only', default=None, help='comma-separated subset')
  p.add_argument('--skip', default='', help='comma-separated benchmarks to skip')
  p.add_argument('--note', default='', help='a line for the summary header (e.g. machine load)')
  p.add_argument('--summary-only', action='store_true',
                 help='rebuild summary.md from the JSON files already in bench/results')
  a = p.parse_args(argv)
  names = a.only.split(',') if a.only else list(BENCHMARKS)
  names = [n for n in names if n not in a.skip.split(',')]
  if a.summary_only:
    names = []
  runs = {}
  for n in names:
    if not (ROOT / 'bench' / f'{n}.py').exists():
      continue
    runs[n] = run_one(n)
  RESULTS.mkdir(parents=True, exist_ok=True)
  now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
  parts = [
      '# defjax benchmarks', '',
      f'Written by `python -m bench.run_all` on {now}. Timings on a shared or small machine are'
      ' noisy: every ratio is measured within alternating rounds (A B A B) and reported as'
      ' min / median / max; compare ratios, not absolute times.', '',
  ]
  if a.note:
    parts += [a.note, '']
  for n in BENCHMARKS:
    if (RESULTS / f'{n}.json').exists() or n in runs:
      parts.append(section(n, runs.get(n)))
  (RESULTS / 'summary.md').write_text('\n'.join(parts))
  print(f'wrote {RESULTS / "summary.md"}')
  failed = [n for n, r in runs.items() if r['rc'] != 0]
  if failed:
    print('failed: ' + ', '.join(failed))
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
