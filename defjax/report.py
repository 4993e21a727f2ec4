r"""Tables and figures from finished runs, in the form of the paper's.

Usage::

  python -m defjax.report runs/sweep-fm [more run or sweep dirs ...] \
      --out reports/fm [--lam 0.3]

Every directory below the given paths that holds a ``summary.json`` or a
``metrics.jsonl`` is a run. Runs are grouped by (method, ratio, lam) and
averaged over seeds. A ``def`` run gives two results: DEF (its
``test_accuracy``, the model y = x - mean e) and DEF-A (its
``test_accuracy_x``, the model x), as the two differ only in the model that
is evaluated. Written into ``--out``:

- ``table1.md``: test accuracy (%) at the end of training, mean ± sample
  standard deviation over seeds, laid out as the paper's Table 1 (a row per
  ratio, a column per method, SGD in the row of ratio 1); "diverged" when
  every seed diverged, "diverged (k/n)" when k of n did.
- ``table_lam.md``: DEF and DEF-A per lam at each ratio that has several
  lams (the paper's Table 4), only when such a ratio exists.
- ``fig1_<ratio>.png``: test accuracy vs wall-clock time and vs epochs and
  training loss vs epochs, one line per method (mean over seeds, a band of
  ± one standard deviation), SGD on every ratio's figure (the paper's
  Figure 1).
- ``fig3_<ratio>.png``: DEF vs DEF-A test accuracy up to the first learning
  rate decay (the paper's Figure 3).
- ``report.json``: what ``summarize`` returns; ``README.md``: all of the
  above on one page, with the date and the command that made it.

Runs without ``summary.json`` (still going, or interrupted) are listed but
left out of tables and figures: their numbers are not final.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import math
import os
import pathlib
import re
import shlex
import sys
from collections.abc import Iterable, Sequence

import numpy as np

# The paper's column order.
LABELS = {'sgd': 'SGD', 'ef': 'EF', 'saef': 'SAEF', 'psync': 'PSync',
          'def': 'DEF', 'def_a': 'DEF-A'}
ROWS = ('SGD', 'EF', 'SAEF', 'PSync', 'DEF', 'DEF-A')
LAM_ROWS = ('DEF', 'DEF-A')  # the results that depend on lam
DEFAULT_LAM = 0.3  # the paper's default, preferred when several lams exist
COLORS = {'SGD': 'black', 'EF': 'tab:red', 'SAEF': 'tab:orange',
          'PSync': 'tab:purple', 'DEF': 'tab:blue', 'DEF-A': 'tab:green'}
_NAME = re.compile(r'^(?P<method>sgd|ef|def_a|def|saef|psync)-r(?P<ratio>\d+)'
                   r'(?:-lam(?P<lam>[0-9.eE+-]+))?-s(?P<seed>\d+)$')
_DASH = '—'


@dataclasses.dataclass
class Run:
  """One run directory as read from disk."""

  path: pathlib.Path
  method: str
  ratio: int
  lam: float | None
  seed: int | None
  status: str  # completed | diverged | unfinished
  summary: dict
  config: dict
  metrics: list[dict]


@dataclasses.dataclass
class Result:
  """One method's result from one run: DEF and DEF-A share a def run."""

  label: str
  run: Run
  accuracy_key: str  # the metrics.jsonl key of the evaluated model
  final_key: str  # the summary.json key of its final accuracy

  @property
  def final_accuracy(self) -> float | None:
    value = self.run.summary.get(self.final_key)
    if value is None:  # an older summary: fall back to the last eval
      series = [m[self.accuracy_key] for m in self.run.metrics
                if _is_number(m.get(self.accuracy_key))]
      value = series[-1] if series else None
    return value


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _config_get(config: dict, dotted: str, default=None):
  """``config['optim']['ratio']`` for 'optim.ratio', nested or flat."""
  if dotted in config:
    return config[dotted]
  node = config
  for part in dotted.split('.'):
    if not isinstance(node, dict) or part not in node:
      return default
    node = node[part]
  return node


def _ratio(value) -> int | float:
  # Configs may hold the ratio as a float (256.0); show it as 256.
  value = float(value)
  return int(value) if value.is_integer() else value


def _norm_lam(lam) -> float | None:
  # Rounded so that 0.3 from a flag and 0.30000000000000004 from arithmetic
  # land in the same group.
  return None if lam is None else round(float(lam), 6)


def _read_metrics(path: pathlib.Path) -> list[dict]:
  if not path.exists():
    return []
  rows = {}
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue  # a line cut off by an interrupted write
    # A resumed run can evaluate a step again; the later line wins.
    rows[row.get('step', len(rows))] = row
  return [rows[k] for k in sorted(rows)]


def find_run_dirs(
    paths: Iterable[str | os.PathLike[str]]) -> list[pathlib.Path]:
  """Every directory at or below ``paths`` holding a run's output files."""
  found = {}
  for root in paths:
    root = pathlib.Path(root)
    if not root.exists():
      raise FileNotFoundError(root)
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames.sort()
      if 'summary.json' in filenames or 'metrics.jsonl' in filenames:
        found[pathlib.Path(dirpath).resolve()] = None
        dirnames[:] = []  # checkpoints below a run are not runs
  return list(found)


def load_run(path: pathlib.Path) -> Run | None:
  """Reads one run directory; None if its method cannot be told."""
  summary = {}
  if (path / 'summary.json').exists():
    try:
      summary = json.loads((path / 'summary.json').read_text())
    except ValueError:
      summary = {}  # cut off mid-write: treat as unfinished
  config = summary.get('config') or {}
  named = _NAME.match(path.name)
  method = _config_get(config, 'optim.method')
  if method is None and named:
    method = named['method']
  if method not in LABELS:
    return None
  ratio = _config_get(config, 'optim.ratio')
  if ratio is None and named:
    ratio = named['ratio']
  lam = _config_get(config, 'optim.lam')
  if lam is None and named:
    lam = named['lam']
  seed = _config_get(config, 'seed')
  if seed is None and named:
    seed = named['seed']
  return Run(
      path=path,
      method=method,
      # SGD does not compress: whatever ratio its config carries, it is the
      # ratio-1 baseline.
      ratio=1 if method == 'sgd' else _ratio(ratio or 1),
      lam=_norm_lam(lam) if method in ('def', 'def_a') else None,
      seed=None if seed is None else int(seed),
      status=summary.get('status', 'completed') if summary else 'unfinished',
      summary=summary,
      config=config,
      metrics=_read_metrics(path / 'metrics.jsonl'),
  )


def results_of(run: Run) -> list[Result]:
  """The results one run contributes: two for def, one otherwise."""
  if run.method == 'def':
    return [
        Result('DEF', run, 'test_accuracy', 'final_test_accuracy'),
        Result('DEF-A', run, 'test_accuracy_x', 'final_test_accuracy_x'),
    ]
  return [Result(LABELS[run.method], run, 'test_accuracy',
                 'final_test_accuracy')]


def _group(runs: list[Run]) -> dict[tuple, list[Result]]:
  """Results by (label, ratio, lam), finished runs only."""
  groups = collections.defaultdict(list)
  for run in runs:
    if run.status == 'unfinished':
      continue
    for result in results_of(run):
      groups[(result.label, run.ratio, run.lam)].append(result)
  # A def_a run and a def run of the same seed compute the same x; count the
  # seed once and keep the run made for DEF-A.
  for key, results in groups.items():
    if key[0] == 'DEF-A':
      own = {r.run.seed for r in results if r.run.method == 'def_a'}
      groups[key] = [r for r in results
                     if r.run.method == 'def_a' or r.run.seed not in own]
  return dict(groups)


def _accuracy_scale(runs: list[Run]) -> float:
  """100 if accuracies are stored as fractions, else 1 (already in %)."""
  for run in runs:
    values = [run.summary.get('final_test_accuracy'),
              run.summary.get('final_test_accuracy_x')]
    values += [m.get(k) for m in run.metrics
               for k in ('test_accuracy', 'test_accuracy_x')]
    if any(_is_number(v) and v > 1.0 for v in values):
      return 1.0
  return 100.0


def _cell(results: list[Result], scale: float) -> dict:
  """Mean ± sample std over seeds; divergence is reported, not averaged."""
  diverged = sum(r.run.status == 'diverged' for r in results)
  values = [r.final_accuracy * scale for r in results
            if r.run.status != 'diverged' and _is_number(r.final_accuracy)]
  n = len(results)
  mean = float(np.mean(values)) if values else None
  std = float(np.std(values, ddof=1)) if len(values) > 1 else (
      0.0 if values else None)
  if diverged == n:
    text = 'diverged'
  elif diverged:
    text = f'diverged ({diverged}/{n})'
  elif mean is None:
    text = _DASH
  elif len(values) == 1:
    text = f'{mean:.2f} (n=1)'
  else:
    text = f'{mean:.2f} ± {std:.2f} (n={len(values)})'
  return {
      'n': n, 'diverged': diverged, 'values': values, 'mean': mean,
      'std': std, 'text': text,
      'seeds': sorted(r.run.seed for r in results if r.run.seed is not None),
      'runs': [str(r.run.path) for r in results],
  }


def _choose_lam(groups: dict, lam: float | None) -> float | None:
  lams = collections.Counter()
  for (label, _, group_lam), results in groups.items():
    if label in LAM_ROWS:
      lams[group_lam] += len(results)
  if lam is not None:
    return _norm_lam(lam)
  if len(lams) <= 1:
    return next(iter(lams), None)
  if DEFAULT_LAM in lams:
    return DEFAULT_LAM
  return max(lams, key=lambda l: (lams[l], -abs((l or 0) - DEFAULT_LAM)))


def _collect(paths, lam: float | None = None):
  runs = [r for r in (load_run(p) for p in find_run_dirs(paths)) if r]
  groups = _group(runs)
  return runs, groups, _choose_lam(groups, lam), _accuracy_scale(runs)


def summarize(paths: Iterable[str | os.PathLike[str]],
              lam: float | None = None) -> dict:
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
  return _summary(*_collect(paths, lam))


def _summary(runs, groups, table_lam, scale) -> dict:
  table1 = collections.defaultdict(dict)
  lams = collections.defaultdict(lambda: collections.defaultdict(dict))
  for (label, ratio, group_lam), results in sorted(
      groups.items(), key=lambda kv: (kv[0][1], str(kv[0][2]))):
    cell = _cell(results, scale)
    if label in LAM_ROWS:
      lams[ratio][group_lam][label] = cell
      if group_lam != table_lam:
        continue
    table1[label][ratio] = cell
  return {
      'runs': [{
          'path': str(r.path), 'method': r.method, 'ratio': r.ratio,
          'lam': r.lam, 'seed': r.seed, 'status': r.status,
          'final_test_accuracy': r.summary.get('final_test_accuracy'),
          'final_test_accuracy_x': r.summary.get('final_test_accuracy_x'),
          'final_train_loss': r.summary.get('final_train_loss'),
          'diverged_at_step': r.summary.get('diverged_at_step'),
      } for r in sorted(runs, key=lambda r: str(r.path))],
      'unfinished': [str(r.path) for r in runs if r.status == 'unfinished'],
      'lam': table_lam,
      'scale': scale,
      'table1': {k: dict(v) for k, v in table1.items()},
      'lams': {r: {l: dict(c) for l, c in v.items()} for r, v in lams.items()},
  }


def _length(config: dict) -> str | None:
  steps = _config_get(config, 'num_train_steps')
  if steps:  # a step budget overrides num_epochs
    return f'{steps} steps'
  epochs = _config_get(config, 'num_epochs')
  return None if epochs is None else f'{epochs:g} epochs'


def _setting(runs: list[Run]) -> str:
  """'dataset, model, length of training' as far as the configs agree."""
  parts = []
  for get in (lambda c: _config_get(c, 'dataset'),
              lambda c: _config_get(c, 'model'), _length):
    values = {str(get(r.config)) for r in runs if get(r.config) is not None}
    if len(values) == 1:
      parts.append(values.pop())
  return ', '.join(parts)


def table1_markdown(summary: dict, setting: str = '') -> str:
  """The paper's Table 1: a row per ratio, a column per method."""
  table = summary['table1']
  labels = [l for l in ROWS if l in table]
  ratios = sorted({r for cells in table.values() for r in cells})
  lines = [
      '| ratio | ' + ' | '.join(labels) + ' |',
      '|---:|' + '---:|' * len(labels),
  ]
  for ratio in ratios:
    cells = [table[l][ratio]['text'] if ratio in table[l] else _DASH
             for l in labels]
    lines.append(f'| {ratio} | ' + ' | '.join(cells) + ' |')
  lam = summary['lam']
  caption = ('Test accuracy (%) at the end of training'
             + (f' ({setting})' if setting else '')
             + ': mean ± sample standard deviation over n seeds. '
             '"diverged (k/n)": k of n seeds diverged. SGD does not '
             'compress (ratio 1).')
  if lam is not None and any(l in table for l in LAM_ROWS):
    caption += f' DEF and DEF-A with lam = {lam:g}.'
  return '\n'.join(lines) + '\n\n' + caption + '\n'


def table_lam_markdown(summary: dict) -> str | None:
  """The paper's Table 4: DEF and DEF-A per lam, one table per ratio."""
  parts = []
  for ratio, by_lam in sorted(summary['lams'].items()):
    lams = sorted(l for l in by_lam if l is not None)
    if len(lams) < 2:
      continue
    parts.append(f'Compression ratio {ratio}:\n')
    parts.append('| lam | ' + ' | '.join(f'{l:g}' for l in lams) + ' |')
    parts.append('|---|' + '---:|' * len(lams))
    for label in LAM_ROWS:
      cells = [by_lam[l][label]['text'] if label in by_lam[l] else _DASH
               for l in lams]
      parts.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    parts.append('')
  if not parts:
    return None
  return ('\n'.join(parts) + '\nTest accuracy (%) at the end of training, '
          'mean ± sample standard deviation over n seeds.\n')


# Figures.


@dataclasses.dataclass
class Curve:
  """A method's eval series averaged over seeds at their common steps."""

  label: str
  epoch: np.ndarray
  wall_time: np.ndarray  # seconds since the start of training
  accuracy: np.ndarray  # %
  accuracy_std: np.ndarray
  train_loss: np.ndarray
  train_loss_std: np.ndarray
  n: int
  diverged: bool  # every seed diverged: the curve stops where they did
  methods: frozenset[str]  # the run methods it comes from


def _series(result: Result, scale: float) -> dict[int, tuple]:
  rows = {}
  for m in result.run.metrics:
    if _is_number(m.get(result.accuracy_key)):
      rows[m.get('step')] = (
          m.get('epoch', math.nan), m.get('wall_time', math.nan),
          m[result.accuracy_key] * scale,
          m.get('train_loss') if _is_number(m.get('train_loss')) else math.nan)
  return rows


def _curve(label: str, results: list[Result], scale: float) -> Curve | None:
  kept = [r for r in results if r.run.status != 'diverged']
  diverged = not kept
  kept = kept or results  # all diverged: show how far they got
  series = [s for s in (_series(r, scale) for r in kept) if s]
  if not series:
    return None
  steps = sorted(set.intersection(*(set(s) for s in series)))
  if not steps:
    return None
  data = np.array([[s[step] for step in steps] for s in series], dtype=float)
  wall = data[:, :, 1]
  # Unix timestamps rather than durations: measure from the first eval.
  wall = np.where(wall > 1e9, wall - wall[:, :1], wall)
  with np.errstate(invalid='ignore'):
    return Curve(
        label=label, epoch=np.nanmean(data[:, :, 0], axis=0),
        wall_time=np.nanmean(wall, axis=0),
        accuracy=data[:, :, 2].mean(axis=0),
        accuracy_std=data[:, :, 2].std(axis=0),
        train_loss=data[:, :, 3].mean(axis=0),
        train_loss_std=data[:, :, 3].std(axis=0),
        n=len(series), diverged=diverged,
        methods=frozenset(r.run.method for r in kept))


def _time_unit(seconds: float) -> tuple[float, str]:
  if seconds < 120:
    return 1.0, 's'
  if seconds < 2 * 3600:
    return 60.0, 'min'
  return 3600.0, 'h'


def _plot(ax, x, curve: Curve, y, y_std, label: str | None = None, **kwargs):
  label = (label or curve.label) + (' (diverged)' if curve.diverged else '')
  style = dict(color=COLORS[curve.label], lw=1.6,
               ls=':' if curve.diverged else '-')
  style.update(kwargs)
  ax.plot(x, y, label=label, **style)
  if curve.n > 1:
    ax.fill_between(x, y - y_std, y + y_std, color=style['color'], alpha=0.15,
                    lw=0)


def _figure_curves(groups, ratio, lam, scale) -> list[Curve]:
  curves = []
  for label in ROWS:
    key = (label, 1 if label == 'SGD' else ratio,
           lam if label in LAM_ROWS else None)
    if key in groups:
      curve = _curve(label, groups[key], scale)
      if curve is not None:
        curves.append(curve)
  return curves


def _legend_title(curves: list[Curve]) -> str:
  ns = sorted({c.n for c in curves})
  if ns == [1]:
    return 'one seed'
  n = f'{ns[0]}' if len(ns) == 1 else f'{ns[0]}-{ns[-1]}'
  return f'mean of {n} seeds, band ± 1 std'


def figure1(curves: list[Curve], ratio: int, setting: str,
            path: pathlib.Path) -> None:
  """Accuracy vs time, accuracy vs epochs, loss vs epochs (paper Fig. 1)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), constrained_layout=True)
  max_wall = max((np.nanmax(c.wall_time) for c in curves
                  if np.isfinite(c.wall_time).any()), default=0.0)
  div, unit = _time_unit(max_wall)
  # DEF-A taken from def runs has DEF's training loss: one line, not two.
  shared_loss = any(c.label == 'DEF' for c in curves) and any(
      c.label == 'DEF-A' and c.methods == {'def'} for c in curves)
  for c in curves:
    _plot(axes[0], c.wall_time / div, c, c.accuracy, c.accuracy_std)
    _plot(axes[1], c.epoch, c, c.accuracy, c.accuracy_std)
    if c.label == 'DEF-A' and shared_loss:
      continue
    _plot(axes[2], c.epoch, c, c.train_loss, c.train_loss_std,
          label='DEF = DEF-A (same runs)'
          if c.label == 'DEF' and shared_loss else None)
  axes[0].set(xlabel=f'wall-clock time ({unit})', ylabel='test accuracy (%)',
              title='Test accuracy vs wall-clock time')
  axes[1].set(xlabel='epoch', ylabel='test accuracy (%)',
              title='Test accuracy vs epochs')
  axes[2].set(xlabel='epoch', ylabel='training loss',
              title='Training loss vs epochs')
  finite = np.concatenate([c.train_loss[np.isfinite(c.train_loss)]
                           for c in curves] or [np.zeros(0)])
  if finite.size and finite.min() > 0 and finite.max() > 20 * finite.min():
    axes[2].set_yscale('log')
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small', title_fontsize='small',
              title=_legend_title(curves))
  fig.suptitle(f'{setting + ": " if setting else ""}compression ratio {ratio} '
               '(SGD: no compression)')
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _first_decay_epoch(results: list[Result]) -> float | None:
  """The epoch of the first lr decay: decay_at[0] of the training length."""
  for r in results:
    decay_at = _config_get(r.run.config, 'optim.decay_at')
    if not decay_at:
      continue
    first = float(sorted(decay_at)[0])
    steps = _config_get(r.run.config, 'num_train_steps')
    steps_per_epoch = r.run.summary.get('steps_per_epoch')
    if steps and steps_per_epoch:  # a step budget overrides num_epochs
      return first * steps / steps_per_epoch
    epochs = _config_get(r.run.config, 'num_epochs')
    if epochs and not steps:
      whole = _config_get(r.run.config, 'optim.decay_whole_epochs')
      return float(int(first * epochs)) if whole else first * float(epochs)
    # Neither tells the length: a completed run's last eval is its end.
    ends = [m['epoch'] for m in r.run.metrics if _is_number(m.get('epoch'))]
    if r.run.status == 'completed' and ends:
      return first * ends[-1]
  return None


def figure3(curves: list[Curve], until_epoch: float | None, ratio: int,
            setting: str, path: pathlib.Path) -> None:
  """DEF vs DEF-A before the first lr decay (paper Fig. 3)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 4.8), constrained_layout=True)
  for c in curves:
    keep = (c.epoch <= until_epoch + 1e-9 if until_epoch is not None
            else np.ones_like(c.epoch, dtype=bool))
    if c.label == 'SGD':  # a reference, not the comparison
      _plot(ax, c.epoch[keep], c, c.accuracy[keep], c.accuracy_std[keep],
            ls='--', lw=1.0, color='gray')
    else:
      _plot(ax, c.epoch[keep], c, c.accuracy[keep], c.accuracy_std[keep])
  where = (f'up to the first lr decay (epoch {until_epoch:.3g})'
           if until_epoch is not None else 'whole run (no lr decay in config)')
  ax.set(xlabel='epoch', ylabel='test accuracy (%)',
         title=f'DEF vs DEF-A, {where}\n'
               f'{setting + ", " if setting else ""}compression ratio {ratio}')
  ax.grid(alpha=0.3)
  ax.legend(title=_legend_title(curves),
            fontsize='small', title_fontsize='small')
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(paths: Sequence[str | os.PathLike[str]],
                 out: str | os.PathLike[str], *, lam: float | None = None,
                 argv: Sequence[str] = ()) -> dict:
  """Writes tables, figures and README.md into ``out``; returns the summary.

  Args:
    paths: run directories or directories holding runs.
    out: the report directory (created).
    lam: as for ``summarize``.
    argv: the command line, quoted in README.md.

  Returns:
    ``summarize(paths, lam)`` plus ``files``, the names written.
  """
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  runs, groups, table_lam, scale = _collect(paths, lam)
  summary = _summary(runs, groups, table_lam, scale)
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

  figures = []
  ratios = sorted({k[1] for k in groups if k[0] != 'SGD'}) or (
      [1] if any(k[0] == 'SGD' for k in groups) else [])
  for ratio in ratios:
    curves = _figure_curves(groups, ratio, table_lam, scale)
    if not curves:
      continue
    name = f'fig1_{ratio}.png'
    figure1(curves, ratio, setting, out / name)
    figures.append((name, f'Figure 1 style, compression ratio {ratio}'))
    def_curves = [c for c in curves if c.label in ('DEF', 'DEF-A', 'SGD')]
    if any(c.label == 'DEF' for c in def_curves) or any(
        c.label == 'DEF-A' for c in def_curves):
      def_results = [r for label in LAM_ROWS
                     for r in groups.get((label, ratio, table_lam), [])]
      until = _first_decay_epoch(def_results)
      name = f'fig3_{ratio}.png'
      figure3(def_curves, until, ratio, setting, out / name)
      figures.append((name, f'Figure 3 style, compression ratio {ratio}'))
  files += [name for name, _ in figures]

  summary['files'] = files
  (out / 'report.json').write_text(json.dumps(summary, indent=2) + '\n')
  files.append('report.json')
  (out / 'README.md').write_text(
      _readme(summary, table1, lam_table, figures, setting, runs, paths, argv))
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


def _readme(summary, table1, lam_table, figures, setting, runs, paths,
            argv) -> str:
  now = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
  lines = [f'# defjax report{": " + setting if setting else ""}', '',
           f'Made {now} by', '', '```',
           shlex.join(argv) if argv else
           'python -m defjax.report ' + shlex.join(str(p) for p in paths),
           '```', '']
  sweeps = _sweep_records(paths)
  if sweeps:
    lines += ['Sweeps:', '']
    for path, record in sweeps:
      machine = record.get('machine', {})
      packages = ', '.join(f'{k} {v}' for k, v in
                           record.get('packages', {}).items() if v)
      lines.append(f'- `{path}`: `{record.get("command", "?")}` on '
                   f'{record.get("date", "?")}, {machine.get("platform", "?")}'
                   f' ({machine.get("cpu_count", "?")} CPUs); {packages}')
    lines.append('')
  counts = collections.Counter(r.status for r in runs)
  lines += ['Runs: ' + ', '.join(f'{n} {s}' for s, n in sorted(counts.items()))
            + '.', '']
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
    lines += [f'- `{r.path}` at step {r.summary.get("diverged_at_step", "?")}'
              for r in sorted(diverged, key=lambda r: str(r.path))]
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
                  'from run directories.')
  parser.add_argument('paths', nargs='+', metavar='RUNDIR_OR_SWEEPDIR',
                      help='run directories or directories holding runs')
  parser.add_argument('--out', required=True, help='report directory')
  parser.add_argument('--lam', type=float, default=None,
                      help='lam of DEF/DEF-A in Table 1 and the figures '
                           '(default: the only one, else 0.3, else the most '
                           'common)')
  args = parser.parse_args(argv)
  try:
    summary = write_report(args.paths, args.out, lam=args.lam,
                           argv=['python', '-m', 'defjax.report', *argv])
  except FileNotFoundError as e:
    print(f'error: no such path: {e}', file=sys.stderr)
    return 2
  if not summary['runs']:
    print('error: no runs (directories with summary.json or metrics.jsonl) '
          f'under {", ".join(args.paths)}', file=sys.stderr)
    return 1
  print(table1_markdown(summary))
  print(f'report written to {args.out}: {", ".join(summary["files"])}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
