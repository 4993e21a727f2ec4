"""Any image dataset as ``<split>/<class>/*.jpg|png``, in a folder or a tar."""

from __future__ import annotations

import collections
import io
import pathlib
import tarfile
from typing import Iterator

import numpy as np
from PIL import Image

from defjax.training.data import cache
from defjax.training.data.split import SPLITS
from defjax.training.data.split import Split

_IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')


def load(data_dir: str | None, split: str) -> Split:
  arrays = arrays_of(data_dir)
  return Split(arrays[f'{split}_images'], arrays[f'{split}_labels'])


def arrays_of(data_dir: str | None) -> dict[str, np.ndarray]:
  """Both splits decoded, plus ``classes`` and the train set's ``mean``/``std``.

  Raises:
    FileNotFoundError: no ``data_dir``, or no images in it.
  """
  if not data_dir:
    raise FileNotFoundError(
        'image_folder needs config.data_dir: a directory or .tar holding'
        ' train/<class>/*.jpg|png and test/<class>/*.jpg|png'
    )
  root = pathlib.Path(data_dir).expanduser()
  if not root.exists():
    raise FileNotFoundError(
        f'image_folder: {root} does not exist; set config.data_dir to a'
        ' directory or .tar holding train/<class>/*.jpg|png and'
        ' test/<class>/*.jpg|png'
    )
  if root.is_dir():
    files = sorted(
        p
        for p in root.rglob('*')
        if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file()
    )
    key = cache.fingerprint('image_folder', files)
  else:
    key = cache.fingerprint('image_folder', [root])
  return cache.cached(key, lambda: _decode_folder(root), disk=True)


def _entries(root: pathlib.Path) -> Iterator[tuple[tuple[str, ...], bytes]]:
  """(path parts, encoded bytes) of every image under ``root`` (dir or tar)."""
  if root.is_dir():
    for path in root.rglob('*'):
      if path.suffix.lower() in _IMAGE_SUFFIXES and path.is_file():
        yield path.relative_to(root).parts, path.read_bytes()
    return
  # Streaming mode: a tar is read front to back once, compressed or not.
  with tarfile.open(root, mode='r|*') as tar:
    for member in tar:
      name = pathlib.PurePosixPath(member.name)
      if member.isfile() and name.suffix.lower() in _IMAGE_SUFFIXES:
        yield name.parts, tar.extractfile(member).read()


def _decode(data: bytes) -> np.ndarray:
  # Naming the formats skips probing every PIL plugin: ~10% of a small decode.
  with Image.open(io.BytesIO(data), formats=('JPEG', 'PNG')) as image:
    return np.asarray(image if image.mode == 'RGB' else image.convert('RGB'))


def _decode_folder(root: pathlib.Path) -> dict[str, np.ndarray]:
  """Decodes ``<split>/<class>/<file>`` images; class index = sorted names."""
  entries = {split: [] for split in SPLITS}
  for parts, data in _entries(root):
    # Any leading folders (e.g. a tar of 'cifar10/train/...') are ignored.
    if len(parts) >= 3 and parts[-3] in entries:
      entries[parts[-3]].append((parts[-2], parts[-1], data))
  classes = sorted({cls for cls, _, _ in entries['train']})
  if not classes or not entries['test']:
    raise FileNotFoundError(
        f'image_folder: {root} holds no train/<class>/*.jpg|png or no'
        ' test/<class>/*.jpg|png images'
    )
  unknown = sorted({cls for cls, _, _ in entries['test']} - set(classes))
  if unknown:
    raise ValueError(
        f'image_folder: {root} has test classes without train images: {unknown}'
    )
  index = {cls: i for i, cls in enumerate(classes)}
  arrays = {'classes': np.array(classes)}
  for split, items in entries.items():
    items.sort(key=lambda item: item[:2])  # archive order is not reproducible
    # Serial on purpose: for small images PIL holds the GIL for most of the
    # decode, and a thread pool measured slower than one thread.
    images = [_decode(data) for _, _, data in items]
    shapes = collections.Counter(image.shape for image in images)
    if len(shapes) > 1:
      (shape, _), *_ = shapes.most_common()
      odd = next(i for i, image in enumerate(images) if image.shape != shape)
      raise ValueError(
          f'image_folder: {root} mixes image sizes ({dict(shapes)}), e.g.'
          f' {split}/{items[odd][0]}/{items[odd][1]}; resize them to one'
          ' size first'
      )
    arrays[f'{split}_images'] = np.stack(images)
    arrays[f'{split}_labels'] = np.array(
        [index[cls] for cls, _, _ in items], np.int32
    )
  arrays['mean'], arrays['std'] = _channel_stats(arrays['train_images'])
  return arrays


def _channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std over all pixels, without a float copy of all."""
  channels = images.shape[-1]
  total = np.zeros(channels)
  total_sq = np.zeros(channels)
  for start in range(0, len(images), 4096):
    chunk = (
        images[start : start + 4096].reshape(-1, channels).astype(np.float64)
    )
    total += chunk.sum(0)
    total_sq += np.square(chunk).sum(0)
  count = images.size // channels
  mean = total / count
  return mean, np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
