"""Prepared TFDS datasets, read with ``tfds.data_source`` (no TensorFlow)."""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

from absl import logging as absl_logging
import numpy as np

from defjax.training.data import cache
from defjax.training.data.split import Split


def source(name: str, data_dir: str | None, split: str):
  """The split's grain random-access source (ImageNet's test = validation).

  Its records are ``{'image': uint8 HWC or HW, 'label': int, ...}``, decoded
  on access.

  Raises:
    FileNotFoundError: the split is not prepared as array_record.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  tfds_split = (
      'validation' if name == 'imagenet2012' and split == 'test' else split
  )
  verbosity = absl_logging.get_verbosity()
  # Unprepared data also makes TFDS warn that a folder "has no
  # dataset_info.json", a second line before the one error below says.
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    # download=False: preparing needs TensorFlow and, for ImageNet, a manual
    # download; a training run should fail fast instead.
    return tfds.data_source(
        name, split=tfds_split, data_dir=data_dir, download=False
    )
  except (NotImplementedError, FileNotFoundError, KeyError):
    # TFDS reports unprepared data as "random access ... not supported", or,
    # found through TFDS_DATA_DIR, as a KeyError: "`splits` is empty".
    where = (
        data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
    )
    manual = (
        f' (with the ImageNet tars in {where}/downloads/manual)'
        if name == 'imagenet2012'
        else ''
    )
    folder = (
        ''
        if name == 'imagenet2012'
        else ', or train from JPEGs with --config.dataset=image_folder'
        ' --config.data_dir=PATH (a folder or .tar of train/<class>/* and'
        ' test/<class>/*)'
    )
    raise FileNotFoundError(
        f'{name} is not prepared as array_record in {where}: run `pip install'
        f" 'defjax[tfds]'` then `tfds build {name} --file_format=array_record"
        f' --data_dir={where}`{manual}, or set config.data_dir to a TFDS data'
        f' directory that has it{folder}'
    ) from None
  finally:
    absl_logging.set_verbosity(verbosity)


def example_image(example: Mapping[str, Any]) -> np.ndarray:
  """The example's image as HWC (grayscale datasets store HW)."""
  image = np.asarray(example['image'])
  return image if image.ndim == 3 else image[..., None]


def load(name: str, data_dir: str | None, split: str) -> Split:
  """The whole split decoded into memory, cached on disk by its files."""
  records = source(name, data_dir, split)

  def build():
    # One example at a time: a TFDS data source decodes each image anyway, and
    # the mocked sources of tfds.testing do not implement __getitems__.
    examples = (records[i] for i in range(len(records)))
    images, labels = zip(*((example_image(ex), ex['label']) for ex in examples))
    return {
        f'{split}_images': np.stack(images).astype(np.uint8, copy=False),
        f'{split}_labels': np.asarray(labels, np.int32),
    }

  # Cache on disk only when the prepared files are there to key it by (mocked
  # sources have none and must not leave a cache behind).
  version_dir = pathlib.Path(str(records.dataset_info.data_dir))
  files = sorted(version_dir.glob(f'*-{split}.array_record*'))
  if not files:
    arrays = build()
  else:
    key = cache.fingerprint(f'{name}-{split}-{len(records)}', files)
    arrays = cache.cached(key, build, disk=True)
  return Split(arrays[f'{split}_images'], arrays[f'{split}_labels'])
