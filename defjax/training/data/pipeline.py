"""The input pipeline the trainer iterates: grain datasets of whole steps.

Element t of the train dataset is global step t: the indices ``WorkerBatches``
gives this process's workers at step t, read from the split's random-access
source and stacked into uint8 images ``(rows, B, H, W, C)`` and int32 labels
``(rows, B)``. In-memory splits gather a step with one fancy index, prefetched
in a thread. Streamed splits (ImageNet) decode and crop each example on the
host, which is CPU-bound, so whole steps are decoded in grain worker processes
(``mp_prefetch``); the crop of an example depends only on
``(seed, step, index)``, so the arrays do not depend on how many processes
decode them.

The test split is read at indices the evaluator picks (``eval_input``).
"""

from __future__ import annotations

import os
from typing import Any, Callable

from absl import flags
import grain
import numpy as np

from defjax.training.data import imagenet
from defjax.training.data import registry
from defjax.training.data import tfds
from defjax.training.data.order import WorkerBatches
from defjax.training.data.split import Split

# grain datasets are finite; no run takes this many steps.
_NO_END = 2**62


class _StepIndices(grain.transforms.Map):
  """step -> (step, this process's (rows, B) example indices at that step)."""

  def __init__(self, order: WorkerBatches):
    self._order = order

  def map(self, step: int) -> tuple[int, np.ndarray]:
    return step, self._order.indices(step)


class _Gather(grain.transforms.Map):
  """(step, indices) -> the in-memory split's images and labels there."""

  def __init__(self, split: Split):
    self._split = split

  def map(self, element: tuple[int, np.ndarray]):
    _, indices = element
    return self._split.batch(indices)


class _DecodeCrop(grain.transforms.Map):
  """(step, indices) -> Inception crops keyed by (seed, step, index)."""

  def __init__(self, source, *, image_size: int, seed: int):
    self._source = source
    self._image_size = image_size
    self._seed = seed

  def map(self, element: tuple[int, np.ndarray]):
    step, indices = element
    # One example after another: the processes are the parallelism.
    return imagenet.crops(
        self._source,
        indices,
        train=True,
        image_size=self._image_size,
        rng_key=(self._seed, step),
    )


class StepIterator(grain.DatasetIterator):
  """The steps of a ``TrainInput`` from a given step on.

  Its state is the next step, ``{'step': t}``, rather than the positions
  inside grain's iterators: those depend on the number of decode processes,
  which may differ on the machine that resumes the run. ``set_state`` starts
  the pipeline afresh at ``t``; the processes start on the first ``next``.
  """

  def __init__(
      self, dataset_from: Callable[[int], grain.IterDataset], step: int
  ):
    self._dataset_from = dataset_from
    self._step = _check_step(step)
    self._steps = None  # grain's iterator, from self._step, once started
    super().__init__()

  def __next__(self) -> tuple[np.ndarray, np.ndarray]:
    self._assert_not_closed()
    if self._steps is None:
      self._steps = iter(self._dataset_from(self._step))
    images, labels = next(self._steps)
    self._step += 1
    # Plain arrays: from worker processes they come as views of shared memory.
    return np.asarray(images), np.asarray(labels)

  def get_state(self) -> dict[str, Any]:
    return {'step': self._step}

  def set_state(self, state: dict[str, Any]) -> None:
    self._stop()
    self._step = _check_step(state['step'])

  def start_prefetch(self) -> None:
    self._assert_not_closed()
    if self._steps is None:
      self._steps = iter(self._dataset_from(self._step))
    self._steps.start_prefetch()

  def close(self) -> None:
    self._stop()
    super().close()

  def _stop(self) -> None:
    if self._steps is not None:
      self._steps.close()  # ends any decode processes now, not at exit
      self._steps = None

  def __str__(self) -> str:
    return f'StepIterator(step={self._step})'


def _check_step(step: Any) -> int:
  if isinstance(step, bool) or int(step) != step or step < 0:
    raise ValueError(f'step must be an int >= 0, got {step!r}')
  return int(step)


class TrainInput:
  """This process's rows of every train step, as a grain pipeline.

  Attributes:
    order: which examples each worker draws at each step.
    num_examples: the size of the train split.
    steps_per_epoch: steps that see each example at most once.
    image_shape: (H, W, C) of the images it yields.
  """

  def __init__(
      self,
      order: WorkerBatches,
      read: grain.transforms.Map,
      *,
      image_shape: tuple[int, int, int],
      decode_processes: int,
  ):
    self.order = order
    self.num_examples = order.num_examples
    self.steps_per_epoch = order.steps_per_epoch
    self.image_shape = image_shape
    self._read = read
    self._decode_processes = decode_processes

  def dataset(self, start_step: int = 0) -> grain.IterDataset:
    """Steps ``start_step, start_step + 1, ...`` as a grain ``IterDataset``."""
    steps = (
        grain.MapDataset.range(start_step, _NO_END)
        .map(_StepIndices(self.order))
        .map(self._read)
    )
    if not self._decode_processes:
      # Two steps gathered ahead in a thread, while the device computes.
      return steps.to_iter_dataset(
          grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
      )
    # Process i decodes steps start + i, start + i + P, ...; grain
    # interleaves them back in order. One step ahead per process bounds the
    # memory to about 2 P steps.
    _let_grain_read_its_flags()
    return steps.to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)
    ).mp_prefetch(
        grain.MultiprocessingOptions(
            num_workers=self._decode_processes, per_worker_buffer_size=1
        )
    )

  def iterator(self, start_step: int = 0) -> StepIterator:
    """Yields (images, labels) of steps ``start_step``, ``start_step + 1``..."""
    return StepIterator(self.dataset, start_step)


def _let_grain_read_its_flags() -> None:
  # grain (0.2.18 and its main branch) reads
  # --grain_enable_multiprocess_worker_profiling when it starts processes,
  # which absl refuses before the flags are parsed: in any program that does
  # not run absl.app (tests, notebooks). A flag marked present is readable
  # and keeps its value, as grain does for its own debug flags in workers.
  name = 'grain_enable_multiprocess_worker_profiling'
  if not flags.FLAGS.is_parsed() and name in flags.FLAGS:
    flags.FLAGS[name].present = True


def train_input(
    name: str,
    data_dir: str | None,
    *,
    num_workers: int,
    batch_size: int,
    seed: int,
    worker_rows: slice,
    image_size: int = 224,
    decode_processes: int | None = None,
) -> TrainInput:
  """The train pipeline of ``name`` for the workers ``worker_rows`` of K.

  Args:
    name: one of ``DATASETS``.
    data_dir: where the data is (see the package docstring); None for the
      default location of each dataset.
    num_workers: K, the workers of Algorithm 1.
    batch_size: B, each worker's mini-batch.
    seed: the seed of the per-epoch order (and of ImageNet's crops).
    worker_rows: the workers whose rows this process loads.
    image_size: the side of ImageNet's crops; in-memory sets keep their size.
    decode_processes: grain worker processes that decode ImageNet steps;
      None: one per CPU; 0: a thread of this process. In-memory sets never
      start processes.

  Raises:
    ValueError: unknown ``name``, or a train split smaller than one step.
    FileNotFoundError: the data is not there; the message says how to get it.
  """
  registry.check_name(name)
  if name in registry.STREAMED:
    source = tfds.source(name, data_dir, 'train')
    read = _DecodeCrop(source, image_size=image_size, seed=seed)
    image_shape = (image_size, image_size, 3)
    if decode_processes is None:
      decode_processes = os.cpu_count() or 1
  else:
    source = registry.load(name, data_dir, split='train')
    read = _Gather(source)
    image_shape = source.image_shape
    decode_processes = 0
  order = WorkerBatches(
      len(source),
      num_workers=num_workers,
      batch_size=batch_size,
      seed=seed,
      worker_slice=worker_rows,
  )
  return TrainInput(
      order, read, image_shape=image_shape, decode_processes=decode_processes
  )


class EvalInput:
  """The test split, read at any indices (the evaluator picks them)."""

  def __init__(self, source: Split | imagenet.Stream):
    self._source = source
    self.num_examples = len(source)
    self.image_shape = tuple(source.image_shape)

  def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``indices.shape + (H, W, C)`` and int32 labels."""
    return self._source.batch(np.asarray(indices))


def eval_input(
    name: str, data_dir: str | None, *, image_size: int = 224
) -> EvalInput:
  """The test split of ``name``; ImageNet's is center-cropped to ``image_size``.

  Raises:
    ValueError: unknown ``name``.
    FileNotFoundError: the data is not there; the message says how to get it.
  """
  registry.check_name(name)
  if name in registry.STREAMED:
    return EvalInput(
        registry.stream(name, data_dir, split='test', image_size=image_size)
    )
  return EvalInput(registry.load(name, data_dir, split='test'))
