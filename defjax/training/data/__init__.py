"""Input pipeline: uint8 datasets, per-worker batch order, augmentation.

What the trainer uses, in this order:

* ``info(name, data_dir) -> DatasetInfo``: class count, shape, split sizes and
  the per-channel mean/std.
* ``train_input(...)``: a grain pipeline of this process's rows of each
  global step (``pipeline``), in the order ``WorkerBatches`` draws (``order``);
  its iterator's state resumes it exactly. ``eval_input(...)``: the test split
  at any indices.
* ``GlobalBatches``: the next steps' rows as the global arrays the step takes,
  placed by the workers' layout (``batches``).
* ``augment`` and ``standardize``: random crop + flip and normalisation in JAX,
  run on the accelerator inside the jitted step, so the host only gathers
  uint8 rows (``augmentation``).

Underneath, ``load(name, data_dir, split=...) -> Split`` holds a whole split
as uint8 NHWC images and int32 labels, decoded once per machine and cached
(``cache``), so that data loading never limits a run on a small host.
ImageNet is too big to hold decoded; its examples are decoded and cropped on
the host as they are read (``imagenet``).

Datasets (``registry``), one source module each; ``data_dir`` means:

* ``fashion_mnist``: the directory with the original idx files (default: the
  Debian package ``dataset-fashion-mnist``, then a download into the cache).
* ``image_folder``: a directory or ``.tar``/``.tar.gz`` holding
  ``train/<class>/*.jpg|png`` and ``test/<class>/*.jpg|png``.
* ``cifar10``, ``cifar100``, ``imagenet2012`` (``tfds``): the TFDS data
  directory with the dataset prepared as array_record (``tfds.data_source``
  reads it without TensorFlow; preparing it needs TensorFlow).
"""

from defjax.training.data.augmentation import augment
from defjax.training.data.augmentation import shift
from defjax.training.data.augmentation import standardize
from defjax.training.data.batches import GlobalBatches
from defjax.training.data.cache import cache_dir
from defjax.training.data.fashion_mnist import DEFAULT_DIR as FASHION_MNIST_DIR
from defjax.training.data.fashion_mnist import URL as FASHION_MNIST_URL
from defjax.training.data.fashion_mnist import read_idx
from defjax.training.data.imagenet import Stream
from defjax.training.data.order import WorkerBatches
from defjax.training.data.pipeline import EvalInput
from defjax.training.data.pipeline import StepIterator
from defjax.training.data.pipeline import TrainInput
from defjax.training.data.pipeline import eval_input
from defjax.training.data.pipeline import train_input
from defjax.training.data.registry import DATASETS
from defjax.training.data.registry import STREAMED
from defjax.training.data.registry import DatasetInfo
from defjax.training.data.registry import info
from defjax.training.data.registry import load
from defjax.training.data.registry import stream
from defjax.training.data.split import SPLITS
from defjax.training.data.split import Split

__all__ = [
    'DATASETS',
    'FASHION_MNIST_DIR',
    'FASHION_MNIST_URL',
    'SPLITS',
    'STREAMED',
    'DatasetInfo',
    'EvalInput',
    'GlobalBatches',
    'Split',
    'StepIterator',
    'Stream',
    'TrainInput',
    'WorkerBatches',
    'augment',
    'cache_dir',
    'eval_input',
    'info',
    'load',
    'read_idx',
    'shift',
    'standardize',
    'stream',
    'train_input',
]
