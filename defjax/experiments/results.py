"""Finished runs read back from disk and grouped into the paper's results.

The report (``report``) and the gap study (``gap``) read runs
the same way::

  collected = results.collect(['results/fashion_mnist/runs'])
  cell = results.cell(collected.groups[('DEF', 256, 0.3)], collected.scale)
  cell['text']  # '88.82 ± 0.43 (n=3)'

Every directory below the given paths that holds a ``summary.json`` or a
``metrics.jsonl`` (``defjax.training.runfiles``) is a run. What a run is (method,
ratio, lam, seed) comes from its config in summary.json, else from its
directory name as the sweep writes it. A run gives one result per model it
evaluates (``defjax.methods``): a def run gives DEF (``test_accuracy``, the
model y = x - mean e) and DEF-A (``test_accuracy_x``, the model x). Results
are grouped by (label, ratio, lam), one entry per seed.

Runs without ``summary.json`` (still going, or interrupted) are read but left
out of the groups: their numbers are not final.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from defjax import methods
from defjax.training import runfiles

DEFAULT_LAM = 0.3  # the paper's default, preferred when several lams exist
DASH = '—'  # a cell without a number


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
      series = [
          m[self.accuracy_key]
          for m in self.run.metrics
          if is_number(m.get(self.accuracy_key))
      ]
      value = series[-1] if series else None
    return value


# Results by (label, ratio, lam), one Result per seed.
Groups = dict[tuple, list[Result]]


class Collection(NamedTuple):
  """What ``collect`` read: every run, and the finished ones grouped."""

  runs: list[Run]
  groups: Groups
  lam: float | None  # the lam of DEF and DEF-A to show (``choose_lam``)
  scale: float  # 100 if accuracies are stored as fractions (``accuracy_scale``)


def is_number(value) -> bool:
  """A JSON number: not None, not a string, not a bool."""
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def config_get(config: dict, dotted: str, default=None):
  """``config['optim']['ratio']`` for 'optim.ratio', nested or flat."""
  if dotted in config:
    return config[dotted]
  return runfiles.config_value(config, dotted, default)


def _ratio(value) -> int | float:
  # Configs may hold the ratio as a float (256.0); show it as 256.
  value = float(value)
  return int(value) if value.is_integer() else value


def _norm_lam(lam) -> float | None:
  # Rounded so that 0.3 from a flag and 0.30000000000000004 from arithmetic
  # land in the same group.
  return None if lam is None else round(float(lam), 6)


def find_run_dirs(
    paths: Iterable[str | os.PathLike[str]],
) -> list[pathlib.Path]:
  """Every directory at or below ``paths`` holding a run's output files."""
  found = {}
  for root in paths:
    root = pathlib.Path(root)
    if not root.exists():
      raise FileNotFoundError(root)
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames.sort()
      if runfiles.SUMMARY in filenames or runfiles.METRICS in filenames:
        found[pathlib.Path(dirpath).resolve()] = None
        dirnames[:] = []  # checkpoints below a run are not runs
  return list(found)


def planned_steps(summary: dict) -> int | None:
  """T, the steps a run was set to train for, from its summary: what a
  diverged run would have run (its ``steps`` is where it stopped)."""
  config = summary.get('config') or {}
  budget = config_get(config, 'num_train_steps', 0)
  budget = budget if is_number(budget) else 0
  epochs, per_epoch = config_get(config, 'num_epochs'), summary.get(
      'steps_per_epoch'
  )
  if budget > 0 or (is_number(epochs) and is_number(per_epoch)):
    return runfiles.total_steps(
        budget, epochs, per_epoch
    )  # as the trainer does
  return summary.get('steps') if summary.get('status') == 'completed' else None


def shown(path: str | os.PathLike[str]) -> str:
  """``path`` as reports record it: relative to the working directory when
  below it (the repository root, for the committed reports), so that a report
  reads the same from any checkout; else absolute."""
  path = pathlib.Path(path).resolve()
  try:
    return str(path.relative_to(pathlib.Path.cwd().resolve()))
  except ValueError:
    return str(path)


def load_run(path: pathlib.Path) -> Run | None:
  """Reads one run directory; None if its method cannot be told."""
  summary = runfiles.read_summary(path) or {}  # cut off mid-write: unfinished
  config = summary.get('config') or {}
  named = runfiles.parse_run_name(path.name)  # the sweep's folder names
  method = config_get(config, 'optim.method')
  if method is None and named:
    method = named['method']
  if method not in methods.BY_NAME:
    return None
  ratio = config_get(config, 'optim.ratio')
  if ratio is None and named:
    ratio = named['ratio']
  lam = config_get(config, 'optim.lam')
  if lam is None and named:
    lam = named['lam']
  seed = config_get(config, 'seed')
  if seed is None and named:
    seed = named['seed']
  return Run(
      path=path,
      method=method,
      # SGD does not compress: whatever ratio its config carries, it is the
      # ratio-1 baseline.
      ratio=_ratio(ratio or 1) if methods.get(method).compresses else 1,
      lam=_norm_lam(lam) if method in methods.LAM_NAMES else None,
      seed=None if seed is None else int(seed),
      status=summary.get('status', 'completed') if summary else 'unfinished',
      summary=summary,
      config=config,
      metrics=runfiles.read_metrics(path),
  )


def results_of(run: Run) -> list[Result]:
  """The results one run contributes: two for def (y and x), one otherwise."""
  method = methods.get(run.method)
  results = [Result(method.label, run, 'test_accuracy', 'final_test_accuracy')]
  if method.x_label:
    results.append(
        Result(method.x_label, run, 'test_accuracy_x', 'final_test_accuracy_x')
    )
  return results


# What must agree between the seeds of one group (a run's identity).
RECIPE = runfiles.RECIPE


class IncompatibleRunsError(ValueError):
  """Runs that cannot be seeds of one result (``group``)."""


def _hashable(value):
  return (
      tuple(_hashable(v) for v in value) if isinstance(value, list) else value
  )


def recipe(run: Run) -> tuple:
  """The run's values of ``RECIPE`` (its defaults where the config lacks one)."""
  return tuple(
      _hashable(config_get(run.config, key, absent))
      for key, absent in RECIPE.items()
  )


def _where(key) -> str:
  label, ratio, lam = key
  return f'{label} at ratio {ratio}' + (
      '' if lam is None else f' (lam {lam:g})'
  )


def group(runs: list[Run]) -> Groups:
  """Results by (label, ratio, lam), finished runs only.

  Raises:
    IncompatibleRunsError: one group holds runs whose recipes differ (e.g. EF
      at two learning rates from two sweep folders) or two runs of one seed
      (the same run reached through two paths, or two folders of the same
      experiment): report them separately.
  """
  groups = collections.defaultdict(list)
  for run in runs:
    if run.status == 'unfinished':
      continue
    for result in results_of(run):
      groups[(result.label, run.ratio, run.lam)].append(result)
  for key, results in groups.items():
    recipes = {recipe(r.run): r.run.path for r in results}
    if len(recipes) > 1:
      (a, path_a), (b, path_b) = list(recipes.items())[:2]
      differ = ', '.join(
          f'{k} {x!r} vs {y!r}' for k, x, y in zip(RECIPE, a, b) if x != y
      )
      raise IncompatibleRunsError(
          f'{_where(key)} mixes runs that differ in {differ} ({path_a} vs '
          f'{path_b}); seeds of one result must share their settings: report '
          'these folders separately'
      )
  # A def_a run and a def run of the same seed compute the same x; count the
  # seed once and keep the run made for DEF-A.
  for key, results in groups.items():
    if key[0] == 'DEF-A':
      own = {r.run.seed for r in results if r.run.method == 'def_a'}
      groups[key] = [
          r for r in results if r.run.method == 'def_a' or r.run.seed not in own
      ]
  for key, results in groups.items():
    seen = {}
    for r in results:
      if (
          r.run.seed is not None
          and seen.setdefault(r.run.seed, r.run.path) != r.run.path
      ):
        raise IncompatibleRunsError(
            f'{_where(key)} has seed {r.run.seed} twice ({seen[r.run.seed]} and '
            f'{r.run.path}): one seed counts once; pass one of them'
        )
  return dict(groups)


def accuracy_scale(runs: list[Run]) -> float:
  """100 if accuracies are stored as fractions, else 1 (already in %)."""
  for run in runs:
    values = [
        run.summary.get('final_test_accuracy'),
        run.summary.get('final_test_accuracy_x'),
    ]
    values += [
        m.get(k)
        for m in run.metrics
        for k in ('test_accuracy', 'test_accuracy_x')
    ]
    if any(is_number(v) and v > 1.0 for v in values):
      return 1.0
  return 100.0


def cell(results: list[Result], scale: float) -> dict:
  """One group's final test accuracy (%) over seeds, as a table shows it.

  Args:
    results: one group of ``group``'s.
    scale: ``accuracy_scale``'s.

  Returns:
    ``mean`` and ``std`` (sample std, ddof = 1) over the non-diverged seeds
    (None without any), their ``values``, ``n`` seeds, ``diverged`` of them,
    ``seeds``, ``runs`` (paths) and ``text``: 'mean ± std (n=k)', or
    'diverged' / 'diverged (k/n)', as divergence is reported, not averaged.
  """
  diverged = sum(r.run.status == 'diverged' for r in results)
  values = [
      r.final_accuracy * scale
      for r in results
      if r.run.status != 'diverged' and is_number(r.final_accuracy)
  ]
  n = len(results)
  mean = float(np.mean(values)) if values else None
  std = (
      float(np.std(values, ddof=1))
      if len(values) > 1
      else (0.0 if values else None)
  )
  if diverged == n:
    text = 'diverged'
  elif diverged:
    text = f'diverged ({diverged}/{n})'
  elif mean is None:
    text = DASH
  elif len(values) == 1:
    text = f'{mean:.2f} (n=1)'
  else:
    text = f'{mean:.2f} ± {std:.2f} (n={len(values)})'
  return {
      'n': n,
      'diverged': diverged,
      'values': values,
      'mean': mean,
      'std': std,
      'text': text,
      'seeds': sorted(r.run.seed for r in results if r.run.seed is not None),
      'runs': [shown(r.run.path) for r in results],
  }


def choose_lam(groups: Groups, lam: float | None = None) -> float | None:
  """``lam`` if given; else the only lam, else 0.3, else the most common."""
  lams = collections.Counter()
  for (label, _, group_lam), results in groups.items():
    if label in methods.LAM_LABELS:
      lams[group_lam] += len(results)
  if lam is not None:
    return _norm_lam(lam)
  if len(lams) <= 1:
    return next(iter(lams), None)
  if DEFAULT_LAM in lams:
    return DEFAULT_LAM
  return max(lams, key=lambda l: (lams[l], -abs((l or 0) - DEFAULT_LAM)))


# What the report and gap commands turn into exit code 2, and how they say it.
INPUT_ERRORS = (FileNotFoundError, IncompatibleRunsError)


def input_error_line(error: Exception) -> str:
  """One line for stderr: a missing path (``find_run_dirs``) or runs that
  cannot be grouped (``group``)."""
  if isinstance(error, FileNotFoundError):
    return f'error: no such path: {error}'
  return f'error: {error}'


def collect(
    paths: Iterable[str | os.PathLike[str]], lam: float | None = None
) -> Collection:
  """Reads every run below ``paths`` and groups the finished ones.

  Args:
    paths: run directories or directories holding runs (e.g. a sweep).
    lam: passed to ``choose_lam``.

  Raises:
    FileNotFoundError: a path does not exist.
    IncompatibleRunsError: runs that cannot be seeds of one result (``group``).
  """
  runs = [r for r in (load_run(p) for p in find_run_dirs(paths)) if r]
  groups = group(runs)
  return Collection(runs, groups, choose_lam(groups, lam), accuracy_scale(runs))
