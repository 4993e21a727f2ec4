"""Test setup: 8 CPU devices, so shard_map runs real collectives.

This must run before anything initialises JAX's backends.
"""

import os

_flags = os.environ.get('XLA_FLAGS', '')
if 'xla_force_host_platform_device_count' not in _flags:
  os.environ['XLA_FLAGS'] = (
      _flags + ' --xla_force_host_platform_device_count=8'
  ).strip()

# One persistent compilation cache for the whole suite (both pytest-xdist
# workers and the train.py subprocesses the tests start): the trainer tests
# compile the same tiny programs (model init, train step, evaluation) run
# after run, and XLA:CPU takes seconds for each (a ResNet's jitted init: ~20 s).
# It lives in the clone, so a second `make test` starts warm; set
# JAX_COMPILATION_CACHE_DIR to use another place. Every program is kept, not
# only those that took over a second: a train.py subprocess otherwise
# recompiles the ~70 small programs (slices, means, checks) each run uses,
# ~5 s a process, which the worker that started it already has in memory.
os.environ.setdefault(
    'JAX_COMPILATION_CACHE_DIR',
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        '.cache',
        'jax-tests',
    ),
)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import jax  # noqa: E402

from defjax import xla_cpu  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
xla_cpu.tolerate_slow_cpu_devices()


import io  # noqa: E402
import tarfile  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


def pytest_collection_modifyitems(items):
  """The slow tests first (in their order), so that pytest-xdist's workers
  start on the long runs and share out the short tests at the end, rather
  than one worker finishing alone with a two-minute test."""
  items.sort(key=lambda item: item.get_closest_marker('slow') is None)


@pytest.fixture(autouse=True, scope='session')
def _contained_tempdir(tmp_path_factory):
  """tempfile's default directory inside pytest's own tmp tree for the session.

  TFDS leaves an empty mkdtemp('tfds') directory behind each time a builder
  starts without prepared data (its GCS lookup returns early), which the mock
  and missing-data tests do: about 30 per suite in /tmp. Here they land in
  the basetemp that pytest cleans up.
  """
  import tempfile  # pylint: disable=g-import-not-at-top

  old = tempfile.tempdir
  tempfile.tempdir = str(tmp_path_factory.mktemp('tempfile'))
  yield
  tempfile.tempdir = old


@pytest.fixture(scope='session')
def tiny_folder(tmp_path_factory):
  """A 3-class image_folder .tar of 32x32 RGB JPEGs whose class sets the colour."""
  root = tmp_path_factory.mktemp('folder')
  path = root / 'tiny.tar'
  rng = np.random.default_rng(0)
  with tarfile.open(path, 'w') as tar:
    for split, n in (('train', 48), ('test', 12)):
      for c, name in enumerate(('red', 'green', 'blue')):
        for i in range(n // 3):
          img = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
          img[..., c] += 180
          buf = io.BytesIO()
          Image.fromarray(img).save(buf, format='JPEG')
          info = tarfile.TarInfo(f'{split}/{name}/{i:04d}.jpg')
          info.size = buf.tell()
          buf.seek(0)
          tar.addfile(info, buf)
  return str(path)
