"""``python -m defjax.report``: ``defjax.experiments.report``, kept where it was.

Commands recorded in sweep.json files and the reports' headers run it by this
name, with the same arguments and exit codes.
"""

import sys

from defjax.experiments.report import main

if __name__ == '__main__':
  sys.exit(main())
