r"""CIFAR-100 with VGG-16 (BN), the paper's CIFAR recipe (TFDS cifar100).

python train.py --config configs/cifar100_vgg16.py --workdir runs/c100-def256
"""

from configs import cifar10_vgg16


def get_config():
  config = cifar10_vgg16.get_config()
  config.dataset = 'cifar100'
  config.data_dir = ''
  return config
