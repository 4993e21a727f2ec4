r"""The paper's CIFAR-10 setting (Table 1): the authors' VGG-16 with BN, K = 8 x 16.

200 epochs, lr 0.05 (the authors use 0.01 for EF: add --config.optim.lr=0.01),
momentum 0.9, weight decay 5e-4, lr / 10 at the start of epochs 100 and 150,
crop (pad 4) + flip, one RBGS block per leaf. CIFAR-10 comes from TFDS
(`pip install 'defjax[tfds]'`, then `tfds build cifar10 --file_format=array_record`):

  python train.py --config configs/cifar10_vgg16.py --workdir runs/vgg16-def256 \
      --config.optim.method=def --config.optim.ratio=256

A folder or .tar of train/<class>/*.jpg and test/<class>/*.jpg instead:
--config.dataset=image_folder --config.data_dir=/path/to/cifar10-jpeg.tar
"""

from configs import default


def get_config():
  config = default.get_config()
  config.update(dataset='cifar10', model='vgg16', num_epochs=200)
  config.update(crop_padding=4, flip=True, checkpoint_every_steps=2000)
  # K = 8 x 16, lr 0.05, momentum 0.9, weight decay 5e-4, decays at 50% and
  # 75%: the defaults are this setting's.
  return config
