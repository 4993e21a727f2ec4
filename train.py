r"""Trains one defjax run: the README's entry point (``defjax.training.main``).

  python train.py --config configs/fashion_mnist.py --workdir runs/quickstart

Flags, exit codes and multi-host use: ``python train.py --help`` and
``defjax/training/main.py``.
"""

from defjax.training import main

if __name__ == '__main__':
  main.run()
