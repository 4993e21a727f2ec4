"""Runs every benchmark in sequence and writes bench/results/summary.md.

Each benchmark runs in its own process (the device count is fixed when JAX
starts, and the collectives benchmark starts processes of its own), writes
``bench/results/<name>.json`` and prints its table; the summary collects one
section per benchmark: the table, the date, the machine and the exact command.

Every table also goes to docs/benchmarks.md and the slow-link headline to the
README's Performance section (between their markers; --summary-only rebuilds
all three from the JSON files without running anything).

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
# Every recorded table lives on the docs page between these markers, and the
# README's Performance section opens with the headline between the second pair;
# run_all rewrites both from bench/results/*.json (tests/test_bench.py checks
# they agree), so no number in either is typed by hand.
PAGE = ROOT / 'docs' / 'benchmarks.md'
BEGIN = '<!-- bench:begin: written by python -m bench.run_all from bench/results; do not edit -->'
END = '<!-- bench:end -->'
HEADLINE_BEGIN = (
    '<!-- bench:headline:begin: written by python -m bench.run_all from'
    ' bench/results; do not edit -->'
)
HEADLINE_END = '<!-- bench:headline:end -->'
# In order: cluster_projection reads overhead.json.
BENCHMARKS = (
    'wire_bytes',
    'overhead',
    'opt_bytes',
    'dispatch',
    'local_workers',
    'compressor_cost',
    'collectives',
    'cluster_projection',
    'peer_torch',
    'allocator',
    'collective_settings',
)
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
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env=env,
        timeout=TIMEOUTS_S.get(name, TIMEOUT_S),
        capture_output=True,
        text=True,
    )
    rc, out = proc.returncode, proc.stdout + proc.stderr
  except subprocess.TimeoutExpired as e:
    rc, out = 'timeout', (e.stdout or b'').decode() if isinstance(
        e.stdout, bytes
    ) else (e.stdout or '')
  wall = time.perf_counter() - t0
  print(out[-3000:], flush=True)
  print(f'=== {name}: rc={rc} in {wall:.0f}s', flush=True)
  return {'name': name, 'rc': rc, 'wall_s': wall, 'tail': out[-2000:]}


def section(name: str, run: dict | None) -> str:
  path = RESULTS / f'{name}.json'
  lines = [f'## {name}', '']
  fresh = path.exists() and (run is None or run['rc'] == 0)
  if not fresh:
    lines += [
        f'Did not produce results (rc={run["rc"] if run else "not run"}).',
        '',
    ]
    if run:
      lines += ['```', run['tail'].strip()[-1500:], '```', '']
    return '\n'.join(lines)
  doc = json.loads(path.read_text())
  m = doc['machine']
  lines += [
      f'- date: {doc["date"]}',
      f'- machine: {m["platform"]}, {m["cpu_count"]} CPUs, jax {m["jax"]}, backend'
      f' {m["backend"]} ({m["device_kind"]} x {m["num_devices"]})'
      + (
          f', load average {m["loadavg"][0]} at the end'
          if m.get('loadavg')
          else ''
      ),
      f'- command: `{doc["command"]}`'
      + (f' (wall {run["wall_s"]:.0f} s)' if run else ''),
      '',
      doc['table_md'],
      '',
  ]
  if doc.get('notes'):
    lines += [doc['notes'], '']
  return '\n'.join(lines)


def _provenance(doc: dict) -> str:
  m = doc['machine']
  load = (
      f', load average {m["loadavg"][0]:g} at the end'
      if m.get('loadavg')
      else ''
  )
  # A table rebuilt from earlier measurements names the command that measured,
  # its time and the highest load it saw.
  by = doc.get('measured_by') or doc
  if 'loadavg' in by:
    load = f', load average at most {by["loadavg"]:.2f}'
  return (
      f'{by["date"][:16].replace("T", " ")} UTC; {m["cpu_count"]}-CPU {m["backend"]}'
      f' machine ({m["device_kind"]} x {m["num_devices"]}), jax {m["jax"]}{load};'
      f' `{by["command"]}`'
  )


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
        if r['model'] == model and r['method'] == (
            'def' if method == 'limit' else method
        ):
          row[f'r={r["ratio"]:g}'] = r[
              'limit_bytes' if method == 'limit' else 'all_reduce_bytes'
          ]
      out.append(row)
  verdicts = [r['verdict'] for r in rows]
  return (
      common.table(out, ['model', 'row'] + [f'r={r:g}' for r in ratios])
      + '\n\n'
      f'{verdicts.count("equal")}/{len(rows)} (model, method, ratio) programs all-reduce exactly'
      f' the limit, {verdicts.count("below")} fewer bytes, {verdicts.count("above")} more.'
  )


def _projection_subset(doc: dict) -> str:
  from bench import cluster_projection
  from bench import common

  rows = [r for r in doc['rows'] if r['K'] == 16]
  # DEF's columns only: EF's time to accuracy and PSync stay on the full table.
  cols = cluster_projection.COLUMNS[
      : cluster_projection.COLUMNS.index('def@1024') + 1
  ]
  return (
      common.table(rows, cols)
      + '\n\nK = 16 rows only; all K and the plot: bench/results/.'
  )


def tables_section(results: pathlib.Path = RESULTS) -> str:
  """Every recorded table, for the benchmarks page, from the JSON files only."""
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
    parts += [f'### {name}', '', _provenance(doc), '', body, '']
  parts.append(END)
  return '\n'.join(parts)


def _row(rows, setting, rate, variant):
  for r in rows:
    if (r['setting'], r['rate'], r['variant']) == (setting, rate, variant):
      return r
  return None


def headline(results: pathlib.Path = RESULTS) -> str:
  """The README's headline: VGG-16 over the slow link against the peers, and
  time to accuracy, from slow_link.json and slow_link_train.json."""
  from bench import common

  parts = [HEADLINE_BEGIN, '']
  path = results / 'slow_link.json'
  if path.exists():
    doc = json.loads(path.read_text())
    rows = []
    for rate in ('none', '1gbit', '100mbit'):
      row = {
          'link': (
              'unthrottled' if rate == 'none' else rate.replace('bit', 'bit/s')
          )
      }
      for label, setting, variant in (
          ('SGD', 'vgg16 M=1 jax', 'sgd'),
          ('DEF@256', 'vgg16 M=1 jax', 'def@256'),
          ('DDP', 'vgg16 M=1 torch', 'ddp'),
          ('PowerSGD r4', 'vgg16 M=1 torch', 'powersgd@4'),
      ):
        r = _row(doc['rows'], setting, rate, variant)
        if r:
          row[f'{label} ms'] = r['step_ms']
          if rate != 'none':
            row[f'{label} link adds ms'] = r['link_added_ms']
          if label == 'DEF@256' and r.get('speedup'):
            row['DEF@256 speedup'] = r['speedup']
      rows.append(row)
    cols = [
        'link',
        'SGD ms',
        'DEF@256 ms',
        'DEF@256 speedup',
        'DDP ms',
        'PowerSGD r4 ms',
        'SGD link adds ms',
        'DEF@256 link adds ms',
        'DDP link adds ms',
        'PowerSGD r4 link adds ms',
    ]
    sgd = _row(doc['rows'], 'vgg16 M=1 jax', '100mbit', 'sgd')
    dfx = _row(doc['rows'], 'vgg16 M=1 jax', '100mbit', 'def@256')
    parts += [
        'Whole train steps of VGG-16 (d = 15.25M, batch 4 per worker) as two processes of one'
        ' CPU device in network namespaces joined by a throttled veth pair (defjax in JAX;'
        ' DDP and its PowerSGD hook in PyTorch, whose CPU step is faster, so compare the time the'
        ' link adds, not the step times across frameworks). Medians over alternating rounds; '
        + _provenance(doc)
        + '.',
        '',
        common.table(rows, [c for c in cols if any(c in r for r in rows)]),
        '',
    ]
    if sgd and dfx:
      parts += [
          f'At 100 Mbit/s the link carries {sgd["link_MB_0to1"]:.1f} MB per SGD step each way and'
          f' {dfx["link_MB_0to1"]:.2f} MB per DEF@256 step (kernel counters;'
          f' {sgd["measured_vs_formula"]:.2f}x and {dfx["measured_vs_formula"]:.2f}x the formula'
          f' written before measuring); DEF@256 steps {dfx["speedup"]:.1f}x faster than SGD'
          " there (median of the rounds' ratios).",
          '',
      ]
  path = results / 'slow_link_train.json'
  if path.exists():
    doc = json.loads(path.read_text())
    parts += [
        'Time to accuracy over the same kind of link (train.py as two processes of 4 CPU'
        ' devices, K = 8 workers of one device on the 1-D layout, 100 Mbit/s, CIFAR-10, slim'
        ' VGG-16; ' + _provenance(doc) + '):',
        '',
        doc['table_md'],
        '',
        f'![test accuracy against training time over the slow link](bench/results/{doc["plot"]})',
        '',
    ]
  parts.append(HEADLINE_END)
  return '\n'.join(parts)


def _replace(path: pathlib.Path, begin: str, end: str, body: str) -> bool:
  """Replaces the text between the markers; False if the file has none."""
  text = path.read_text()
  if begin not in text or end not in text:
    return False
  head, rest = text.split(begin, 1)
  _, tail = rest.split(end, 1)
  path.write_text(head + body + tail)
  return True


def update_pages(
    page: pathlib.Path = PAGE,
    readme: pathlib.Path = README,
    results: pathlib.Path = RESULTS,
) -> list[pathlib.Path]:
  """Rewrites the benchmarks page's tables and the README's headline; returns
  the files that had their markers."""
  done = []
  if page.exists() and _replace(page, BEGIN, END, tables_section(results)):
    done.append(page)
  if readme.exists() and _replace(
      readme, HEADLINE_BEGIN, HEADLINE_END, headline(results)
  ):
    done.append(readme)
  return done


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument('--only', default=None, help='comma-separated subset')
  p.add_argument(
      '--skip', default='', help='comma-separated benchmarks to skip'
  )
  p.add_argument(
      '--note',
      default='',
      help='a line for the summary header (e.g. machine load)',
  )
  p.add_argument(
      '--summary-only',
      action='store_true',
      help='rebuild summary.md from the JSON files already in bench/results',
  )
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
  now = datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec='seconds'
  )
  parts = [
      '# defjax benchmarks',
      '',
      f'Written by `python -m bench.run_all` on {now}. Timings on a shared or small machine are'
      ' noisy: every ratio is measured within alternating rounds (A B A B) and reported as'
      ' min / median / max; compare ratios, not absolute times.',
      '',
  ]
  if a.note:
    parts += [a.note, '']
  for n in LINK_BENCHMARKS + BENCHMARKS + ACCELERATOR_BENCHMARKS:
    if (RESULTS / f'{n}.json').exists() or n in runs:
      parts.append(section(n, runs.get(n)))
  (RESULTS / 'summary.md').write_text('\n'.join(parts))
  print(f'wrote {RESULTS / "summary.md"}')
  for path in update_pages():
    print(f'updated the recorded figures in {path.relative_to(ROOT)}')
  failed = [n for n, r in runs.items() if r['rc'] != 0]
  if failed:
    print('failed: ' + ', '.join(failed))
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
