"""A train step's batch as the step takes it: global arrays over the workers.

``GlobalBatches`` reads the next n steps from a ``TrainInput``'s iterator
(this process's workers' rows only), adds the (step, worker) ids that key
augmentation and dropout, and has the workers' layout put the rows on the
devices (``Layout.global_batch``, ``defjax.layouts``), stacked for a call that
runs several steps.
"""

from __future__ import annotations

import numpy as np


class GlobalBatches:
  """The train iterator's next n steps as global arrays for the step.

  Each process reads only its workers' rows; with ``stacked`` the arrays are
  (n, K, ...) for a multi-step call, else (K, ...). The (step, worker) ids
  that key augmentation and dropout travel with them, one row per example.
  """

  def __init__(self, train, layout, step: int, data_state, *, stacked: bool):
    self.iterator = train.iterator(step)
    if (
        data_state is not None
    ):  # checkpoints from before the grain pipeline have none
      self.iterator.set_state(data_state)
    self.layout, self.step, self.stacked = layout, step, stacked
    self.rows = layout.worker_rows()

  def next(self, n: int):
    K = self.layout.num_workers
    per_step = []
    for _ in range(n):
      images, labels = next(self.iterator)
      ids = np.stack([np.full(K, self.step), np.arange(K)], 1)[
          self.rows
      ].astype(np.int32)
      # One (step, worker) row per example: every batch leaf is (K, n, ...),
      # which a layout may split over a worker's devices (layouts.hosts).
      ids = np.broadcast_to(ids[:, None], (ids.shape[0], labels.shape[1], 2))
      per_step.append((images, labels, ids))
      self.step += 1
    return tuple(
        self.layout.global_batch(
            np.stack(arrays) if self.stacked else arrays[0],
            stacked=self.stacked,
        )
        for arrays in zip(*per_step)
    )

  def state(self) -> dict:
    return self.iterator.get_state()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.iterator.close()  # ends prefetch threads and decode processes now
