r"""Quick start: DEF (lam 0.3, ratio 256) trains a small CNN on Fashion-MNIST.

K = 8 workers of 16 examples each, 3 epochs: about 2 minutes on 2 idle CPU cores.

  python train.py --config configs/fashion_mnist.py --workdir runs/quickstart
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = 'fashion_mnist'
  config.model = 'cnn'
  config.num_workers = 8
  config.batch_size = 16
  config.num_epochs = 3
  config.optim.method = 'def'
  config.optim.ratio = 256.0
  config.optim.lam = 0.3
  config.optim.lr = 0.05
  config.optim.weight_decay = 5e-4
  return config
