r"""Quick start: DEF (lam 0.3, ratio 256) trains a small CNN on Fashion-MNIST.

K = 8 workers of 16 examples each, 3 epochs: about 2 minutes on 2 idle CPU
cores. These are exactly the defaults (configs/default.py documents each
field); this file names the setting so that other configs and the README
can point at it.

  python train.py --config configs/fashion_mnist.py --workdir runs/quickstart
"""

from configs import default


def get_config():
  return default.get_config()
