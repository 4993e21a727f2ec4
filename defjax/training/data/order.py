"""Which examples each of the K workers of Algorithm 1 draws at each step.

One permutation per epoch from ``(seed, epoch)``, cut into K * B distinct
examples per step, so each worker computes its stochastic gradient on its own
mini-batch, and any step (hence a resumed run) is reproducible from the step
number alone. Each process loads only its workers' rows.
"""

from __future__ import annotations

import numpy as np


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
