"""``python -m defjax.main``: the training program, ``defjax.training.main``.

Kept where it was: ``train.py``, the sweep's recorded commands (sweep.json)
and running queues start the program by this name, with the same flags and
exit codes.
"""

from defjax.training.main import run

if __name__ == '__main__':
  run()
