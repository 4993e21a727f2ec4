"""The paper's Figure 1 and Figure 3, drawn from grouped results.

``write_figures`` draws, for each compression ratio of a report:

- ``fig1_<ratio>.png``: test accuracy vs wall-clock time and vs epochs and
  training loss vs epochs, one line per method (mean over seeds, a band of
  ± one standard deviation), SGD on every ratio's figure (the paper's
  Figure 1).
- ``fig3_<ratio>.png``: DEF vs DEF-A test accuracy up to the first learning
  rate decay (the paper's Figure 3).

A method's curve is its seeds' eval series averaged at the steps they all
evaluated. matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import numpy as np

from defjax import methods
from defjax.experiments import results as results_lib

COLORS = {
    'SGD': 'black',
    'EF': 'tab:red',
    'SAEF': 'tab:orange',
    'PSync': 'tab:purple',
    'DEF': 'tab:blue',
    'DEF-A': 'tab:green',
    'EF21-SGDM': 'tab:brown',
    'EF21': 'tab:pink',
}


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')  # files only: no display needed
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


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


def _series(result: results_lib.Result, scale: float) -> dict[int, tuple]:
  rows = {}
  for m in result.run.metrics:
    if results_lib.is_number(m.get(result.accuracy_key)):
      rows[m.get('step')] = (
          m.get('epoch', math.nan),
          m.get('wall_time', math.nan),
          m[result.accuracy_key] * scale,
          m.get('train_loss')
          if results_lib.is_number(m.get('train_loss'))
          else math.nan,
      )
  return rows


def _curve(
    label: str, results: list[results_lib.Result], scale: float
) -> Curve | None:
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
        label=label,
        epoch=np.nanmean(data[:, :, 0], axis=0),
        wall_time=np.nanmean(wall, axis=0),
        accuracy=data[:, :, 2].mean(axis=0),
        accuracy_std=data[:, :, 2].std(axis=0),
        train_loss=data[:, :, 3].mean(axis=0),
        train_loss_std=data[:, :, 3].std(axis=0),
        n=len(series),
        diverged=diverged,
        methods=frozenset(r.run.method for r in kept),
    )


def _time_unit(seconds: float) -> tuple[float, str]:
  if seconds < 120:
    return 1.0, 's'
  if seconds < 2 * 3600:
    return 60.0, 'min'
  return 3600.0, 'h'


def _plot(ax, x, curve: Curve, y, y_std, label: str | None = None, **kwargs):
  label = (label or curve.label) + (' (diverged)' if curve.diverged else '')
  style = dict(
      color=COLORS[curve.label], lw=1.6, ls=':' if curve.diverged else '-'
  )
  style.update(kwargs)
  ax.plot(x, y, label=label, **style)
  if curve.n > 1:
    ax.fill_between(
        x, y - y_std, y + y_std, color=style['color'], alpha=0.15, lw=0
    )


def _figure_curves(groups, ratio, lam, scale) -> list[Curve]:
  curves = []
  for label in methods.LABELS:
    key = (
        label,
        1 if label == 'SGD' else ratio,
        lam if label in methods.LAM_LABELS else None,
    )
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


def figure1(
    curves: list[Curve], ratio: int, setting: str, path: pathlib.Path
) -> None:
  """Accuracy vs time, accuracy vs epochs, loss vs epochs (paper Fig. 1)."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), constrained_layout=True)
  max_wall = max(
      (
          np.nanmax(c.wall_time)
          for c in curves
          if np.isfinite(c.wall_time).any()
      ),
      default=0.0,
  )
  div, unit = _time_unit(max_wall)
  # DEF-A taken from def runs has DEF's training loss: one line, not two.
  shared_loss = any(c.label == 'DEF' for c in curves) and any(
      c.label == 'DEF-A' and c.methods == {'def'} for c in curves
  )
  for c in curves:
    _plot(axes[0], c.wall_time / div, c, c.accuracy, c.accuracy_std)
    _plot(axes[1], c.epoch, c, c.accuracy, c.accuracy_std)
    if c.label == 'DEF-A' and shared_loss:
      continue
    _plot(
        axes[2],
        c.epoch,
        c,
        c.train_loss,
        c.train_loss_std,
        label='DEF = DEF-A (same runs)'
        if c.label == 'DEF' and shared_loss
        else None,
    )
  axes[0].set(
      xlabel=f'wall-clock time ({unit})',
      ylabel='test accuracy (%)',
      title='Test accuracy vs wall-clock time',
  )
  axes[1].set(
      xlabel='epoch',
      ylabel='test accuracy (%)',
      title='Test accuracy vs epochs',
  )
  axes[2].set(
      xlabel='epoch', ylabel='training loss', title='Training loss vs epochs'
  )
  finite = np.concatenate(
      [c.train_loss[np.isfinite(c.train_loss)] for c in curves] or [np.zeros(0)]
  )
  if finite.size and finite.min() > 0 and finite.max() > 20 * finite.min():
    axes[2].set_yscale('log')
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(
        fontsize='small', title_fontsize='small', title=_legend_title(curves)
    )
  fig.suptitle(
      f'{setting + ": " if setting else ""}compression ratio {ratio} '
      '(SGD: no compression)'
  )
  fig.savefig(path, dpi=110)
  plt.close(fig)


def first_decay_epoch(results: list[results_lib.Result]) -> float | None:
  """The epoch of the first lr decay: decay_at[0] of the training length."""
  for r in results:
    config = r.run.config
    decay_at = results_lib.config_get(config, 'optim.decay_at')
    if not decay_at:
      continue
    first = float(sorted(decay_at)[0])
    steps = results_lib.config_get(config, 'num_train_steps')
    steps_per_epoch = r.run.summary.get('steps_per_epoch')
    if steps and steps_per_epoch:  # a step budget overrides num_epochs
      return first * steps / steps_per_epoch
    epochs = results_lib.config_get(config, 'num_epochs')
    if epochs and not steps:
      whole = results_lib.config_get(config, 'optim.decay_whole_epochs')
      return float(int(first * epochs)) if whole else first * float(epochs)
    # Neither tells the length: a completed run's last eval is its end.
    ends = [
        m['epoch']
        for m in r.run.metrics
        if results_lib.is_number(m.get('epoch'))
    ]
    if r.run.status == 'completed' and ends:
      return first * ends[-1]
  return None


def figure3(
    curves: list[Curve],
    until_epoch: float | None,
    ratio: int,
    setting: str,
    path: pathlib.Path,
) -> None:
  """DEF vs DEF-A before the first lr decay (paper Fig. 3)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.8), constrained_layout=True)
  for c in curves:
    keep = (
        c.epoch <= until_epoch + 1e-9
        if until_epoch is not None
        else np.ones_like(c.epoch, dtype=bool)
    )
    if c.label == 'SGD':  # a reference, not the comparison
      _plot(
          ax,
          c.epoch[keep],
          c,
          c.accuracy[keep],
          c.accuracy_std[keep],
          ls='--',
          lw=1.0,
          color='gray',
      )
    else:
      _plot(ax, c.epoch[keep], c, c.accuracy[keep], c.accuracy_std[keep])
  where = (
      f'up to the first lr decay (epoch {until_epoch:.3g})'
      if until_epoch is not None
      else 'whole run (no lr decay in config)'
  )
  ax.set(
      xlabel='epoch',
      ylabel='test accuracy (%)',
      title=f'DEF vs DEF-A, {where}\n'
      f'{setting + ", " if setting else ""}compression ratio {ratio}',
  )
  ax.grid(alpha=0.3)
  ax.legend(
      title=_legend_title(curves), fontsize='small', title_fontsize='small'
  )
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_figures(
    groups: results_lib.Groups,
    lam: float | None,
    scale: float,
    setting: str,
    out: pathlib.Path,
) -> list[tuple[str, str]]:
  """Draws Figure 1 (and Figure 3 where DEF or DEF-A ran) for each ratio.

  Args:
    groups: ``results.collect``'s.
    lam: the lam of the DEF and DEF-A curves.
    scale: ``results.accuracy_scale``'s.
    setting: 'dataset, model, length', for the titles.
    out: the folder the PNG files go to.

  Returns:
    (file name, caption) of each figure, in the order drawn.
  """
  figures = []
  ratios = sorted({k[1] for k in groups if k[0] != 'SGD'}) or (
      [1] if any(k[0] == 'SGD' for k in groups) else []
  )
  for ratio in ratios:
    curves = _figure_curves(groups, ratio, lam, scale)
    if not curves:
      continue
    name = f'fig1_{ratio}.png'
    figure1(curves, ratio, setting, out / name)
    figures.append((name, f'Figure 1 style, compression ratio {ratio}'))
    def_curves = [c for c in curves if c.label in ('DEF', 'DEF-A', 'SGD')]
    if any(c.label == 'DEF' for c in def_curves) or any(
        c.label == 'DEF-A' for c in def_curves
    ):
      def_results = [
          r
          for label in methods.LAM_LABELS
          for r in groups.get((label, ratio, lam), [])
      ]
      until = first_decay_epoch(def_results)
      name = f'fig3_{ratio}.png'
      figure3(def_curves, until, ratio, setting, out / name)
      figures.append((name, f'Figure 3 style, compression ratio {ratio}'))
  return figures
