r"""Trains one defjax run: the README's entry point (``defjax.main``).

  python train.py --config configs/fashion_mnist.py --workdir runs/quickstart

Flags, exit codes and multi-host use: ``python train.py --help`` and
``defjax/main.py``.
"""

from defjax import main

if __name__ == '__main__':
  main.run()
