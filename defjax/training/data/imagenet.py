"""ImageNet's host-side preprocessing: decode, Inception crop, flip.

The decoded ImageNet train split (~1.3M images) does not fit in memory, so
each example is decoded and cropped when read, to ``image_size`` squares: the
train split gets an Inception-style random-resized crop and a random
horizontal flip, the test split a resize of the shorter side to
``image_size / 0.875`` and a center crop. The randomness of an example depends
only on ``(rng_key, index)`` (the trainer's key is ``(seed, step)``), so where
it is decoded (a thread, a grain worker process) and a resumed run change
nothing.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from defjax.training.data import tfds


def crop(
    example: Mapping[str, Any],
    *,
    train: bool,
    image_size: int,
    rng_key: Sequence[int],
    index: int,
) -> tuple[np.ndarray, int]:
  """(uint8 ``(image_size, image_size, 3)`` image, label) of one example."""
  image = Image.fromarray(tfds.example_image(example)).convert('RGB')
  size = (image_size, image_size)
  if train:
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


def crops(
    source,
    indices: np.ndarray,
    *,
    train: bool,
    image_size: int,
    rng_key: Sequence[int] = (0,),
    map_fn: Callable[[Callable[[int], Any], Iterable[int]], Iterable] = map,
) -> tuple[np.ndarray, np.ndarray]:
  """Images (uint8, ``indices.shape + (S, S, 3)``) and int32 labels.

  ``map_fn`` runs the per-example work: ``map`` in a grain worker process,
  a thread pool's ``map`` elsewhere.
  """
  indices = np.asarray(indices)

  def one(index):
    return crop(
        source[index],
        train=train,
        image_size=image_size,
        rng_key=rng_key,
        index=index,
    )

  examples = list(map_fn(one, [int(i) for i in indices.reshape(-1)]))
  images = np.stack([image for image, _ in examples])
  images = images.reshape(indices.shape + images.shape[1:])
  labels = np.array([label for _, label in examples], np.int32)
  return images, labels.reshape(indices.shape)


class Stream:
  """A split decoded and cropped on the host, batch by batch, in threads.

  For reading any indices at once (evaluation); the train pipeline decodes in
  grain worker processes instead (``pipeline.train_input``).
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
    self.image_shape = (image_size, image_size, 3)
    self._pool = concurrent.futures.ThreadPoolExecutor(
        num_threads or os.cpu_count()
    )

  def __len__(self) -> int:
    return len(self.source)

  def batch(
      self, indices: np.ndarray, rng_key: Sequence[int] = (0,)
  ) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8, ``indices.shape + (S, S, 3)``) and int32 labels."""
    return crops(
        self.source,
        indices,
        train=self.train,
        image_size=self.image_size,
        rng_key=rng_key,
        map_fn=self._pool.map,
    )


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
