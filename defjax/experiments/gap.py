r"""DEF's gap to SGD against training length: one table and one figure.

The paper's claim (DEF within 0.7 points of SGD up to ratio 1024) is made at
78,125 steps, where every value is sent T / ratio = 305 times at ratio 256.
This report puts every committed setting on that axis: for each setting (a
name and its run folder) and each (DEF or DEF-A, ratio, lam), the gap is
SGD's final test accuracy minus the method's (means over seeds; points), and
T / ratio counts how often each value crossed the wire (``table_gap.md``,
``gap.png``). ``table_verdict.md`` puts every method of a setting side by
side, a row per (ratio, DEF's lam): the paper's Table 1 across settings.

Usage::

  python -m defjax.gap fm-6ep=results/fashion_mnist/runs \
      fm-lam=results/fashion_mnist_lam/runs,results/fashion_mnist/runs/sgd-r1-s0 \
      fm-55ep=results/fashion_mnist_long/runs ... --out results/gap

A setting is NAME=PATH[,PATH...]: run folders or single runs, read together
(so a lam sweep can borrow the SGD run of its base setting).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys
from collections.abc import Sequence

from defjax import methods
from defjax.experiments import results as results_lib

MARKERS = {16: 'v', 64: 'o', 256: 's', 1024: '^'}


def _layout(results) -> str:
  """The RBGS layout of these runs: 'per-leaf', 'global' or 'mixed'."""
  per_leaf = {
      bool(results_lib.config_get(r.run.config, 'optim.per_leaf', False))
      for r in results
  }
  return (
      'per-leaf'
      if per_leaf == {True}
      else ('global' if per_leaf == {False} else 'mixed')
  )


def rows_of(setting: str, paths: Sequence[str]) -> list[dict]:
  """One row per (DEF or DEF-A, ratio, lam) of the setting's runs."""
  collected = results_lib.collect(paths)
  groups, scale = collected.groups, collected.scale
  sgd = groups.get(('SGD', 1, None))
  sgd_cell = results_lib.cell(sgd, scale) if sgd else None
  rows = []
  for (label, ratio, lam), group in sorted(
      groups.items(), key=lambda kv: (kv[0][1], kv[0][2] or 0, kv[0][0])
  ):
    if label not in methods.LAM_LABELS:
      continue
    cell = results_lib.cell(group, scale)
    steps = sorted(
        {results_lib.planned_steps(r.run.summary) for r in group} - {None}
    )
    row = {
        'setting': setting,
        'method': label,
        'ratio': ratio,
        'lam': lam,
        'layout': _layout(group),
        'steps': steps[0] if len(steps) == 1 else None,
        'sends_per_value': steps[0] / ratio if len(steps) == 1 else None,
        'accuracy': cell['mean'],
        'accuracy_text': cell['text'],
        'sgd': sgd_cell['mean'] if sgd_cell else None,
        'sgd_text': sgd_cell['text'] if sgd_cell else None,
    }
    row['gap'] = (
        row['sgd'] - row['accuracy']
        if row['sgd'] is not None and row['accuracy'] is not None
        else None
    )
    rows.append(row)
  return rows


VERDICT_LABELS = ('DEF', 'DEF-A', 'EF', 'SAEF', 'PSync', 'EF21-SGDM')


def verdict_rows_of(setting: str, paths: Sequence[str]) -> list[dict]:
  """One row per (ratio, DEF's lam) of the setting: every method side by side.

  EF, SAEF, PSync and EF21-SGDM (lam fixed by the method) repeat in each
  lam's row of their ratio; a method without runs there is None.
  """
  collected = results_lib.collect(paths)
  groups, scale = collected.groups, collected.scale
  text = (
      lambda key: results_lib.cell(groups[key], scale)['text']
      if key in groups
      else None
  )
  rows = []
  for ratio in sorted({ratio for label, ratio, _ in groups if label != 'SGD'}):
    at_ratio = {key: g for key, g in groups.items() if key[1] == ratio}
    lams = sorted(
        {lam for label, _, lam in at_ratio if label in methods.LAM_LABELS}
    ) or [None]
    steps = sorted(
        {
            results_lib.planned_steps(r.run.summary)
            for g in at_ratio.values()
            for r in g
        }
        - {None}
    )
    layout = _layout([r for g in at_ratio.values() for r in g])
    for lam in lams:
      row = {
          'setting': setting,
          'ratio': ratio,
          'lam': lam,
          'layout': layout,
          # The setting's planned T (a diverged run stops early).
          'steps': max(steps) if steps else None,
          'SGD': text(('SGD', 1, None)),
      }
      row['sends_per_value'] = row['steps'] / ratio if row['steps'] else None
      for label in VERDICT_LABELS:
        keys = [
            k
            for k in at_ratio
            if k[0] == label
            and (k[2] == lam or label not in methods.LAM_LABELS)
        ]
        row[label] = text(keys[0]) if keys else None
      rows.append(row)
  return rows


def verdict_markdown(rows: list[dict]) -> str:
  columns = (
      'setting',
      'layout',
      'ratio',
      'steps T',
      'T / ratio',
      'SGD',
      'DEF',
      'DEF-A',
      'DEF lam',
      'EF',
      'SAEF',
      'PSync',
      'EF21-SGDM',
  )
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  cell = lambda v: v or results_lib.DASH
  for r in rows:
    lines.append(
        f'| {r["setting"]} | {r["layout"]} | {r["ratio"]} | {_fmt(r["steps"], ",")} |'
        f' {_fmt(r["sends_per_value"], ".1f")} | {cell(r["SGD"])} | {cell(r["DEF"])} |'
        f' {cell(r["DEF-A"])} | {_fmt(r["lam"], "g")} | {cell(r["EF"])} | {cell(r["SAEF"])} |'
        f' {cell(r["PSync"])} | {cell(r["EF21-SGDM"])} |'
    )
  return '\n'.join(lines) + '\n'


def _fmt(value, spec):
  if value is None:
    return results_lib.DASH
  # 92.8 - 92.80000000000001 is -1e-14: shown as 0.00, not -0.00.
  return format(value if round(value, 2) else 0.0, spec)


def table_markdown(rows: list[dict]) -> str:
  columns = (
      'setting',
      'layout',
      'method',
      'lam',
      'ratio',
      'steps T',
      'T / ratio',
      'SGD (%)',
      'method (%)',
      'gap to SGD (points)',
  )
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  for r in rows:
    lines.append(
        f'| {r["setting"]} | {r["layout"]} | {r["method"]} | {_fmt(r["lam"], "g")} |'
        f' {r["ratio"]} | {_fmt(r["steps"], ",")} | {_fmt(r["sends_per_value"], ".1f")} |'
        f' {r["sgd_text"] or results_lib.DASH} | {r["accuracy_text"]} | {_fmt(r["gap"], "+.2f")} |'
    )
  return '\n'.join(lines) + '\n'


def figure(rows: list[dict], path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  settings = list(dict.fromkeys(r['setting'] for r in rows))
  colors = {s: f'C{i}' for i, s in enumerate(settings)}
  fig, ax = plt.subplots(figsize=(9, 4.8))
  for r in rows:
    if r['gap'] is None or r['sends_per_value'] is None:
      continue
    filled = r['method'] == 'DEF'
    ax.scatter(
        r['sends_per_value'],
        r['gap'],
        marker=MARKERS.get(r['ratio'], 'D'),
        s=44,
        color=colors[r['setting']] if filled else 'none',
        edgecolors=colors[r['setting']],
        linewidths=1.2,
    )
  ax.axhline(0.7, color='grey', ls='--', lw=0.8)
  ax.axvline(305, color='grey', ls=':', lw=0.8)
  ax.set_xscale('log')
  # Gaps span 0.1 to 80 points (lam 0 is EF); linear near 0, log above 2.
  ax.set_yscale('symlog', linthresh=2)
  ax.set_ylim(bottom=-0.5)
  ax.set_xlabel('T / ratio: times each value is sent')
  ax.set_ylabel('SGD accuracy - method accuracy (points)')
  handles = [
      plt.Line2D([], [], ls='', marker='o', color=colors[s], label=s)
      for s in settings
  ]
  handles += [
      plt.Line2D([], [], ls='', marker=m, color='black', label=f'ratio {k}')
      for k, m in MARKERS.items()
      if any(r['ratio'] == k for r in rows)
  ]
  handles += [
      plt.Line2D([], [], ls='', marker='o', color='black', label='DEF (y)'),
      plt.Line2D(
          [],
          [],
          ls='',
          marker='o',
          color='none',
          markeredgecolor='black',
          label='DEF-A (x)',
      ),
  ]
  ax.legend(
      handles=handles, fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1)
  )
  ax.set_title(
      "DEF's gap to SGD vs training length\n(dashed: 0.7 points;"
      " dotted: the paper's T / ratio = 305 at ratio 256)",
      fontsize=9,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(
    settings: Sequence[tuple[str, Sequence[str]]], out, argv: Sequence[str] = ()
) -> list[dict]:
  rows = [row for name, paths in settings for row in rows_of(name, paths)]
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  table = table_markdown(rows)
  (out / 'table_gap.md').write_text(table)
  verdict = verdict_markdown(
      [row for name, paths in settings for row in verdict_rows_of(name, paths)]
  )
  (out / 'table_verdict.md').write_text(verdict)
  figure(rows, out / 'gap.png')
  (out / 'gap.json').write_text(json.dumps(rows, indent=2) + '\n')
  (out / 'README.md').write_text(
      '\n'.join(
          [
              "# DEF's gap to SGD against training length",
              '',
              'Made by',
              '',
              '```',
              shlex.join(argv),
              '```',
              '',
              'Settings: '
              + ', '.join(
                  f'`{name}` = `{", ".join(paths)}`' for name, paths in settings
              )
              + '.',
              '',
              '## Every method, per setting and ratio',
              '',
              'Test accuracy (%) at the end of training, mean ± sample standard deviation'
              ' over n seeds (`table_verdict.md`); DEF and DEF-A at the lam of the row.',
              '',
              verdict,
              "## DEF's gap to SGD",
              '',
              table,
              '![gap](gap.png)',
              '',
          ]
      )
  )
  return rows


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = argparse.ArgumentParser(
      prog='python -m defjax.gap', description=__doc__.split('\n')[0]
  )
  parser.add_argument('settings', nargs='+', metavar='NAME=RUNDIR[,RUNDIR...]')
  parser.add_argument('--out', required=True)
  args = parser.parse_args(argv)
  settings = []
  for item in args.settings:
    name, eq, path = item.partition('=')
    if not eq:
      parser.error(f'expected NAME=RUNDIR[,RUNDIR...], got {item!r}')
    settings.append((name, path.split(',')))
  try:
    rows = write(settings, args.out, ['python', '-m', 'defjax.gap', *argv])
  except results_lib.INPUT_ERRORS as e:
    print(results_lib.input_error_line(e), file=sys.stderr)
    return 2
  print(table_markdown(rows))
  return 0


if __name__ == '__main__':
  sys.exit(main())
