r"""The paper's CIFAR-10 setting: VGG-16 (BN), K = 8 x 16, 200 epochs.

lr 0.05 (the authors use 0.01 for EF: add --config.optim.lr=0.01), momentum
0.9, weight decay 5e-4, lr / 10 at 50% and 75%, crop (pad 4) + flip.

  python train.py --config configs/cifar10_vgg16.py --workdir runs/vgg16-def256 \
      --config.optim.method=def --config.optim.ratio=256

With TFDS data instead of the JPEG folder:
--config.dataset=cifar10 --config.data_dir= (after tfds build cifar10
--file_format=array_record).
"""

import pathlib

from configs import default

# The shared data folder next to the repository, whatever the working directory.
CIFAR10_TAR = pathlib.Path(__file__).resolve().parents[2] / 'shared/data/cifar10-jpeg.tar'


def get_config():
  config = default.get_config()
  config.dataset = 'image_folder'
  config.data_dir = str(CIFAR10_TAR)
  config.model = 'vgg16'
  config.num_workers = 8
  config.batch_size = 16
  config.num_epochs = 200
  config.crop_padding = 4
  config.flip = True
  config.checkpoint_every_steps = 2000
  config.optim.lr = 0.05
  config.optim.weight_decay = 5e-4
  config.optim.decay_at = (0.5, 0.75)
  return config
