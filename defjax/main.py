"""The training program's entry point: ``defjax-train``, ``train.py`` and
``python -m defjax.main`` start here, then run ``defjax.training.main``.

Kept where it was: the sweep's recorded commands (sweep.json) and running
queues start the program by this name, with the same flags and exit codes.

The library needs only jax, flax, optax and numpy; the program needs the
``train`` extra too. Without it this answers with one line and exit status 2
(a bad set-up, nothing trained) instead of an ImportError traceback, before
anything of the program is imported.
"""

import importlib.util
import sys

from defjax.training import runfiles

# What the training program imports beyond the library's dependencies: the
# modules of pyproject's `train` extra (tests/test_install.py checks both
# directions against the extra and the program's imports).
TRAIN_MODULES = (
    'absl',
    'ml_collections',
    'orbax.checkpoint',
    'grain',
    'PIL',
    'tqdm',
    'tensorflow_datasets',
)


def missing_train_modules() -> list[str]:
  """The modules of ``TRAIN_MODULES`` this interpreter cannot import."""
  missing = []
  for name in TRAIN_MODULES:
    try:
      found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package ('orbax') is missing
      found = False
    if not found:
      missing.append(name)
  return missing


def require_train_extra(program: str = 'the training program') -> None:
  """Exits with one line and status 2 if ``TRAIN_MODULES`` are missing.

  Args:
    program: what needs them, as the line names it.
  """
  missing = missing_train_modules()
  if missing:
    print(
        f"error: {program} needs pip install 'defjax[train]'"
        f" (not installed: {', '.join(missing)})",
        file=sys.stderr,
    )
    sys.exit(runfiles.EXIT_BAD_CONFIG)


def run():
  """The console entry point (``defjax-train``)."""
  require_train_extra()
  from defjax.training import main  # pylint: disable=g-import-not-at-top

  main.run()


if __name__ == '__main__':
  run()
