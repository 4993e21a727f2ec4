"""Tests for defjax.training.data's grain pipeline: exact steps, resume, eval reads."""

import json
import multiprocessing

import grain
import numpy as np
import pytest

from defjax.training import data

# conftest's tiny_folder holds 48 train images: 4 steps of K * B per epoch.
K, B, SEED = 4, 3, 5
ROWS = slice(1, 3)  # this process's workers


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
  monkeypatch.setenv('DEFJAX_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setattr(data.cache, '_MEMO', type(data.cache._MEMO)())


def folder_input(path, **kwargs):
  return data.train_input(
      'image_folder',
      path,
      num_workers=K,
      batch_size=B,
      seed=SEED,
      worker_rows=ROWS,
      **kwargs,
  )


def assert_same_steps(got, expected):
  assert len(got) == len(expected)
  for (images, labels), (want_images, want_labels) in zip(got, expected):
    assert type(images) is np.ndarray and type(labels) is np.ndarray
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    assert images.shape == want_images.shape
    assert labels.shape == want_labels.shape
    np.testing.assert_array_equal(images, want_images)
    np.testing.assert_array_equal(labels, want_labels)


def test_train_input_yields_the_worker_batches_rows(tiny_folder):
  children = set(multiprocessing.active_children())
  train = folder_input(tiny_folder)
  assert (train.num_examples, train.steps_per_epoch, train.image_shape) == (
      48,
      4,
      (32, 32, 3),
  )
  split = data.load('image_folder', tiny_folder, split='train')
  order = data.WorkerBatches(
      48, num_workers=K, batch_size=B, seed=SEED, worker_slice=ROWS
  )
  it = train.iterator()
  assert isinstance(it, grain.DatasetIterator)
  # Steps 0-5 cross the epoch boundary at step 4.
  got = [next(it) for _ in range(6)]
  assert_same_steps(got, [split.batch(order.indices(t)) for t in range(6)])
  assert got[0][0].shape == (2, B, 32, 32, 3)
  assert it.get_state() == {'step': 6}
  late = train.iterator(start_step=9)
  assert_same_steps([next(late)], [split.batch(order.indices(9))])
  it.close()
  late.close()
  # In-memory sets read in a thread: no processes to start on 2 cores.
  assert set(multiprocessing.active_children()) <= children


def test_state_resumes_mid_epoch_through_json(tiny_folder):
  it = folder_input(tiny_folder).iterator(start_step=1)
  next(it)
  next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert state == {'step': 3}
  rest = [next(it) for _ in range(3)]  # steps 3-5: over the epoch boundary
  # A new pipeline, as in the process that resumes the run.
  resumed = folder_input(tiny_folder).iterator()
  resumed.set_state(state)
  assert_same_steps([next(resumed) for _ in range(3)], rest)
  assert resumed.get_state() == {'step': 6}
  it.set_state(state)  # a running iterator rewinds too
  assert_same_steps([next(it)], rest[:1])
  with pytest.raises(ValueError, match='step must be an int >= 0'):
    it.set_state({'step': -1})
  it.close()
  resumed.close()
  with pytest.raises(ValueError, match='closed iterator'):
    next(it)


def test_eval_input_reads_any_indices(tiny_folder):
  test = data.eval_input('image_folder', tiny_folder)
  split = data.load('image_folder', tiny_folder, split='test')
  assert (test.num_examples, test.image_shape) == (12, (32, 32, 3))
  indices = np.array([[3, 0, 11], [5, 5, 2]])
  images, labels = test.batch(indices)
  assert images.shape == (2, 3, 32, 32, 3) and images.dtype == np.uint8
  assert labels.shape == (2, 3) and labels.dtype == np.int32
  np.testing.assert_array_equal(images, split.images[indices])
  np.testing.assert_array_equal(labels, split.labels[indices])


def test_inputs_report_bad_names_paths_and_sizes(tiny_folder, tmp_path):
  kwargs = dict(num_workers=K, batch_size=B, seed=0, worker_rows=ROWS)
  with pytest.raises(ValueError, match='valid names'):
    data.train_input('mnist', None, **kwargs)
  with pytest.raises(ValueError, match='valid names'):
    data.eval_input('mnist', None)
  missing = str(tmp_path / 'nope.tar')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    data.train_input('image_folder', missing, **kwargs)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    data.eval_input('image_folder', missing)
  with pytest.raises(ValueError, match='fewer than one step'):
    data.train_input(
        'image_folder',
        tiny_folder,
        **(kwargs | dict(num_workers=7, batch_size=7)),
    )


def test_imagenet_steps_do_not_depend_on_the_decode_processes():
  tfds = pytest.importorskip('tensorflow_datasets')
  kwargs = dict(
      num_workers=2,
      batch_size=3,
      seed=7,
      worker_rows=slice(1, 2),
      image_size=16,
  )
  # 16 examples: 2 steps of 2 x 3 per epoch. The mocked source is picklable,
  # so grain's worker processes read it too.
  with tfds.testing.mock_data(num_examples=16):
    stream = data.stream('imagenet2012', None, split='train', image_size=16)
    order = data.WorkerBatches(
        16, num_workers=2, batch_size=3, seed=7, worker_slice=slice(1, 2)
    )
    expected = [stream.batch(order.indices(t), (7, t)) for t in range(5)]
    train = data.train_input('imagenet2012', None, decode_processes=0, **kwargs)
    assert (train.num_examples, train.steps_per_epoch, train.image_shape) == (
        16,
        2,
        (16, 16, 3),
    )
    in_thread = train.iterator()
    assert_same_steps([next(in_thread)], expected[:1])
    state = json.loads(json.dumps(in_thread.get_state()))
    assert_same_steps([next(in_thread) for _ in range(4)], expected[1:])
    in_thread.close()
    # Resumed in 2 processes from the state of the one-thread run.
    in_processes = data.train_input(
        'imagenet2012', None, decode_processes=2, **kwargs
    ).iterator()
    in_processes.set_state(state)
    try:
      assert_same_steps([next(in_processes) for _ in range(4)], expected[1:])
    finally:
      in_processes.close()


def test_imagenet_eval_input_center_crops():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=5):
    test = data.eval_input('imagenet2012', None, image_size=16)
    stream = data.stream('imagenet2012', None, split='test', image_size=16)
    assert (test.num_examples, test.image_shape) == (5, (16, 16, 3))
    indices = np.array([[4, 0], [2, 2]])
    assert_same_steps([test.batch(indices)], [stream.batch(indices)])
