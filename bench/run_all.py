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
README = ROOT / 'README.md'
# The README's Performance tables live between these markers; run_all rewrites
# them from bench/results/*.json (tests/test_bench.py checks they agree).
BEGIN = '<!-- bench:begin: written by python -m bench.run_all from bench/results; do not edit -->'
END = '<!-- bench:end -->'
# In order: cluster_projection reads overhead.json.
BENCHMARKS = ('wire_bytes', 'overhead', 'opt_bytes', 'dispatch', 'local_workers', 'compressor_cost',
              'collectives', 'cluster_projection', 'peer_torch', 'allocator',
              'collective_settings')
# Written by `make bench-link` (root, about an hour and a half), never by
# run_all; first in the summary and the README: the speed over a slow link.
LINK_BENCHMARKS = ('slow_link', 'slow_link_train')
# Written by `make bench-gpu` (python -m bench.gpu) on a GPU machine, never by
# run_all; its table joins the summary and the README once its JSON exists.
ACCELERATOR_BENCHMARKS = ('gpu',)
TIMEOUT_S = 900
# allocator runs every part in fresh processes per allocator and round.
TIMEOUTS_S = {'allocator': 3600, 'collective_settings': 3600}


def run_one(name: str, args=()) -> dict:
  cmd = [sys.executable, '-m', f'bench.{name}', *args]
  env = dict(os.environ)
  env['PYTHONPATH'] = str(ROOT) + os.pathsep + env.get('PYTHONPATH', '')
  t0 = time.perf_counter()
  print(f'=== {name}: {" ".join(cmd[1:])}', flush=True)
  try:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=TIMEOUTS_S.get(name, TIMEOUT_S),
                          capture_output=True, text=True)
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


def _provenance(doc: dict) -> str:
  m = doc['machine']
  load = f', load average {m["loadavg"][0]:g} at the end' if m.get('loadavg') else ''
  return (f'{doc["date"][:16].replace("T", " ")} UTC; {m["cpu_count"]}-CPU {m["backend"]}'
          f' machine ({m["device_kind"]} x {m["num_devices"]}), jax {m["jax"]}{load};'
          f' `{doc["command"]}`')


def _wire_pivot(doc: dict) -> str:
  """All-reduce bytes per step of SGD and DEF (EF, SAEF and PSync compile to
  DEF's program) against the limit ceil(d / ratio) x 4 + BN statistics."""
  from bench import common
  rows = doc['rows']
  ratios = sorted({r['ratio'] for r in rows})
  out = []
  for model in dict.fromkeys(r['model'] for r in rows):
    for method in ('sgd', 'def', 'limit'):
      row = {'model': model, 'row': method}
      for r in rows:
        if r['model'] == model and r['method'] == ('def' if method == 'limit' else method):
          row[f'r={r["ratio"]:g}'] = r['limit_bytes' if method == 'limit' else 'all_reduce_bytes']
      out.append(row)
  verdicts = [r['verdict'] for r in rows]
  return (common.table(out, ['model', 'row'] + [f'r={r:g}' for r in ratios]) + '\n\n'
          f'{verdicts.count("equal")}/{len(rows)} (model, method, ratio) programs all-reduce exactly'
          f' the limit, {verdicts.count("below")} fewer bytes, {verdicts.count("above")} more.')


def _projection_subset(doc: dict) -> str:
  from bench import common
  rows = [r for r in doc['rows'] if r['K'] == 16]
  cols = ['scenario', 'K', 'gbps', 'sgd_step_ms', 'sgd_comm_frac', 'def@16', 'def@64', 'def@256',
          'def@1024']
  return common.table(rows, cols) + '\n\nK = 16 rows only; all K and the plot: bench/results/.'


def readme_section(results: pathlib.Path = RESULTS) -> str:
  """The README's Performance tables, from the benchmark JSON files only."""
  parts = [BEGIN, '']
  for name in LINK_BENCHMARKS + BENCHMARKS + ACCELERATOR_BENCHMARKS:
    path = results / f'{name}.json'
    if not path.exists():
      continue
    doc = json.loads(path.read_text())
    if name == 'wire_bytes':
      body = _wire_pivot(doc)
    elif name == 'cluster_projection':
      body = _projection_subset(doc)
    else:
      body = doc['table_md']
    parts += [f'#### {name}', '', _provenance(doc), '', body, '']
  parts.append(END)
  return '\n'.join(parts)


def update_readme(readme: pathlib.Path = README, results: pathlib.Path = RESULTS) -> bool:
  """Replaces the text between the markers; False if the README has none."""
  text = readme.read_text()
  if BEGIN not in text or END not in text:
    return False
  head, rest = text.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  readme.write_text(head + readme_section(results) + tail)
  return True


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
  for n in LINK_BENCHMARKS + BENCHMARKS + ACCELERATOR_BENCHMARKS:
    if (RESULTS / f'{n}.json').exists() or n in runs:
      parts.append(section(n, runs.get(n)))
  (RESULTS / 'summary.md').write_text('\n'.join(parts))
  print(f'wrote {RESULTS / "summary.md"}')
  if update_readme():
    print(f'updated the Performance tables in {README}')
  failed = [n for n, r in runs.items() if r['rc'] != 0]
  if failed:
    print('failed: ' + ', '.join(failed))
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
