"""A split decoded into memory: the source of every dataset but ImageNet."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

SPLITS = ('train', 'test')


@dataclasses.dataclass(frozen=True)
class Split:
  """One split in memory: uint8 NHWC ``images`` and int32 ``labels``.

  A grain random-access source (``len(split)``, ``split[i]`` is the record
  ``{'image', 'label'}``), and ``batch`` gathers a whole step's rows with one
  fancy index instead of record by record.
  """

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

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {'image': self.images[index], 'label': self.labels[index]}

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(int(d) for d in self.images.shape[1:])

  def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``indices.shape + (H, W, C)`` and int32 labels."""
    return self.images[indices], self.labels[indices]
