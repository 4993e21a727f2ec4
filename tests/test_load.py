"""A busy machine makes a run slower, never kills it, and changes no bit.

XLA:CPU runs each device's program on its own thread and joins the threads
at every collective in a rendezvous that aborts the process (SIGABRT) when
a participant is more than xla_cpu_collective_call_warn_stuck_timeout_seconds
+ xla_cpu_collective_call_terminate_timeout_seconds late (20 + 40 s by
default). ``xla_cpu.tolerate_slow_cpu_devices`` (called by train.py and
conftest) lifts the termination; these tests show the abort with short
timeouts, its absence with defjax's (a device 45 s late), and unchanged
results under CPU hogs.
Each run is a subprocess: an abort must be a failed test, not a dead pytest.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.stress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One device (3 of 8) sleeps `delay` seconds in a host callback before an
# all-reduce, while the other 7 wait for it at the rendezvous.
SLOW_DEVICE = r"""
import sys, time
import jax, jax.numpy as jnp
from jax.experimental import io_callback
from jax.sharding import PartitionSpec as P
from defjax import xla_cpu
jax.config.update('jax_num_cpu_devices', 8)
if sys.argv[2] == 'defjax':
  xla_cpu.tolerate_slow_cpu_devices()
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
"""


def _slow_device(delay, flags, xla_flags=''):
  env = dict(os.environ, XLA_FLAGS=xla_flags, PYTHONPATH=REPO)
  return subprocess.run(
      [sys.executable, '-c', SLOW_DEVICE, str(delay), flags],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )


def test_a_late_device_aborts_xla_at_its_timeout():
  """The failure mode itself, with XLA's timeouts shortened to 1 + 2 s."""
  proc = _slow_device(
      5,
      'xla',
      '--xla_cpu_collective_call_warn_stuck_timeout_seconds=1'
      ' --xla_cpu_collective_call_terminate_timeout_seconds=2',
  )
  assert proc.returncode == -signal.SIGABRT, proc.stderr[-2000:]
  assert 'Termination timeout' in proc.stderr


def test_defjax_waits_for_a_device_later_than_xlas_default():
  """45 s late, with the stuck warning shortened to 1 s: XLA's default would
  terminate at 1 + 40 s; defjax's lifted timeout completes the all-reduce."""
  proc = _slow_device(
      45, 'defjax', '--xla_cpu_collective_call_warn_stuck_timeout_seconds=1'
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (
      'sum 72.0' in proc.stdout
  )  # 2 values, each sum_i (1 + i) over 8 devices
  assert 'Termination timeout' not in proc.stderr


@contextlib.contextmanager
def cpu_hogs(n):
  """``n`` processes that spin on the CPUs until the block ends."""
  procs = [
      subprocess.Popen([sys.executable, '-c', 'while True: pass'])
      for _ in range(n)
  ]
  try:
    yield
  finally:
    for p in procs:
      p.kill()
    for p in procs:
      p.wait()


def _training(log) -> bool:
  """Whether a run's progress bar (stderr) shows at least one finished step."""
  text = log.read_text() if log.exists() else ''
  return re.search(r'\b[1-9][0-9]*/[0-9]+ \[', text) is not None


def _finish_under_hogs(procs, logs):
  """Waits until a run has finished a step (imports, data and compiled
  programs loaded; process 0 draws the progress bar), then lets 4 x cores
  busy processes compete with the rest of the run: steps, evaluations and
  the final checkpoint."""
  deadline = time.time() + 300
  while not _training(logs[0]):
    for p, log in zip(procs, logs):
      assert p.poll() is None, log.read_text()[-3000:]
    assert time.time() < deadline, [log.read_text()[-1000:] for log in logs]
    time.sleep(0.05)
  with cpu_hogs(max(8, 4 * os.cpu_count())):
    # Still training when the hogs came: the load met the steps.
    assert all(p.poll() is None for p in procs), [
        log.read_text()[-1000:] for log in logs
    ]
    for p, log in zip(procs, logs):
      p.wait(timeout=1200)
      assert p.returncode == 0, log.read_text()[-3000:]


def test_runs_under_cpu_hogs_match_idle_runs(tiny_folder, tmp_path):
  """Two processes x 4 devices (jax.distributed, gloo) next to 4 x cores
  busy processes give the same bits as the same run on its own, and that
  run equals one process x 8 devices to float tolerance (the block values
  are summed in another order). The busy processes start once the loaded run
  is training (its compiled programs come from the suite's persistent
  cache, where the idle run left them), so the hogs slow only the training
  itself. Two processes hold every kind of wait one process has (XLA's
  rendezvous of each process's 4 device threads) and gloo's across
  processes, so a loaded one-process run would add time, not a case."""
  from test_multihost import _args, _env, _finish, _launch_two

  # Enough steps that the hogs meet training, evaluation and the checkpoint;
  # every step under the hogs slows the other pytest worker too.
  steps = 6

  def launch_one(workdir):
    return [
        subprocess.Popen(
            _args(tiny_folder, workdir, steps),
            cwd=REPO,
            env=_env(8),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    ]

  one = _finish(launch_one(tmp_path / 'one'), tmp_path / 'one')
  two = _finish(
      _launch_two(tiny_folder, tmp_path / 'two', steps), tmp_path / 'two'
  )
  logs = [tmp_path / f'loaded{i}.txt' for i in range(2)]
  _finish_under_hogs(
      _launch_two(tiny_folder, tmp_path / 'loaded', steps, logs=logs), logs
  )
  loaded = json.loads((tmp_path / 'loaded' / 'summary.json').read_text())
  assert loaded['params_sha256'] == two['params_sha256']
  assert two['steps'] == one['steps'] == steps
  for key in (
      'final_train_loss',
      'final_test_accuracy',
      'final_test_accuracy_x',
  ):
    assert two[key] == pytest.approx(one[key], rel=1e-5), key
  assert two['bytes_sent'] == one['bytes_sent']
