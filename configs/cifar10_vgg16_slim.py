r"""CIFAR-10 on a 2-core CPU: VGG-16 at 1/4 width (0.92M parameters), K = 8 x 16.

The paper's CIFAR-10 setting (configs/cifar10_vgg16.py) with the VGG-16
layers at a quarter of the width and a short schedule, for the small-scale
reproduction in results/cifar10 (4 epochs; results/cifar10_12ep passes
num_epochs=12; lr / 10 at 50% and 75% of the epochs).

  python train.py --config configs/cifar10_vgg16_slim.py --workdir runs/slim-def256 \
      --config.optim.method=def --config.optim.ratio=256 \
      [--config.dataset=image_folder --config.data_dir=/path/to/cifar10-jpeg.tar]
"""

from configs import cifar10_vgg16


def get_config():
  config = cifar10_vgg16.get_config()
  config.model = 'vgg16_slim'
  config.num_epochs = 4
  config.checkpoint_every_steps = 390  # one epoch of 50k / (8 x 16)
  return config
