"""The paper's methods in one table: what runs, what it is called, what it outputs.

The trainer builds a method from its row, the sweep lists the known names,
the report labels and orders its columns by it, and the benchmarks take their
lam from it. Every method of the paper except SGD is one of two recursions
(paper Algorithm 1, ``defjax.feedback``): error feedback at the detached
point x - lam e_k (EF: lam 0, DEF/DEF-A: lam in [0, 1], SAEF: lam 1), or
PSync. EF21 and EF21-SGDM, for comparison, are ``defjax.ef21``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional


class Method(NamedTuple):
  """One row of the table.

  Attributes:
    name: the ``optim.method`` value and the sweep's run-name prefix.
    label: the paper's name, a report column.
    compresses: False for the dense all-reduce baseline (SGD).
    lam: the detach coefficient the method fixes; None = ``optim.lam``.
    averaged_output: the model it reports is y = x - mean_k e_k (DEF; for
      PSync the same formula is mean_k x_k) rather than x.
    x_label: the label of the result read from x in the same run, when the
      reported model is y (a DEF run also yields DEF-A), else None.
    transform: the ``defjax.feedback`` transform that runs it when it
      compresses: 'error_feedback', 'psync' or 'ef21'.
    momentum: the momentum mu the method fixes; None = ``optim.momentum``.
  """

  name: str
  label: str
  compresses: bool
  lam: Optional[float]
  averaged_output: bool
  x_label: Optional[str] = None
  transform: str = 'error_feedback'
  momentum: Optional[float] = None

  def resolved_lam(self, lam: float) -> float:
    """The lam this method runs with: its own, or ``lam`` (DEF and DEF-A)."""
    return float(lam) if self.lam is None else self.lam


# In the paper's column order (Table 1), then the methods it does not tabulate.
# EF21 takes its gradient at x: lam 0.
TABLE = (
    Method('sgd', 'SGD', compresses=False, lam=None, averaged_output=False),
    Method('ef', 'EF', compresses=True, lam=0.0, averaged_output=False),
    Method('saef', 'SAEF', compresses=True, lam=1.0, averaged_output=False),
    Method(
        'psync',
        'PSync',
        compresses=True,
        lam=1.0,
        averaged_output=True,
        transform='psync',
    ),
    Method(
        'def',
        'DEF',
        compresses=True,
        lam=None,
        averaged_output=True,
        x_label='DEF-A',
    ),
    Method('def_a', 'DEF-A', compresses=True, lam=None, averaged_output=False),
    Method(
        'ef21_sgdm',
        'EF21-SGDM',
        compresses=True,
        lam=0.0,
        averaged_output=False,
        transform='ef21',
    ),
    Method(
        'ef21',
        'EF21',
        compresses=True,
        lam=0.0,
        averaged_output=False,
        transform='ef21',
        momentum=0.0,
    ),
)
BY_NAME = {m.name: m for m in TABLE}
NAMES = tuple(BY_NAME)
LABELS = tuple(m.label for m in TABLE)
# The methods (and result labels) whose result depends on optim.lam.
LAM_NAMES = tuple(m.name for m in TABLE if m.compresses and m.lam is None)
LAM_LABELS = tuple(m.label for m in TABLE if m.compresses and m.lam is None)


def get(name: str) -> Method:
  """The row of ``name``; ValueError naming the known methods otherwise."""
  try:
    return BY_NAME[name]
  except KeyError:
    raise ValueError(
        f'unknown method {name!r}; choose one of {", ".join(NAMES)}'
    ) from None


def resolved_lam(name: str, lam: float) -> float:
  """The lam ``name`` runs with: its own, or ``lam`` for DEF and DEF-A."""
  return get(name).resolved_lam(lam)


def resolved_momentum(name: str, momentum: float) -> float:
  """The momentum ``name`` runs with: ``momentum``, or 0 for plain EF21."""
  fixed = get(name).momentum
  return float(momentum) if fixed is None else fixed
