"""Tests for defjax.training.data's sources, cache, batch order and augmentation.

The grain pipeline over them is tested in test_data_pipeline.py.
"""

import gzip
import pathlib
import tarfile

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from defjax.training import data

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR_TAR = next(
    (
        p
        for p in (
            pathlib.Path('/work/shared/data/cifar10-jpeg.tar'),
            REPO.parent / 'shared' / 'data' / 'cifar10-jpeg.tar',
        )
        if p.is_file()
    ),
    None,
)
FASHION_MNIST = pathlib.Path(data.FASHION_MNIST_DIR)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
  """Each test gets an empty cache, on disk and in memory."""
  monkeypatch.setenv('DEFJAX_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setattr(data.cache, '_MEMO', type(data.cache._MEMO)())


def idx_bytes(array):
  array = np.asarray(array, np.uint8)
  header = (
      bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, '>i4').tobytes()
  )
  return header + array.tobytes()


def write_idx(path, array):
  raw = idx_bytes(array)
  path.write_bytes(gzip.compress(raw) if path.suffix == '.gz' else raw)


# --------------------------------------------------------------------- idx


@pytest.mark.parametrize('suffix', ['', '.gz'])
def test_read_idx(tmp_path, suffix):
  images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  write_idx(tmp_path / f'images{suffix}', images)
  np.testing.assert_array_equal(
      data.read_idx(tmp_path / f'images{suffix}'), images
  )
  labels = np.array([7, 1, 0], np.uint8)
  write_idx(tmp_path / f'labels{suffix}', labels)
  np.testing.assert_array_equal(
      data.read_idx(tmp_path / f'labels{suffix}'), labels
  )


def test_read_idx_rejects_bad_files(tmp_path):
  (tmp_path / 'magic').write_bytes(
      b'\x00\x00\x0d\x01' + b'\x00\x00\x00\x01' + b'\x00' * 4
  )
  with pytest.raises(ValueError, match='not an idx file'):
    data.read_idx(tmp_path / 'magic')
  (tmp_path / 'short').write_bytes(idx_bytes(np.zeros((2, 3), np.uint8))[:-1])
  with pytest.raises(ValueError, match=r'shape \(2, 3\)'):
    data.read_idx(tmp_path / 'short')


def test_fashion_mnist_from_tiny_idx_files(tmp_path):
  rng = np.random.default_rng(0)
  train = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
  test = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
  write_idx(tmp_path / 'train-images-idx3-ubyte', train)  # raw
  write_idx(tmp_path / 'train-labels-idx1-ubyte', [0, 1, 2, 3, 9])
  write_idx(tmp_path / 't10k-images-idx3-ubyte.gz', test)  # gzipped
  write_idx(tmp_path / 't10k-labels-idx1-ubyte.gz', [4, 5, 6])
  split = data.load('fashion_mnist', str(tmp_path), split='train')
  assert split.images.shape == (5, 28, 28, 1) and split.images.dtype == np.uint8
  np.testing.assert_array_equal(split.images[..., 0], train)
  assert split.labels.dtype == np.int32 and split.labels.tolist() == [
      0,
      1,
      2,
      3,
      9,
  ]
  split = data.load('fashion_mnist', str(tmp_path), split='test')
  np.testing.assert_array_equal(split.images[..., 0], test)
  info = data.info('fashion_mnist', str(tmp_path))
  assert (info.train_size, info.test_size, info.image_shape) == (
      5,
      3,
      (28, 28, 1),
  )


@pytest.mark.skipif(
    not (FASHION_MNIST / 't10k-labels-idx1-ubyte.gz').exists()
    and not (FASHION_MNIST / 't10k-labels-idx1-ubyte').exists(),
    reason='Debian package dataset-fashion-mnist not installed',
)
def test_real_fashion_mnist():
  train = data.load('fashion_mnist', None, split='train')
  test = data.load('fashion_mnist', None, split='test')
  assert train.images.shape == (60000, 28, 28, 1)
  assert test.images.shape == (10000, 28, 28, 1)
  assert sorted(set(test.labels.tolist())) == list(range(10))
  info = data.info('fashion_mnist')
  assert (info.num_classes, info.train_size, info.test_size) == (
      10,
      60000,
      10000,
  )
  np.testing.assert_allclose(train.images.mean(), info.mean[0], rtol=1e-3)


# ------------------------------------------------------------ missing data


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
  # A URL that fails at once, so the test never waits on the network.
  monkeypatch.setattr(data.fashion_mnist, 'URL', f'file://{tmp_path}/nowhere/')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError) as error:
    data.load('fashion_mnist', str(tmp_path / 'empty'), split='train')
  message = str(error.value)
  assert 'sudo apt-get install dataset-fashion-mnist' in message
  assert 'make data' in message and 'config.data_dir' in message
  assert '\n' not in message
  assert error.value.__cause__ is None and error.value.__suppress_context__


def test_fashion_mnist_downloads_into_the_cache(tmp_path, monkeypatch):
  mirror = tmp_path / 'mirror'
  mirror.mkdir()
  write_idx(mirror / 't10k-images-idx3-ubyte.gz', np.ones((2, 28, 28)))
  write_idx(mirror / 't10k-labels-idx1-ubyte.gz', [3, 4])
  monkeypatch.setattr(data.fashion_mnist, 'URL', f'file://{mirror}/')
  (tmp_path / 'empty').mkdir()
  split = data.load('fashion_mnist', str(tmp_path / 'empty'), split='test')
  assert split.labels.tolist() == [3, 4]
  assert (
      tmp_path / 'cache' / 'fashion-mnist' / 't10k-images-idx3-ubyte.gz'
  ).exists()


def test_missing_tfds_data_says_how_to_prepare_it(tmp_path):
  with pytest.raises(
      FileNotFoundError, match=r"defjax\[tfds\]'` then `tfds build cifar10"
  ) as error:
    data.load('cifar10', str(tmp_path), split='train')
  assert error.value.__suppress_context__


def test_unprepared_tfds_data_dir_is_the_same_one_line(
    tmp_path, monkeypatch, caplog
):
  """Found through an empty TFDS_DATA_DIR, TFDS raises a KeyError ("`splits`
  is empty") after a warning: one FileNotFoundError line instead, naming the
  build command and the image_folder way."""
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path))
  with pytest.raises(FileNotFoundError) as error:
    data.load('cifar10', None, split='train')
  message = str(error.value)
  assert message.startswith(
      f'cifar10 is not prepared as array_record in {tmp_path}'
  )
  assert (
      f'`tfds build cifar10 --file_format=array_record --data_dir={tmp_path}`'
      in message
  )
  assert '--config.dataset=image_folder --config.data_dir=PATH' in message
  assert '\n' not in message and error.value.__suppress_context__
  assert not [r for r in caplog.records if 'dataset_info' in r.getMessage()]


def test_missing_image_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.data_dir'):
    data.load('image_folder', None, split='train')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    data.load('image_folder', str(tmp_path / 'nope.tar'), split='train')


def test_unknown_name_and_split():
  with pytest.raises(
      ValueError, match='valid names: cifar10, cifar100, fashion_mnist'
  ):
    data.load('mnist', None, split='train')
  with pytest.raises(ValueError, match='valid splits'):
    data.load('fashion_mnist', None, split='validation')
  with pytest.raises(ValueError, match='stream'):
    data.load('imagenet2012', None, split='train')


# ------------------------------------------------------------ image_folder


def make_image_folder(root):
  """3 classes of 6x5 images; PNG so pixels survive exactly."""
  rng = np.random.default_rng(1)
  expected = {'train': [], 'test': []}
  for split, per_class in (('train', 3), ('test', 2)):
    for label, cls in enumerate(['ant', 'bee', 'cat']):
      (root / split / cls).mkdir(parents=True)
      for i in range(per_class):
        pixels = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / cls / f'{i}.png')
        expected[split].append((pixels, label))
  return expected


@pytest.mark.parametrize('packed', ['dir', 'tar', 'tar.gz'])
def test_image_folder(tmp_path, packed):
  expected = make_image_folder(tmp_path / 'images')
  if packed == 'dir':
    path = tmp_path / 'images'
  else:
    path = tmp_path / f'images.{packed}'
    with tarfile.open(path, 'w:gz' if packed == 'tar.gz' else 'w') as tar:
      tar.add(tmp_path / 'images', arcname='images')  # a leading folder is fine
  for split in ('train', 'test'):
    loaded = data.load('image_folder', str(path), split=split)
    assert loaded.images.dtype == np.uint8 and loaded.labels.dtype == np.int32
    np.testing.assert_array_equal(
        loaded.images, np.stack([p for p, _ in expected[split]])
    )
    assert loaded.labels.tolist() == [label for _, label in expected[split]]
  info = data.info('image_folder', str(path))
  assert (
      info.num_classes,
      info.image_shape,
      info.train_size,
      info.test_size,
  ) == (3, (6, 5, 3), 9, 6)
  train = np.stack([p for p, _ in expected['train']]).astype(np.float64)
  np.testing.assert_allclose(info.mean, train.mean((0, 1, 2)))
  np.testing.assert_allclose(info.std, train.std((0, 1, 2)))


def test_image_folder_second_load_reads_the_cache(tmp_path, monkeypatch):
  make_image_folder(tmp_path / 'images')
  first = data.load('image_folder', str(tmp_path / 'images'), split='train')
  assert list((tmp_path / 'cache').glob('image_folder-*.npz'))
  data.cache._MEMO.clear()

  def no_decoding(root):
    raise AssertionError('decoded again instead of reading the cache')

  monkeypatch.setattr(data.image_folder, '_decode_folder', no_decoding)
  second = data.load('image_folder', str(tmp_path / 'images'), split='train')
  np.testing.assert_array_equal(first.images, second.images)
  # Editing a file changes the key: the stale cache is not used.
  Image.new('RGB', (5, 6)).save(tmp_path / 'images' / 'train' / 'ant' / '9.png')
  data.cache._MEMO.clear()
  with pytest.raises(AssertionError, match='decoded again'):
    data.load('image_folder', str(tmp_path / 'images'), split='train')


def test_image_folder_rejects_mixed_sizes(tmp_path):
  make_image_folder(tmp_path / 'images')
  Image.new('RGB', (7, 7)).save(
      tmp_path / 'images' / 'train' / 'bee' / 'big.png'
  )
  with pytest.raises(ValueError, match='mixes image sizes'):
    data.load('image_folder', str(tmp_path / 'images'), split='train')


def test_split_is_a_grain_random_access_source():
  split = data.Split(
      images=np.arange(24, dtype=np.uint8).reshape(6, 2, 2, 1),
      labels=np.arange(6, dtype=np.int32),
  )
  assert isinstance(split, grain.sources.RandomAccessDataSource)
  records = grain.MapDataset.source(split)
  assert len(records) == 6 and records[4]['label'] == 4
  np.testing.assert_array_equal(records[4]['image'], split.images[4])
  images, labels = split.batch(np.array([[5, 0], [2, 2]]))
  assert images.shape == (2, 2, 2, 2, 1) and images.dtype == np.uint8
  assert labels.tolist() == [[5, 0], [2, 2]] and labels.dtype == np.int32


@pytest.mark.skipif(CIFAR_TAR is None, reason='cifar10-jpeg.tar not found')
def test_real_cifar10_jpeg_tar(monkeypatch):
  # The machine-wide cache: decoding 60k JPEGs once is enough.
  monkeypatch.delenv('DEFJAX_CACHE')
  train = data.load('image_folder', str(CIFAR_TAR), split='train')
  test = data.load('image_folder', str(CIFAR_TAR), split='test')
  assert (
      train.images.shape == (50000, 32, 32, 3)
      and train.images.dtype == np.uint8
  )
  assert (
      test.images.shape == (10000, 32, 32, 3) and test.labels.dtype == np.int32
  )
  assert np.bincount(train.labels).tolist() == [5000] * 10
  info = data.info('image_folder', str(CIFAR_TAR))
  assert info.num_classes == 10
  # Re-encoded as JPEG, the statistics stay close to the published ones.
  np.testing.assert_allclose(info.mean, (125.3, 123.0, 113.9), atol=1.0)


# -------------------------------------------------------------------- TFDS


@pytest.mark.parametrize(
    'name,num_classes', [('cifar10', 10), ('cifar100', 100)]
)
def test_tfds_mock_data(name, num_classes):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=6):
    train = data.load(name, None, split='train')
    test = data.load(name, None, split='test')
    info = data.info(name)
  assert train.images.shape == (6, 32, 32, 3) and train.images.dtype == np.uint8
  assert test.labels.shape == (6,) and test.labels.dtype == np.int32
  assert ((train.labels >= 0) & (train.labels < num_classes)).all()
  assert (info.num_classes, info.train_size, info.image_shape) == (
      num_classes,
      6,
      (32, 32, 3),
  )


def test_imagenet_stream_mock_data():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=5):
    train = data.stream('imagenet2012', None, split='train', image_size=16)
    test = data.stream('imagenet2012', None, split='test', image_size=16)
    images, labels = train.batch(
        np.array([[0, 1, 2], [3, 4, 0]]), rng_key=(7, 0)
    )
    assert images.shape == (2, 3, 16, 16, 3) and images.dtype == np.uint8
    assert labels.shape == (2, 3) and labels.dtype == np.int32
    again, _ = train.batch(np.array([[0, 1, 2], [3, 4, 0]]), rng_key=(7, 0))
    np.testing.assert_array_equal(images, again)
    other, _ = train.batch(np.array([0, 1, 2, 3, 4]), rng_key=(7, 1))
    assert not np.array_equal(images.reshape(-1, 16, 16, 3)[:5], other)
    eval_images, _ = test.batch(np.arange(5))
    assert eval_images.shape == (5, 16, 16, 3)
    # The train crop of an example depends on (key, index), not on the batch.
    alone, _ = train.batch(np.array([4]), rng_key=(7, 0))
    np.testing.assert_array_equal(alone[0], images[1, 1])


@pytest.mark.parametrize(
    'key,box,flip',
    [((3, 5), (10, 3, 38, 30), True), ((2, 0), (2, 8, 30, 29), False)],
)
def test_imagenet_train_crop_is_pinned_to_seed_step_index(key, box, flip):
  # The boxes and flips the pre-grain code drew for index 7 and 1 of a 40x30
  # image: resumed and committed ImageNet runs depend on them.
  index = 7 if key == (3, 5) else 1
  pixels = np.arange(30 * 40 * 3, dtype=np.uint32).reshape(30, 40, 3) % 251
  pixels = pixels.astype(np.uint8)
  image, label = data.imagenet.crop(
      {'image': pixels, 'label': 9},
      train=True,
      image_size=8,
      rng_key=key,
      index=index,
  )
  want = Image.fromarray(pixels).resize(
      (8, 8), Image.Resampling.BILINEAR, box=box
  )
  if flip:
    want = want.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  np.testing.assert_array_equal(image, np.asarray(want))
  assert label == 9


# ---------------------------------------------------------- WorkerBatches


def test_worker_batches_distinct_within_a_step_and_an_epoch():
  order = data.WorkerBatches(103, num_workers=4, batch_size=5, seed=0)
  assert order.steps_per_epoch == 5  # 103 // 20: the remainder is dropped
  epoch = np.stack([order.indices(t) for t in range(order.steps_per_epoch)])
  assert epoch.shape == (5, 4, 5)
  assert len(np.unique(epoch)) == epoch.size  # at most once per epoch
  assert epoch.min() >= 0 and epoch.max() < 103
  # Worker k of step t reads its own stretch of the epoch's permutation.
  perm = np.random.default_rng([0, 0]).permutation(103)
  np.testing.assert_array_equal(
      order.indices(2)[3], perm[(2 * 4 + 3) * 5 : (2 * 4 + 4) * 5]
  )


def test_worker_batches_deterministic_and_new_each_epoch():
  make = lambda seed: data.WorkerBatches(
      100, num_workers=2, batch_size=10, seed=seed
  )
  a, b = make(1), make(1)
  for step in (0, 3, 7, 4):
    np.testing.assert_array_equal(a.indices(step), b.indices(step))
  assert not np.array_equal(a.indices(0), make(2).indices(0))
  assert not np.array_equal(a.indices(0), a.indices(a.steps_per_epoch))


def test_worker_batches_position_and_slice():
  order = data.WorkerBatches(1000, num_workers=8, batch_size=16, seed=3)
  assert order.steps_per_epoch == 7
  assert order.position(0) == (0, 0)
  assert order.position(6) == (0, 6)
  assert order.position(7) == (1, 0)
  assert order.position(23) == (3, 2)
  with pytest.raises(ValueError):
    order.position(-1)
  mine = data.WorkerBatches(
      1000, num_workers=8, batch_size=16, seed=3, worker_slice=slice(2, 6)
  )
  for step in (0, 9):
    assert mine.indices(step).shape == (4, 16)
    np.testing.assert_array_equal(mine.indices(step), order.indices(step)[2:6])


def test_worker_batches_rejects_too_few_examples():
  with pytest.raises(ValueError, match='fewer than one step'):
    data.WorkerBatches(10, num_workers=4, batch_size=3, seed=0)


# ------------------------------------------------------------ augmentation


def random_images(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


augment = jax.jit(data.augment, static_argnames=('pad', 'flip'))


def test_augment_shape_dtype_and_determinism():
  images = random_images((2, 3, 8, 8, 3))  # (workers, batch, H, W, C)
  key = jax.random.PRNGKey(0)
  out = augment(images, key)
  assert out.shape == images.shape and out.dtype == jnp.uint8
  np.testing.assert_array_equal(out, augment(images, key))
  assert not np.array_equal(out, augment(images, jax.random.PRNGKey(1)))


def test_augment_without_pad_or_flip_is_the_identity():
  images = random_images((4, 8, 8, 3))
  np.testing.assert_array_equal(
      augment(images, jax.random.PRNGKey(0), pad=0, flip=False), images
  )


def test_shift_matches_a_numpy_window():
  images = random_images((2, 7, 6, 3))
  offsets = jnp.array([[0, 5], [3, 1]])
  out = np.asarray(
      jax.jit(data.shift, static_argnames='pad')(images, offsets, pad=3)
  )
  padded = np.pad(images, ((0, 0), (3, 3), (3, 3), (0, 0)))
  np.testing.assert_array_equal(out[0], padded[0, 0:7, 5:11])
  np.testing.assert_array_equal(out[1], padded[1, 3:10, 1:7])
  assert (out[0, :3] == 0).all()  # the zero padding shows at the top


def test_augment_crops_are_windows_of_the_padded_image():
  pad = 2
  images = random_images((16, 6, 6, 1), seed=1)
  out = np.asarray(augment(images, jax.random.PRNGKey(3), pad=pad, flip=False))
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  shifts = set()
  for image, result in zip(padded, out):
    matches = [
        (dy, dx)
        for dy in range(2 * pad + 1)
        for dx in range(2 * pad + 1)
        if np.array_equal(image[dy : dy + 6, dx : dx + 6], result)
    ]
    assert matches, 'not a window of the padded image'
    shifts.add(matches[0])
  assert len(shifts) > 3  # independent offsets per image


def test_augment_flip_really_flips():
  images = random_images((64, 5, 5, 3), seed=2)
  out = np.asarray(augment(images, jax.random.PRNGKey(4), pad=0, flip=True))
  flipped = np.array(
      [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images)]
  )
  kept = np.array([np.array_equal(o, i) for o, i in zip(out, images)])
  assert (flipped | kept).all()
  assert 10 < flipped.sum() < 54  # about half, drawn per image


def test_standardize():
  images = random_images((2, 4, 4, 3))
  mean, std = (10.0, 20.0, 30.0), (2.0, 4.0, 8.0)
  out = jax.jit(data.standardize)(images, mean, std)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(
      out, (images - np.array(mean)) / np.array(std), rtol=1e-6
  )
