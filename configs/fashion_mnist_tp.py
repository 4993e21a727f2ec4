r"""The quick start with workers of two devices: tensor-parallel DEF.

K = 4 workers of M = 2 devices each on a ('data', 'model') mesh of 8
devices (defjax.layouts.sharded): the wide MLP 'mlp_tp' (784 -> 1024 ->
1024 -> 10, 1.86M parameters; its first layer column-parallel, its second row-parallel)
is sharded over each worker's 2 devices, and DEF (lam 0.3, ratio 256) keeps
one RBGS block per local shard of each leaf, all-reduced over 'data' only.
Everything else is the quick start's (configs/fashion_mnist.py): 16
examples per worker, 3 epochs. On a CPU-only machine train.py creates the
K x M = 8 CPU devices.

  python train.py --config configs/fashion_mnist_tp.py --workdir runs/quickstart-tp
"""

from configs import fashion_mnist


def get_config():
  config = fashion_mnist.get_config()
  config.model = 'mlp_tp'
  config.num_workers = 4
  config.model_axis_size = 2
  return config
