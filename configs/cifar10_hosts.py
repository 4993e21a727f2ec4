r"""CIFAR-10 on 2 hosts of 4 devices: hosts as workers (defjax.layouts.hosts).

The slim VGG-16 setting of configs/cifar10_vgg16_slim.py with K = 2 workers,
each a host of 4 data-parallel devices: a worker's 64 examples are split 16
per device, its gradient is the dense mean over the host's devices, and only
the per-leaf RBGS block crosses hosts, split 4 ways (each device sends
ceil(b / 4) values).

One process per host (here both on one machine; on a cluster each host runs
the same command with its own --process_id and HOST0's address):

  python train.py --config configs/cifar10_hosts.py --workdir runs/c10-hosts \
      --coordinator_address=HOST0:12345 --num_processes=2 --process_id=0
  python train.py --config configs/cifar10_hosts.py --workdir runs/c10-hosts \
      --coordinator_address=HOST0:12345 --num_processes=2 --process_id=1

with 4 devices per process (on a CPU-only machine:
XLA_FLAGS=--xla_force_host_platform_device_count=4). On one machine of 8
devices the same config runs as one process:

  python train.py --config configs/cifar10_hosts.py --workdir runs/c10-hosts \
      [--config.dataset=image_folder --config.data_dir=/path/to/cifar10-jpeg.tar]
"""

from configs import cifar10_vgg16_slim


def get_config():
  config = cifar10_vgg16_slim.get_config()
  config.update(num_workers=2, devices_per_host=4, batch_size=64)
  config.checkpoint_every_steps = 390  # one epoch of 50k / (2 x 64)
  return config
