r"""CIFAR-100 with Wide ResNet 28-10 (TFDS cifar100), the paper's recipe.

python train.py --config configs/cifar100_wrn28_10.py --workdir runs/c100-wrn
"""

from configs import cifar100_vgg16


def get_config():
  config = cifar100_vgg16.get_config()
  config.model = 'wrn28_10'
  return config
