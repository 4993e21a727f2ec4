"""The datasets by name: what each is, and which source reads it."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from defjax.training.data import fashion_mnist
from defjax.training.data import image_folder
from defjax.training.data import imagenet
from defjax.training.data import tfds
from defjax.training.data.split import SPLITS
from defjax.training.data.split import Split

DATASETS = (
    'cifar10',
    'cifar100',
    'fashion_mnist',
    'image_folder',
    'imagenet2012',
)
_TFDS = ('cifar10', 'cifar100', 'imagenet2012')
STREAMED = ('imagenet2012',)  # too big to hold decoded: use stream()


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the trainer need to know about a dataset.

  ``mean`` and ``std`` are per channel, in [0, 255] units (the units of the
  uint8 images ``standardize`` receives).
  """

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  train_size: int
  test_size: int


def _scaled(values: Sequence[float]) -> tuple[float, ...]:
  return tuple(255.0 * v for v in values)


# The usual published statistics of the training sets, so that runs are
# comparable with the literature.
_STATS = {
    'cifar10': (
        _scaled((0.4914, 0.4822, 0.4465)),
        _scaled((0.2470, 0.2435, 0.2616)),
    ),
    'cifar100': (
        _scaled((0.5071, 0.4865, 0.4409)),
        _scaled((0.2673, 0.2564, 0.2762)),
    ),
    'fashion_mnist': (_scaled((0.2860,)), _scaled((0.3530,))),
    'imagenet2012': (
        _scaled((0.485, 0.456, 0.406)),
        _scaled((0.229, 0.224, 0.225)),
    ),
}
_SHAPES = {
    'cifar10': (32, 32, 3),
    'cifar100': (32, 32, 3),
    'fashion_mnist': (28, 28, 1),
    'imagenet2012': (224, 224, 3),  # the default crop of stream()
}
_NUM_CLASSES = {
    'cifar10': 10,
    'cifar100': 100,
    'fashion_mnist': 10,
    'imagenet2012': 1000,
}


def check_name(name: str) -> None:
  if name not in DATASETS:
    raise ValueError(
        f'unknown dataset {name!r}; valid names: {", ".join(DATASETS)}'
    )


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(
        f'unknown split {split!r}; valid splits: {", ".join(SPLITS)}'
    )


def load(name: str, data_dir: str | None, *, split: str) -> Split:
  """Loads a whole split into memory as uint8 NHWC images and int32 labels.

  Args:
    name: one of ``DATASETS`` except ``imagenet2012`` (use ``stream``).
    data_dir: where the data is (see the package docstring); None for the
      default location of each dataset.
    split: 'train' or 'test'.

  Returns:
    The split. Decoding happens once per machine; later loads read the cache.

  Raises:
    ValueError: unknown ``name`` or ``split``.
    FileNotFoundError: the data is not there; the message says how to get it.
  """
  check_name(name)
  check_split(split)
  if name in STREAMED:
    raise ValueError(
        f'{name} is too big to hold decoded: use data.stream({name!r}, ...)'
    )
  if name == 'fashion_mnist':
    return fashion_mnist.load(data_dir, split)
  if name == 'image_folder':
    return image_folder.load(data_dir, split)
  return tfds.load(name, data_dir, split)


def stream(
    name: str, data_dir: str | None, *, split: str, image_size: int = 224
) -> imagenet.Stream:
  """A ``Stream`` over a prepared TFDS split (train: random crops + flips)."""
  check_name(name)
  check_split(split)
  if name not in _TFDS:
    raise ValueError(f'{name} is held in memory: use data.load({name!r}, ...)')
  return imagenet.Stream(
      tfds.source(name, data_dir, split),
      train=split == 'train',
      image_size=image_size,
  )


def info(name: str, data_dir: str | None = None) -> DatasetInfo:
  """Class count, image shape, split sizes and per-channel mean/std of ``name``.

  Sizes are those of the data actually found (so that mock or subset data
  stays consistent with ``load``); mean/std are the published constants,
  except for ``image_folder`` where they come from its train split (computed
  once and cached with the decoded arrays).
  """
  check_name(name)
  if name == 'image_folder':
    arrays = image_folder.arrays_of(data_dir)
    return DatasetInfo(
        name=name,
        num_classes=len(arrays['classes']),
        image_shape=tuple(int(d) for d in arrays['train_images'].shape[1:]),
        mean=tuple(float(m) for m in arrays['mean']),
        std=tuple(float(s) for s in arrays['std']),
        train_size=len(arrays['train_labels']),
        test_size=len(arrays['test_labels']),
    )
  if name == 'fashion_mnist':
    sizes = [len(fashion_mnist.load(data_dir, s)) for s in SPLITS]
  else:
    sizes = [len(tfds.source(name, data_dir, s)) for s in SPLITS]
  mean, std = _STATS[name]
  return DatasetInfo(
      name=name,
      num_classes=_NUM_CLASSES[name],
      image_shape=_SHAPES[name],
      mean=mean,
      std=std,
      train_size=sizes[0],
      test_size=sizes[1],
  )
