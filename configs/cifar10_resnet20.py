r"""A fast CIFAR-10 setting for small machines: ResNet-20, K = 8 x 16.

python train.py --config configs/cifar10_resnet20.py --workdir runs/r20-def256
"""

from configs import cifar10_vgg16


def get_config():
  config = cifar10_vgg16.get_config()
  config.model = 'resnet20'
  config.num_epochs = 30
  return config
