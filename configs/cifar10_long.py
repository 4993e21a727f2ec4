r"""The long-horizon CIFAR-10 study on a CPU: slim VGG-16 with BN, 66 epochs.

The Fashion-MNIST long horizon (configs/fashion_mnist_long.py) has no batch
norm; this is the same length on the batch-normalised VGG-16 at 1/4 width
(configs/cifar10_vgg16_slim.py): 66 epochs of K = 8 x 16, 25,740 steps, so at
ratio 256 every value is sent T / ratio = 100 times (the paper: 305). Per-leaf
blocks, crop + flip, decays at epochs 33 and 49 (int(0.5 E), int(0.75 E)).
About 183 minutes of run time (SGD; DEF 211) on 2 CPU cores.

  python train.py --config configs/cifar10_long.py --workdir runs/c10-long-def256 \
      --config.optim.method=def --config.optim.ratio=256 \
      [--config.dataset=image_folder --config.data_dir=/path/to/cifar10-jpeg.tar]
"""

from configs import cifar10_vgg16_slim


def get_config():
  config = cifar10_vgg16_slim.get_config()
  config.num_epochs = 66
  config.max_to_keep = 1
  return config
