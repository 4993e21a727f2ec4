"""Fashion-MNIST from its original idx files, downloaded if not installed."""

from __future__ import annotations

import gzip
import math
import os
import pathlib
import urllib.request

import numpy as np

from defjax.training.data import cache
from defjax.training.data.split import Split

# Where the Debian package dataset-fashion-mnist puts the files.
DEFAULT_DIR = '/usr/share/datasets/fashion-mnist'
URL = 'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/'
_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an idx file of unsigned bytes (raw or .gz), as in (Fashion-)MNIST.

  The format: two zero bytes, a type byte (0x08 = uint8), the number of
  dimensions, each dimension as a big-endian int32, then the values.
  """
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == '.gz' else open
  with opener(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[:2] != b'\0\0' or data[2] != 0x08:
    raise ValueError(
        f'{path}: not an idx file of uint8 (magic {data[:4].hex()})'
    )
  ndim = data[3]
  header = 4 + 4 * ndim
  shape = tuple(int(d) for d in np.frombuffer(data[4:header], dtype='>i4'))
  if len(data) != header + math.prod(shape):
    raise ValueError(
        f'{path}: header says shape {shape} ({math.prod(shape)} bytes) but'
        f' the file holds {len(data) - header} bytes'
    )
  return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load(data_dir: str | None, split: str) -> Split:
  """The split from ``data_dir`` (None: ``DEFAULT_DIR``), else a download."""
  image_path, label_path = _files(data_dir, split)

  def build():
    images = read_idx(image_path)
    labels = read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
      raise ValueError(
          f'{image_path} and {label_path}: expected (N, H, W) images and (N,)'
          f' labels, got {images.shape} and {labels.shape}'
      )
    return {
        f'{split}_images': images[..., None],
        f'{split}_labels': labels.astype(np.int32),
    }

  # Parsing the idx files takes well under a second: no disk cache.
  arrays = cache.cached(
      cache.fingerprint('fashion_mnist', [image_path, label_path]),
      build,
      disk=False,
  )
  return Split(arrays[f'{split}_images'], arrays[f'{split}_labels'])


def _find_idx(directory: pathlib.Path, base: str) -> pathlib.Path | None:
  for name in (base, f'{base}.gz'):
    if (directory / name).is_file():
      return directory / name
  return None


def _files(data_dir: str | None, split: str) -> list[pathlib.Path]:
  """The split's (images, labels) idx files, downloading them if needed."""
  download_dir = cache.cache_dir() / 'fashion-mnist'
  dirs = [pathlib.Path(data_dir or DEFAULT_DIR).expanduser(), download_dir]
  bases = _FILES[split]
  for directory in dirs:
    found = [_find_idx(directory, base) for base in bases]
    if all(found):
      return found
  try:
    for base in bases:
      _download(f'{URL}{base}.gz', download_dir / f'{base}.gz')
    return [download_dir / f'{base}.gz' for base in bases]
  except OSError as error:  # urllib's errors are OSErrors
    reason = error
  raise FileNotFoundError(
      f'Fashion-MNIST {split} idx files ({", ".join(bases)}, raw or .gz) not'
      f' in {" or ".join(map(str, dirs))}, and downloading them from'
      f' {URL} failed ({reason}): run `sudo apt-get install'
      ' dataset-fashion-mnist` or `make data`, or set config.data_dir to a'
      ' directory holding them'
  ) from None


def _download(url: str, path: pathlib.Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f'{path.name}.{os.getpid()}.part')
  try:
    with (
        urllib.request.urlopen(url, timeout=30) as response,
        open(tmp, 'wb') as f,
    ):
      f.write(response.read())
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
