r"""The long-horizon Fashion-MNIST study: 55 epochs, 25,740 steps of K = 8 x 16.

At ratio 256 every value is sent T / ratio = 100 times (the paper's CIFAR-10
runs: 305), enough for DEF's gap to SGD to be a property of the method rather
than of a short run (results/fashion_mnist_long). Per-leaf blocks and decays
at epochs 27 and 41 (int(0.5 E), int(0.75 E)) as in the authors' code.

  python train.py --config configs/fashion_mnist_long.py --workdir runs/fm-long-def256 \
      --config.optim.method=def --config.optim.ratio=256 --config.optim.lam=0.6
"""

from configs import fashion_mnist


def get_config():
  config = fashion_mnist.get_config()
  config.num_epochs = 55
  config.checkpoint_every_steps = 468  # one epoch of 60k / (8 x 16)
  config.max_to_keep = 1
  return config
