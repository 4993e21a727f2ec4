"""A busy machine makes a run slower, never kills it, and changes no bit.

XLA:CPU runs each device's program on its own thread and joins the threads
at every collective in a rendezvous that aborts the process (SIGABRT) when
a participant is more than xla_cpu_collective_call_warn_stuck_timeout_seconds
+ xla_cpu_collective_call_terminate_timeout_seconds late (20 + 40 s by
default). ``parallel.tolerate_slow_cpu_devices`` (called by train.py and
conftest) lifts the termination; these tests show the abort with short
timeouts, its absence with defjax's (a device 45 s late), and unchanged
results under CPU hogs.
Each run is a subprocess: an abort must be a failed test, not a dead pytest.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One device (3 of 8) sleeps `delay` seconds in a host callback before an
# all-reduce, while the other 7 wait for it at the rendezvous.
SLOW_DEVICE = r'''
import sys, time
import jax, jax.numpy as jnp
from jax.experimental import io_callback
from jax.sharding import PartitionSpec as P
from defjax import parallel
jax.config.update('jax_num_cpu_devices', 8)
if sys.argv[2] == 'defjax':
  parallel.tolerate_slow_cpu_devices()
delay = float(sys.argv[1])

def late(i):
  if int(i) == 3:
    time.sleep(delay)
  return i

def body(x):
  i = io_callback(late, jax.ShapeDtypeStruct((), jnp.int32), jax.lax.axis_index('d'))
  return jax.lax.psum(x + i, 'd')

mesh = jax.make_mesh((8,), ('d',))
f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P('d'), out_specs=P(), check_vma=False))
x = jax.device_put(jnp.ones((8, 2)), jax.NamedSharding(mesh, P('d')))
print('sum', float(f(x).sum()))
'''


def _slow_device(delay, flags, xla_flags=''):
  env = dict(os.environ, XLA_FLAGS=xla_flags, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, '-c', SLOW_DEVICE, str(delay), flags], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


def test_a_late_device_aborts_xla_at_its_timeout():
  """The failure mode itself, with XLA's timeouts shortened to 1 + 2 s."""
  proc = _slow_device(5, 'xla', '--xla_cpu_collective_call_warn_stuck_timeout_seconds=1'
                      ' --xla_cpu_collective_call_terminate_timeout_seconds=2')
  assert proc.returncode == -signal.SIGABRT, proc.stderr[-2000:]
  assert 'Termination timeout' in proc.stderr


@pytest.mark.slow
def test_defjax_waits_for_a_device_later_than_xlas_default():
  """45 s late, with the stuck warning shortened to 1 s: XLA's default would
  terminate at 1 + 40 s; defjax's lifted timeout completes the all-reduce."""
  proc = _slow_device(45, 'defjax', '--xla_cpu_collective_call_warn_stuck_timeout_seconds=1')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'sum 72.0' in proc.stdout  # 2 values, each sum_i (1 + i) over 8 devices
  assert 'Termination timeout' not in proc.stderr


@contextlib.contextmanager
def cpu_hogs(n):
  """``n`` processes that spin on the CPUs until the block ends."""
  procs = [subprocess.Popen([sys.executable, '-c', 'while True: pass']) for _ in range(n)]
  try:
    yield
  finally:
    for p in procs:
      p.kill()
    for p in procs:
      p.wait()


def compile_cache_env(env, path):
  """Adds a persistent compilation cache at ``path``: the loaded run reuses
  the idle run's executables, so the hogs slow only the training itself."""
  return dict(env, JAX_COMPILATION_CACHE_DIR=str(path),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


def _train(tiny_folder, workdir, timeout):
  args = [sys.executable, os.path.join(REPO, 'train.py'), '--config',
          'configs/fashion_mnist.py', '--workdir', str(workdir),
          '--config.dataset=image_folder', f'--config.data_dir={tiny_folder}',
          '--config.batch_size=2', '--config.num_train_steps=6',
          '--config.eval_every_steps=3', '--config.steps_per_dispatch=1',
          '--config.optim.ratio=16']
  env = compile_cache_env(os.environ, workdir.parent / 'jax-cache')
  env.pop('XLA_FLAGS', None)  # train.py's own defaults: 8 CPU devices, its flags
  proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads((workdir / 'summary.json').read_text())


@pytest.mark.slow
def test_training_under_cpu_hogs_matches_an_idle_run(tiny_folder, tmp_path):
  """4 x cores busy processes next to train.py (8 devices): same bits."""
  idle = _train(tiny_folder, tmp_path / 'idle', timeout=300)
  with cpu_hogs(max(8, 4 * os.cpu_count())):
    loaded = _train(tiny_folder, tmp_path / 'loaded', timeout=1200)
  assert loaded['params_sha256'] == idle['params_sha256']
  assert loaded['final_train_loss'] == idle['final_train_loss']
