r"""Tables and figures from finished runs, in the form of the paper's.

Usage::

  python -m defjax.report runs/sweep-fm [more run or sweep dirs ...] \
      --out reports/fm [--lam 0.3]

The runs below the given paths are read and grouped by (method, ratio, lam)
as ``results`` describes: averaged over seeds, a ``def`` run giving
both DEF (the model y = x - mean e) and DEF-A (the model x). Written into
``--out``:

- ``table1.md``: test accuracy (%) at the end of training, mean ± sample
  standard deviation over seeds, laid out as the paper's Table 1 (a row per
  ratio, a column per method, SGD in the row of ratio 1); "diverged" when
  every seed diverged, "diverged (k/n)" when k of n did.
- ``table_lam.md``: DEF and DEF-A per lam at each ratio (the paper's Table
  4), only when the runs hold several lams.
- ``fig1_<ratio>.png`` and ``fig3_<ratio>.png``: the paper's Figure 1 and
  Figure 3 (``figures``).
- ``report.json``: what ``summarize`` returns; ``README.md``: all of the
  above on one page, with the command that made it and each sweep's date,
  machine and versions (no generation time: regenerating from the same runs
  gives the same bytes).

Runs without ``summary.json`` (still going, or interrupted) are listed but
left out of tables and figures: their numbers are not final.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import shlex
import sys
from collections.abc import Iterable, Sequence

from defjax import methods
from defjax.experiments import figures as figures_lib
from defjax.experiments import results as results_lib


def summarize(
    paths: Iterable[str | os.PathLike[str]], lam: float | None = None
) -> dict:
  """The numbers behind the tables, as plain data.

  Args:
    paths: run directories or directories holding runs (e.g. a sweep).
    lam: the lam whose DEF and DEF-A results go into Table 1 and the figures.
      None: the only lam there is, else the paper's 0.3 if present, else the
      lam with the most runs.

  Returns:
    A dict with ``runs`` (one record per run dir), ``unfinished`` (paths of
    runs without summary.json), ``lam`` (the lam of Table 1), ``scale``
    (100 if accuracies were fractions), ``table1`` (``{label: {ratio: cell}}``
    at that lam) and ``lams`` (``{ratio: {lam: {label: cell}}}`` for DEF and
    DEF-A). A cell has ``mean`` and ``std`` (sample std, ddof = 1) of the
    final test accuracy in % over its non-diverged seeds, ``n`` seeds,
    ``diverged`` of them, ``values``, ``seeds`` and ``text`` as printed.
  """
  return _summary(results_lib.collect(paths, lam))


def _summary(collected: results_lib.Collection) -> dict:
  runs, table_lam = collected.runs, collected.lam
  table1 = collections.defaultdict(dict)
  lams = collections.defaultdict(lambda: collections.defaultdict(dict))
  for (label, ratio, group_lam), group in sorted(
      collected.groups.items(), key=lambda kv: (kv[0][1], str(kv[0][2]))
  ):
    cell = results_lib.cell(group, collected.scale)
    if label in methods.LAM_LABELS:
      lams[ratio][group_lam][label] = cell
      if group_lam != table_lam:
        continue
    table1[label][ratio] = cell
  return {
      'runs': [
          {
              'path': results_lib.shown(r.path),
              'method': r.method,
              'ratio': r.ratio,
              'lam': r.lam,
              'seed': r.seed,
              'status': r.status,
              'final_test_accuracy': r.summary.get('final_test_accuracy'),
              'final_test_accuracy_x': r.summary.get('final_test_accuracy_x'),
              'final_train_loss': r.summary.get('final_train_loss'),
              'diverged_at_step': r.summary.get('diverged_at_step'),
          }
          for r in sorted(runs, key=lambda r: str(r.path))
      ],
      'unfinished': [
          results_lib.shown(r.path) for r in runs if r.status == 'unfinished'
      ],
      'lam': table_lam,
      'scale': collected.scale,
      'table1': {k: dict(v) for k, v in table1.items()},
      'lams': {r: {l: dict(c) for l, c in v.items()} for r, v in lams.items()},
  }


def _length(config: dict) -> str | None:
  steps = results_lib.config_get(config, 'num_train_steps')
  if steps:  # a step budget overrides num_epochs
    return f'{steps} steps'
  epochs = results_lib.config_get(config, 'num_epochs')
  return None if epochs is None else f'{epochs:g} epochs'


def _setting(runs: list[results_lib.Run]) -> str:
  """'dataset, model, length of training' as far as the configs agree."""
  parts = []
  for get in (
      lambda c: results_lib.config_get(c, 'dataset'),
      lambda c: results_lib.config_get(c, 'model'),
      _length,
  ):
    values = {str(get(r.config)) for r in runs if get(r.config) is not None}
    if len(values) == 1:
      parts.append(values.pop())
  return ', '.join(parts)


def table1_markdown(summary: dict, setting: str = '') -> str:
  """The paper's Table 1: a row per ratio, a column per method."""
  table = summary['table1']
  labels = [l for l in methods.LABELS if l in table]
  ratios = sorted({r for cells in table.values() for r in cells})
  lines = [
      '| ratio | ' + ' | '.join(labels) + ' |',
      '|---:|' + '---:|' * len(labels),
  ]
  for ratio in ratios:
    cells = [
        table[l][ratio]['text'] if ratio in table[l] else results_lib.DASH
        for l in labels
    ]
    lines.append(f'| {ratio} | ' + ' | '.join(cells) + ' |')
  lam = summary['lam']
  caption = (
      'Test accuracy (%) at the end of training'
      + (f' ({setting})' if setting else '')
      + ': mean ± sample standard deviation over n seeds. '
      '"diverged (k/n)": k of n seeds diverged. SGD does not '
      'compress (ratio 1).'
  )
  if lam is not None and any(l in table for l in methods.LAM_LABELS):
    caption += f' DEF and DEF-A with lam = {lam:g}.'
  return '\n'.join(lines) + '\n\n' + caption + '\n'


def table_lam_markdown(summary: dict) -> str | None:
  """The paper's Table 4: DEF and DEF-A per lam, one table per ratio.

  Written when the runs hold several lams; then every ratio gets its table,
  also one with a single lam (Table 1 shows one lam only).
  """
  parts = []
  if (
      len(
          {
              l
              for by_lam in summary['lams'].values()
              for l in by_lam
              if l is not None
          }
      )
      < 2
  ):
    return None
  for ratio, by_lam in sorted(summary['lams'].items()):
    lams = sorted(l for l in by_lam if l is not None)
    if not lams:
      continue
    parts.append(f'Compression ratio {ratio}:\n')
    parts.append('| lam | ' + ' | '.join(f'{l:g}' for l in lams) + ' |')
    parts.append('|---|' + '---:|' * len(lams))
    for label in methods.LAM_LABELS:
      cells = [
          by_lam[l][label]['text'] if label in by_lam[l] else results_lib.DASH
          for l in lams
      ]
      parts.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    parts.append('')
  if not parts:
    return None
  return (
      '\n'.join(parts) + '\nTest accuracy (%) at the end of training, '
      'mean ± sample standard deviation over n seeds.\n'
  )


def write_report(
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    lam: float | None = None,
    argv: Sequence[str] = (),
) -> dict:
  """Writes tables, figures and README.md into ``out``; returns the summary.

  Args:
    paths: run directories or directories holding runs.
    out: the report directory (created).
    lam: as for ``summarize``.
    argv: the command line, quoted in README.md.

  Returns:
    ``summarize(paths, lam)`` plus ``files``, the names written.

  Raises:
    FileNotFoundError, results.IncompatibleRunsError: as ``results.collect``.
  """
  collected = results_lib.collect(paths, lam)  # raises before out exists
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  runs = collected.runs
  summary = _summary(collected)
  finished = [r for r in runs if r.status != 'unfinished']
  setting = _setting(finished)
  files = []

  table1 = table1_markdown(summary, setting)
  (out / 'table1.md').write_text(table1)
  files.append('table1.md')
  lam_table = table_lam_markdown(summary)
  if lam_table:
    (out / 'table_lam.md').write_text(lam_table)
    files.append('table_lam.md')

  figures = figures_lib.write_figures(
      collected.groups, collected.lam, collected.scale, setting, out
  )
  files += [name for name, _ in figures]

  summary['files'] = files
  (out / 'report.json').write_text(json.dumps(summary, indent=2) + '\n')
  files.append('report.json')
  (out / 'README.md').write_text(
      _readme(summary, table1, lam_table, figures, setting, runs, paths, argv)
  )
  files.append('README.md')
  return summary


def _sweep_records(paths) -> list[tuple[pathlib.Path, dict]]:
  records = []
  for root in paths:
    for path in sorted(pathlib.Path(root).rglob('sweep.json')):
      try:
        records.append((path, json.loads(path.read_text())))
      except ValueError:
        continue
  return records


def _readme(
    summary, table1, lam_table, figures, setting, runs, paths, argv
) -> str:
  lines = [
      f'# defjax report{": " + setting if setting else ""}',
      '',
      'Made by',
      '',
      '```',
      shlex.join(argv)
      if argv
      else 'python -m defjax.report ' + shlex.join(str(p) for p in paths),
      '```',
      '',
  ]
  sweeps = _sweep_records(paths)
  if sweeps:
    lines += ['Sweeps:', '']
    for path, record in sweeps:
      machine = record.get('machine', {})
      packages = ', '.join(
          f'{k} {v}' for k, v in record.get('packages', {}).items() if v
      )
      lines.append(
          f'- `{results_lib.shown(path)}`: `{record.get("command", "?")}`, last invoked '
          f'{record.get("date", "?")}, {machine.get("platform", "?")}'
          f' ({machine.get("cpu_count", "?")} CPUs); {packages}'
      )
    lines.append('')
  counts = collections.Counter(r.status for r in runs)
  finished = sorted(
      r.summary['finished'] for r in runs if r.summary.get('finished')
  )
  lines += [
      'Runs: '
      + ', '.join(f'{n} {s}' for s, n in sorted(counts.items()))
      + (
          f'; finished {finished[0]} to {finished[-1]} (of the runs that'
          ' record it)'
          if finished
          else ''
      )
      + '.',
      '',
  ]
  if summary['scale'] == 100.0:
    lines += ['Accuracies were stored as fractions and are shown in %.', '']
  lines += ['## Table 1: test accuracy by compression ratio', '', table1]
  if lam_table:
    lines += ['## Table 4: DEF and DEF-A by lam', '', lam_table]
  if figures:
    lines += ['## Figures', '']
    for name, caption in figures:
      lines += [f'### {caption}', '', f'![{caption}]({name})', '']
  diverged = [r for r in runs if r.status == 'diverged']
  if diverged:
    lines += ['## Diverged runs', '']
    lines += [
        f'- `{results_lib.shown(r.path)}` at step {r.summary.get("diverged_at_step", "?")}'
        for r in sorted(diverged, key=lambda r: str(r.path))
    ]
    lines.append('')
  if summary['unfinished']:
    lines += ['## Unfinished runs (left out)', '']
    lines += [f'- `{p}`' for p in summary['unfinished']]
    lines.append('')
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """The command line entry point; returns the exit code."""
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = argparse.ArgumentParser(
      prog='python -m defjax.report',
      description='Tables (paper Table 1 and 4) and figures (Figure 1 and 3) '
      'from run directories.',
  )
  parser.add_argument(
      'paths',
      nargs='+',
      metavar='RUNDIR_OR_SWEEPDIR',
      help='run directories or directories holding runs',
  )
  parser.add_argument('--out', required=True, help='report directory')
  parser.add_argument(
      '--lam',
      type=float,
      default=None,
      help='lam of DEF/DEF-A in Table 1 and the figures '
      '(default: the only one, else 0.3, else the most '
      'common)',
  )
  args = parser.parse_args(argv)
  try:
    summary = write_report(
        args.paths,
        args.out,
        lam=args.lam,
        argv=['python', '-m', 'defjax.report', *argv],
    )
  except results_lib.INPUT_ERRORS as e:
    print(results_lib.input_error_line(e), file=sys.stderr)
    return 2
  if not summary['runs']:
    print(
        'error: no runs (directories with summary.json or metrics.jsonl) '
        f'under {", ".join(args.paths)}',
        file=sys.stderr,
    )
    return 1
  print(table1_markdown(summary))
  print(f'report written to {args.out}: {", ".join(summary["files"])}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
