"""``python -m defjax.gap``: ``defjax.experiments.gap``, kept where it was.

Commands recorded in sweep.json files and the reports' headers run it by this
name, with the same arguments and exit codes.
"""

import sys

from defjax.experiments.gap import main

if __name__ == '__main__':
  sys.exit(main())
