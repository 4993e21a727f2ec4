"""Input pipeline: uint8 datasets, per-worker batch order, augmentation.

Three pieces, used by the trainer in this order:

* ``load(name, data_dir, split=...) -> Split``: a whole split as uint8 NHWC
  images and int32 labels, decoded once per machine and cached (on disk for
  JPEG/PNG folders and prepared TFDS data, in memory for the rest), so that
  data loading never limits a run on a small host. ``info(name)`` gives the
  class count, shape, sizes and the per-channel mean/std. ImageNet is too big
  to hold decoded; ``stream(...)`` decodes and crops it on the host instead.
* ``WorkerBatches``: which examples each of the K workers of Algorithm 1 draws
  at step t. One permutation per epoch from ``(seed, epoch)``, cut into K * B
  distinct examples per step, so each worker computes its stochastic gradient
  on its own mini-batch, and any step (hence a resumed run) is reproducible
  from the step number alone. Each process loads only its rows.
* ``augment`` and ``standardize``: random crop + flip and normalisation in JAX,
  run on the accelerator inside the jitted step, so the host only gathers
  uint8 rows.

Datasets (``data_dir`` means):

* ``fashion_mnist``: the directory with the original idx files (default: the
  Debian package ``dataset-fashion-mnist``, then a download into the cache).
* ``image_folder``: a directory or ``.tar``/``.tar.gz`` holding
  ``train/<class>/*.jpg|png`` and ``test/<class>/*.jpg|png``.
* ``cifar10``, ``cifar100``, ``imagenet2012``: the TFDS data directory with the
  dataset prepared as array_record (``tfds.data_source`` reads it without
  TensorFlow; preparing it needs TensorFlow).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import gzip
import hashlib
import io
import math
import os
import pathlib
import tarfile
import urllib.request
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

DATASETS = (
    'cifar10',
    'cifar100',
    'fashion_mnist',
    'image_folder',
    'imagenet2012',
)
_TFDS = ('cifar10', 'cifar100', 'imagenet2012')
STREAMED = ('imagenet2012',)  # too big to hold decoded: use stream()
SPLITS = ('train', 'test')

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_URL = (
    'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/'
)
_FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
_IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')
# Bump when the layout of a cached .npz changes, so stale caches are ignored.
_CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Split:
  """One split in memory: uint8 NHWC ``images`` and int32 ``labels``."""

  images: np.ndarray
  labels: np.ndarray

  def __post_init__(self):
    if self.images.dtype != np.uint8 or self.images.ndim != 4:
      raise ValueError(
          f'images must be uint8 NHWC, got {self.images.dtype}'
          f' {self.images.shape}'
      )
    if (
        self.labels.dtype != np.int32
        or self.labels.shape != self.images.shape[:1]
    ):
      raise ValueError(
          f'labels must be int32 of shape {self.images.shape[:1]}, got'
          f' {self.labels.dtype} {self.labels.shape}'
      )

  def __len__(self) -> int:
    return len(self.labels)


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
    'imagenet2012': (224, 224, 3),  # the crop stream() produces
}
_NUM_CLASSES = {
    'cifar10': 10,
    'cifar100': 100,
    'fashion_mnist': 10,
    'imagenet2012': 1000,
}


def _check_name(name: str) -> None:
  if name not in DATASETS:
    raise ValueError(
        f'unknown dataset {name!r}; valid names: {", ".join(DATASETS)}'
    )


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(
        f'unknown split {split!r}; valid splits: {", ".join(SPLITS)}'
    )


def load(name: str, data_dir: str | None, *, split: str) -> Split:
  """Loads a whole split into memory as uint8 NHWC images and int32 labels.

  Args:
    name: one of ``DATASETS`` except ``imagenet2012`` (use ``stream``).
    data_dir: where the data is (see the module docstring); None for the
      default location of each dataset.
    split: 'train' or 'test'.

  Returns:
    The split. Decoding happens once per machine; later loads read the cache.

  Raises:
    ValueError: unknown ``name`` or ``split``.
    FileNotFoundError: the data is not there; the message says how to get it.
  """
  _check_name(name)
  _check_split(split)
  if name in STREAMED:
    raise ValueError(
        f'{name} is too big to hold decoded: use data.stream({name!r}, ...)'
    )
  arrays = _load_arrays(name, data_dir, split)
  return Split(
      images=arrays[f'{split}_images'], labels=arrays[f'{split}_labels']
  )


def info(name: str, data_dir: str | None = None) -> DatasetInfo:
  """Class count, image shape, split sizes and per-channel mean/std of ``name``.

  Sizes are those of the data actually found (so that mock or subset data
  stays consistent with ``load``); mean/std are the published constants,
  except for ``image_folder`` where they come from its train split (computed
  once and cached with the decoded arrays).
  """
  _check_name(name)
  if name == 'image_folder':
    arrays = _image_folder_arrays(data_dir)
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
    sizes = [
        len(_load_arrays(name, data_dir, s)[f'{s}_labels']) for s in SPLITS
    ]
  else:
    sizes = [len(_tfds_source(name, data_dir, s)) for s in SPLITS]
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


def _load_arrays(
    name: str, data_dir: str | None, split: str
) -> Mapping[str, np.ndarray]:
  if name == 'fashion_mnist':
    return _fashion_mnist_arrays(data_dir, split)
  if name == 'image_folder':
    return _image_folder_arrays(data_dir)
  return _tfds_arrays(name, data_dir, split)


# ------------------------------------------------------------------- caching


def cache_dir() -> pathlib.Path:
  """``$DEFJAX_CACHE``, else ``~/.cache/defjax``: decoded arrays, downloads."""
  return pathlib.Path(
      os.environ.get('DEFJAX_CACHE') or '~/.cache/defjax'
  ).expanduser()


def _fingerprint(tag: str, paths: Sequence[pathlib.Path]) -> str:
  """A cache key that changes when any of ``paths`` is replaced or edited."""
  digest = hashlib.sha256(f'{_CACHE_VERSION}:{tag}'.encode())
  for path in paths:
    stat = path.stat()
    digest.update(
        f'\0{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}'.encode()
    )
  return f'{tag}-{digest.hexdigest()[:20]}'


# The last few decoded datasets, so that info() then load(train) then
# load(test) decode or read from disk once per process.
_MEMO: collections.OrderedDict[str, dict[str, np.ndarray]] = (
    collections.OrderedDict()
)
_MEMO_SIZE = 4


def _cached(
    key: str, build: Callable[[], dict[str, np.ndarray]], *, disk: bool
) -> dict[str, np.ndarray]:
  """``build()``, memoised in memory and, if ``disk``, in ``cache_dir()``."""
  if key in _MEMO:
    _MEMO.move_to_end(key)
    return _MEMO[key]
  path = cache_dir() / f'{key}.npz'
  arrays = None
  if disk and path.exists():
    try:
      with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError):  # a truncated file: rebuild it
      arrays = None
  if arrays is None:
    arrays = build()
    if disk:
      _write_npz(path, arrays)
  for array in arrays.values():
    array.flags.writeable = False  # shared by every load(): no edits in place
  _MEMO[key] = arrays
  while len(_MEMO) > _MEMO_SIZE:
    _MEMO.popitem(last=False)
  return arrays


def _write_npz(path: pathlib.Path, arrays: Mapping[str, np.ndarray]) -> None:
  # Write then rename, so a concurrent or interrupted run never sees half a
  # file. A read-only cache only costs speed, so it is not an error.
  tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, 'wb') as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except OSError:
    tmp.unlink(missing_ok=True)


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


# ------------------------------------------------------------- fashion_mnist


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


def _find_idx(directory: pathlib.Path, base: str) -> pathlib.Path | None:
  for name in (base, f'{base}.gz'):
    if (directory / name).is_file():
      return directory / name
  return None


def _fashion_mnist_files(
    data_dir: str | None, split: str
) -> list[pathlib.Path]:
  """The split's (images, labels) idx files, downloading them if needed."""
  download_dir = cache_dir() / 'fashion-mnist'
  dirs = [
      pathlib.Path(data_dir or FASHION_MNIST_DIR).expanduser(),
      download_dir,
  ]
  bases = _FASHION_MNIST_FILES[split]
  for directory in dirs:
    found = [_find_idx(directory, base) for base in bases]
    if all(found):
      return found
  try:
    for base in bases:
      _download(f'{FASHION_MNIST_URL}{base}.gz', download_dir / f'{base}.gz')
    return [download_dir / f'{base}.gz' for base in bases]
  except OSError as error:  # urllib's errors are OSErrors
    reason = error
  raise FileNotFoundError(
      f'Fashion-MNIST {split} idx files ({", ".join(bases)}, raw or .gz) not'
      f' in {" or ".join(map(str, dirs))}, and downloading them from'
      f' {FASHION_MNIST_URL} failed ({reason}): run `sudo apt-get install'
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


def _fashion_mnist_arrays(
    data_dir: str | None, split: str
) -> dict[str, np.ndarray]:
  image_path, label_path = _fashion_mnist_files(data_dir, split)

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
  return _cached(
      _fingerprint('fashion_mnist', [image_path, label_path]), build, disk=False
  )


# -------------------------------------------------------------- image_folder


def _image_folder_arrays(data_dir: str | None) -> dict[str, np.ndarray]:
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
    key = _fingerprint('image_folder', files)
  else:
    key = _fingerprint('image_folder', [root])
  return _cached(key, lambda: _decode_image_folder(root), disk=True)


def _folder_entries(
    root: pathlib.Path,
) -> Iterator[tuple[tuple[str, ...], bytes]]:
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


def _decode_image_folder(root: pathlib.Path) -> dict[str, np.ndarray]:
  """Decodes ``<split>/<class>/<file>`` images; class index = sorted names."""
  entries = {split: [] for split in SPLITS}
  for parts, data in _folder_entries(root):
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


# ---------------------------------------------------------------------- TFDS


def _tfds_source(name: str, data_dir: str | None, split: str):
  """``tfds.data_source`` of a prepared split (ImageNet's test = validation)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  tfds_split = (
      'validation' if name == 'imagenet2012' and split == 'test' else split
  )
  try:
    # download=False: preparing needs TensorFlow and, for ImageNet, a manual
    # download; a training run should fail fast instead.
    return tfds.data_source(
        name, split=tfds_split, data_dir=data_dir, download=False
    )
  except (NotImplementedError, FileNotFoundError):
    # TFDS reports unprepared data as "random access ... not supported".
    where = (
        data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
    )
    manual = (
        f' (with the ImageNet tars in {where}/downloads/manual)'
        if name == 'imagenet2012'
        else ''
    )
    raise FileNotFoundError(
        f'{name} is not prepared as array_record in {where}: run `pip install'
        f" 'defjax[tfds]'` then `tfds build {name} --file_format=array_record"
        f' --data_dir={where}`{manual}, or set config.data_dir to a TFDS data'
        ' directory that has it'
    ) from None


def _example_image(example: Mapping[str, Any]) -> np.ndarray:
  image = np.asarray(example['image'])
  return image if image.ndim == 3 else image[..., None]


def _tfds_arrays(
    name: str, data_dir: str | None, split: str
) -> dict[str, np.ndarray]:
  source = _tfds_source(name, data_dir, split)

  def build():
    # One example at a time: a TFDS data source decodes each image anyway, and
    # the mocked sources of tfds.testing do not implement __getitems__.
    examples = (source[i] for i in range(len(source)))
    images, labels = zip(
        *((_example_image(ex), ex['label']) for ex in examples)
    )
    return {
        f'{split}_images': np.stack(images).astype(np.uint8, copy=False),
        f'{split}_labels': np.asarray(labels, np.int32),
    }

  # Cache on disk only when the prepared files are there to key it by (mocked
  # sources have none and must not leave a cache behind).
  version_dir = pathlib.Path(str(source.dataset_info.data_dir))
  files = sorted(version_dir.glob(f'*-{split}.array_record*'))
  if not files:
    return build()
  key = _fingerprint(f'{name}-{split}-{len(source)}', files)
  return _cached(key, build, disk=True)


# ----------------------------------------------------------------- streaming


class Stream:
  """A split decoded and cropped on the host, batch by batch, in threads.

  For ImageNet, whose decoded train split (~1.3M images) does not fit in
  memory. The train split gets an Inception-style random-resized crop and a
  random horizontal flip, the test split a resize of the shorter side to
  ``image_size / 0.875`` and a center crop; both yield ``image_size`` squares.
  The randomness of an example depends only on ``(rng_key, index)``, so a
  resumed run sees the same crops.
  """

  def __init__(
      self,
      source,
      *,
      train: bool,
      image_size: int = 224,
      num_threads: int | None = None,
  ):
    self.source = source
    self.train = train
    self.image_size = image_size
    self._pool = concurrent.futures.ThreadPoolExecutor(
        num_threads or os.cpu_count()
    )

  def __len__(self) -> int:
    return len(self.source)

  def batch(
      self, indices: np.ndarray, rng_key: Sequence[int] = (0,)
  ) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8, ``indices.shape + (S, S, 3)``) and int32 labels."""
    indices = np.asarray(indices)
    flat = [int(i) for i in indices.reshape(-1)]
    examples = list(self._pool.map(lambda i: self._example(i, rng_key), flat))
    images = np.stack([image for image, _ in examples])
    images = images.reshape(indices.shape + images.shape[1:])
    labels = np.array([label for _, label in examples], np.int32)
    return images, labels.reshape(indices.shape)

  def _example(
      self, index: int, rng_key: Sequence[int]
  ) -> tuple[np.ndarray, int]:
    example = self.source[index]
    image = Image.fromarray(_example_image(example)).convert('RGB')
    size = (self.image_size, self.image_size)
    if self.train:
      rng = np.random.default_rng([*rng_key, index])
      box = _random_resized_box(rng, image.width, image.height)
      # Crop and resize in one resampling pass.
      image = image.resize(size, Image.Resampling.BILINEAR, box=box)
      if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    else:
      image = image.resize(
          size,
          Image.Resampling.BILINEAR,
          box=_center_box(image.width, image.height),
      )
    return np.asarray(image), int(example['label'])

  def batches(
      self,
      order: WorkerBatches,
      *,
      seed: int = 0,
      start_step: int = 0,
      prefetch: int = 2,
  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This process's (rows, B, S, S, 3) images and (rows, B) labels per step.

    Steps ``start_step, start_step + 1, ...`` of ``order``, ``prefetch``
    steps decoded ahead while the accelerator works.
    """
    loader = concurrent.futures.ThreadPoolExecutor(1)
    pending = collections.deque()
    step = start_step
    try:
      while True:
        while len(pending) <= prefetch:
          pending.append(
              loader.submit(self.batch, order.indices(step), (seed, step))
          )
          step += 1
        yield pending.popleft().result()
    finally:
      loader.shutdown(wait=False, cancel_futures=True)


def _random_resized_box(rng: np.random.Generator, width: int, height: int):
  """A box of 8%-100% of the area and aspect ratio 3/4-4/3 (Inception crop)."""
  area = width * height
  for _ in range(10):
    target = area * rng.uniform(0.08, 1.0)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w = round(math.sqrt(target * ratio))
    h = round(math.sqrt(target / ratio))
    if 0 < w <= width and 0 < h <= height:
      x = rng.integers(0, width - w + 1)
      y = rng.integers(0, height - h + 1)
      return (x, y, x + w, y + h)
  # Fall back to the central square, as the reference implementations do.
  side = min(width, height)
  return (
      (width - side) // 2,
      (height - side) // 2,
      (width + side) // 2,
      (height + side) // 2,
  )


def _center_box(width: int, height: int, crop_fraction: float = 0.875):
  """The box that resize-shorter-side-then-center-crop maps to the output."""
  side = min(width, height) * crop_fraction
  left, top = (width - side) / 2, (height - side) / 2
  return (left, top, left + side, top + side)


def stream(
    name: str, data_dir: str | None, *, split: str, image_size: int = 224
) -> Stream:
  """A ``Stream`` over a prepared TFDS split (train: random crops + flips)."""
  _check_name(name)
  _check_split(split)
  if name not in _TFDS:
    raise ValueError(f'{name} is held in memory: use data.load({name!r}, ...)')
  return Stream(
      _tfds_source(name, data_dir, split),
      train=split == 'train',
      image_size=image_size,
  )


# ------------------------------------------------------------- batch order


class WorkerBatches:
  """Which examples each worker draws at each global step; resumable.

  Epoch e uses the permutation ``default_rng([seed, e]).permutation(N)``,
  cut into ``steps_per_epoch = N // (K * B)`` steps of K * B distinct
  examples (the remainder is dropped). Worker k at step t, with
  ``(e, o) = position(t)``, gets
  ``perm[(o * K + k) * B : (o * K + k + 1) * B]``.
  ``worker_slice`` picks the workers (rows) whose examples this process loads.
  """

  def __init__(
      self,
      num_examples: int,
      *,
      num_workers: int,
      batch_size: int,
      seed: int,
      worker_slice: slice = slice(None),
  ):
    if num_workers < 1 or batch_size < 1:
      raise ValueError(
          'need num_workers >= 1 and batch_size >= 1, got'
          f' {num_workers} and {batch_size}'
      )
    if seed < 0:
      raise ValueError(f'seed must be >= 0, got {seed}')
    self.num_examples = num_examples
    self.num_workers = num_workers
    self.batch_size = batch_size
    self.seed = seed
    self.steps_per_epoch = num_examples // (num_workers * batch_size)
    if self.steps_per_epoch == 0:
      raise ValueError(
          f'{num_examples} examples are fewer than one step of'
          f' {num_workers} workers x {batch_size}'
      )
    self.workers = np.arange(num_workers)[worker_slice]
    # The last (epoch, permutation): ImageNet's is 10 MB and 20 ms to draw.
    self._perm = (-1, None)

  def position(self, step: int) -> tuple[int, int]:
    """(epoch, offset within the epoch) of a global step."""
    if step < 0:
      raise ValueError(f'step must be >= 0, got {step}')
    return divmod(step, self.steps_per_epoch)

  def permutation(self, epoch: int) -> np.ndarray:
    """The order of the train set in ``epoch``."""
    cached_epoch, perm = self._perm
    if cached_epoch != epoch:
      perm = np.random.default_rng([self.seed, epoch]).permutation(
          self.num_examples
      )
      self._perm = (epoch, perm)
    return perm

  def indices(self, step: int) -> np.ndarray:
    """(len(workers), batch_size) example indices of this process's workers."""
    epoch, offset = self.position(step)
    per_step = self.num_workers * self.batch_size
    block = self.permutation(epoch)[offset * per_step : (offset + 1) * per_step]
    return block.reshape(self.num_workers, self.batch_size)[self.workers]


def batches(
    split: Split, order: WorkerBatches, *, start_step: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Per step, this process's (rows, B, H, W, C) images and (rows, B) labels."""
  step = start_step
  while True:
    index = order.indices(step)
    yield split.images[index], split.labels[index]
    step += 1


# -------------------------------------------------------------- augmentation


def shift(images: jax.Array, offsets: jax.Array, *, pad: int) -> jax.Array:
  """The window at ``offsets`` (dy, dx in [0, 2 pad]) of each zero-padded image.

  Args:
    images: (N, H, W, C).
    offsets: (N, 2) int; (pad, pad) is the unshifted image.
    pad: zero padding on each side.

  Returns:
    (N, H, W, C), same dtype.
  """
  _, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  zero = jnp.zeros((), offsets.dtype)
  return jax.vmap(
      lambda image, o: jax.lax.dynamic_slice(
          image, (o[0], o[1], zero), (h, w, c)
      )
  )(padded, offsets)


def augment(
    images: jax.Array, key: jax.Array, *, pad: int = 4, flip: bool = True
) -> jax.Array:
  """Random crop with zero padding ``pad`` and random horizontal flip.

  Each image gets its own crop offset and flip. Pure JAX: jit it with
  ``static_argnames=('pad', 'flip')`` or call it inside a jitted step.

  Args:
    images: uint8 (..., H, W, C); any leading dimensions (e.g. workers, batch).
    key: a PRNG key.
    pad: zero padding on each side; crops shift by up to ``pad`` pixels.
    flip: whether to flip left-right with probability 1/2.

  Returns:
    The augmented images, same shape and dtype.
  """
  images = jnp.asarray(images)
  flat = images.reshape((-1,) + images.shape[-3:])
  crop_key, flip_key = jax.random.split(key)
  if pad:
    offsets = jax.random.randint(crop_key, (flat.shape[0], 2), 0, 2 * pad + 1)
    flat = shift(flat, offsets, pad=pad)
  if flip:
    flipped = jax.random.bernoulli(flip_key, 0.5, (flat.shape[0], 1, 1, 1))
    flat = jnp.where(flipped, flat[:, :, ::-1, :], flat)
  return flat.reshape(images.shape)


def standardize(
    images: jax.Array, mean: Sequence[float], std: Sequence[float]
) -> jax.Array:
  """(images - mean) / std per channel, as float32 (mean, std in [0, 255])."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (jnp.asarray(images).astype(jnp.float32) - mean) / std
