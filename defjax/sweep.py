"""``python -m defjax.sweep``: ``defjax.experiments.sweep``, kept where it was.

Commands recorded in sweep.json files and the reports' headers run it by this
name, with the same arguments and exit codes.
"""

import sys

if __name__ == '__main__':
  # Without the train extra: one line and exit 2, as defjax-train.
  from defjax import main as entry  # pylint: disable=g-import-not-at-top

  entry.require_train_extra('python -m defjax.sweep')
  from defjax.experiments.sweep import main  # pylint: disable=g-import-not-at-top

  sys.exit(main())
