"""Several processes: the same run on 2 processes x 4 devices and 1 x 8.

The two processes join with jax.distributed over 127.0.0.1; cross-process
collectives use gloo (the CPU default in this jax), in-process ones XLA's
own. The all-reduced block values are summed in a different order, so the
parameters may differ in the last bits (params_sha256 can differ); the loss
and the accuracy agree to 1e-5 relative.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from test_trainer import tiny_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _args(tiny_folder, workdir, steps, *extra):
  return tiny_cli(
      tiny_folder,
      workdir,
      f'--config.num_train_steps={steps}',
      '--config.eval_every_steps=5',
      *extra,
  )


def _env(devices):
  """This process's environment (with the suite's persistent compilation
  cache, which keeps every program: conftest) on ``devices`` CPU devices."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return env


def _launch_two(tiny_folder, workdir, steps, *extra, logs=None):
  port = _free_port()
  return [
      subprocess.Popen(
          _args(
              tiny_folder,
              workdir,
              steps,
              f'--coordinator_address=127.0.0.1:{port}',
              '--num_processes=2',
              f'--process_id={i}',
              *extra,
          ),
          cwd=REPO,
          env=_env(4),
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE if logs is None else open(logs[i], 'w'),
          text=True,
      )
      for i in range(2)
  ]


def _finish(procs, workdir, timeout=300):
  """Waits for a run's processes; returns its summary.json."""
  errs = [p.communicate(timeout=timeout)[1] for p in procs]
  for i, p in enumerate(procs):
    assert p.returncode == 0, f'process {i}:\n' + '\n'.join(
        e[-2500:] for e in errs
    )
  with open(workdir / 'summary.json') as f:
    return json.load(f)


@pytest.mark.stress
def test_dead_peer_fails_the_other_within_bound(tiny_folder, tmp_path):
  bound = 90  # heartbeat 10 s, plus the coordination service's reaction time
  logs = [tmp_path / 'log0.txt', tmp_path / 'log1.txt']
  procs = _launch_two(
      tiny_folder,
      tmp_path / 'run',
      100000,
      '--heartbeat_timeout_seconds=10',
      '--config.eval_every_steps=100000',
      logs=logs,
  )
  # wait until training runs (the progress bar reports steps on stderr)
  deadline = time.time() + 240
  while (
      'step/s' not in logs[0].read_text()
      and 's/step' not in logs[0].read_text()
  ):
    assert procs[0].poll() is None, logs[0].read_text()[-3000:]
    assert time.time() < deadline, logs[0].read_text()[-3000:]
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGKILL)
  procs[1].wait()
  t = time.time()
  try:
    procs[0].wait(timeout=bound)
  except subprocess.TimeoutExpired:
    procs[0].kill()
    pytest.fail(
        f'the surviving process still ran {bound} s after its peer died'
    )
  assert procs[0].returncode != 0
  assert time.time() - t < bound


@pytest.mark.slow
@pytest.mark.parametrize(
    'script, leaves', [('multihost_sharded.py', 9), ('multihost_hosts.py', 9)]
)
def test_two_processes_match_one_process_arranged_the_same(
    script, leaves, tmp_path
):
  """DEF on 2 x 4 meshes: 2 processes x 4 devices give the parameters and y
  of 1 process x 8 to float tolerance. ('data', 'model'): one worker of 4
  model shards per process, the block all-reduce across processes. Hosts
  ('data', 'replica'): one host per process, its 4 devices averaging the
  worker's gradient, the block's slices across processes."""
  script = os.path.join(REPO, 'tests', script)
  port = _free_port()
  runs = [
      subprocess.Popen(
          [sys.executable, script, str(tmp_path / 'one.npz')],
          cwd=REPO,
          env=_env(8),
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
  ]
  runs += [
      subprocess.Popen(
          [
              sys.executable,
              script,
              str(tmp_path / 'two.npz'),
              str(port),
              str(i),
              '2',
          ],
          cwd=REPO,
          env=_env(4),
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for i in range(2)
  ]
  errs = [p.communicate(timeout=300)[1] for p in runs]
  for p, err in zip(runs, errs):
    assert p.returncode == 0, err[-3000:]
  one, two = np.load(tmp_path / 'one.npz'), np.load(tmp_path / 'two.npz')
  assert (
      sorted(one) == sorted(two) and len(one) == leaves
  )  # x, y (4 leaves each), loss
  for key in one:
    np.testing.assert_allclose(
        two[key], one[key], rtol=1e-6, atol=1e-7, err_msg=key
    )
