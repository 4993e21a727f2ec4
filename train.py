r"""Trains one defjax run: the README's entry point (``defjax.training.main``).

  python train.py --config configs/fashion_mnist.py --workdir runs/quickstart

Flags, exit codes and multi-host use: ``python train.py --help`` and
``defjax/training/main.py``. Without the ``train`` extra: one line naming it,
exit 2 (``defjax/main.py``).
"""

from defjax import main

if __name__ == '__main__':
  main.run()
