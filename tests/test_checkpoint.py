"""Checkpoints that lose nothing: kill, resume, mismatch, damage, reshard, NaN."""

import copy
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from defjax.training import checkpoint as ckpt
from defjax.training import runfiles
from defjax.training import task
from defjax.training import trainer
from configs import default
from test_trainer import override, tiny_cli, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 40, 10


def _args(tiny_folder, workdir, *extra):
  return tiny_cli(
      tiny_folder,
      workdir,
      f'--config.num_train_steps={STEPS}',
      f'--config.checkpoint_every_steps={EVERY}',
      '--config.eval_every_steps=20',
      '--config.crop_padding=4',
      '--config.flip=True',
      *extra,
  )


def _run(args, timeout=300, env=None):
  return subprocess.run(
      args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
  )


def _system_malloc_env():
  """An environment in which train.py keeps the C library's malloc; None
  where the reference run did not use tcmalloc either (not installed, or
  the user chose), so that no test compares glibc with glibc."""
  from defjax.training import main

  preload = os.environ.get('LD_PRELOAD', '')
  if (
      not main.tcmalloc_library()
      or (preload and 'tcmalloc' not in preload)
      or os.environ.get('DEFJAX_ALLOCATOR') == 'system'
  ):
    return None
  env = {
      k: v for k, v in os.environ.items() if k != 'LD_PRELOAD'
  }  # make test preloads it
  return dict(env, DEFJAX_ALLOCATOR='system')


def _summary(workdir):
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [
        {
            k: v
            for k, v in json.loads(l).items()
            if k not in ('wall_time', 'train_time')
        }
        for l in f
    ]


@pytest.fixture(scope='session')
def reference(tiny_folder, tmp_path_factory):
  """An uninterrupted run, the yardstick of every resume test, made once
  per session: by whichever pytest-xdist worker asks first, in the folder
  the workers share, while the other waits on a lock for it. (Every
  worker's tiny_folder holds the same images; data_dir is no part of a
  run's identity.)"""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent  # this session's folder above the workers' own
  workdir = root / 'reference' / 'run'
  with open(root / 'reference.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (workdir / 'summary.json').exists():
      proc = _run(_args(tiny_folder, workdir))
      assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def _start_and_wait_for_checkpoint(args, workdir, step):
  proc = subprocess.Popen(
      args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  target = os.path.join(workdir, 'checkpoints', str(step))
  deadline = time.time() + 240
  while not os.path.isdir(target):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline, 'no checkpoint appeared'
    time.sleep(0.05)
  return proc


def _same_result(a, b):
  sa, sb = _summary(a), _summary(b)
  for key in (
      'params_sha256',
      'final_train_loss',
      'final_test_accuracy',
      'final_test_accuracy_x',
      'steps',
      'bytes_sent',
  ):
    assert sa[key] == sb[key], key
  assert _records(a) == _records(b)


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bitwise_identical(
    tiny_folder, reference, tmp_path
):
  """Also across host allocators: the reference ran under tcmalloc (train.py
  restarts itself under it, or inherits make test's preload), the resumed
  run under the C library's malloc, and the bits are the same."""
  workdir = tmp_path / 'run'
  args = _args(tiny_folder, workdir)
  proc = _start_and_wait_for_checkpoint(args, workdir, EVERY)
  proc.kill()  # SIGKILL: no handler runs
  proc.communicate()
  assert not os.path.exists(workdir / 'summary.json')
  resumed = _run(args, env=_system_malloc_env())
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resuming from the checkpoint at step' in resumed.stdout
  _same_result(workdir, reference)


@pytest.mark.slow
def test_sigterm_saves_exits_cleanly_and_resumes(
    tiny_folder, reference, tmp_path
):
  workdir = tmp_path / 'run'
  args = _args(tiny_folder, workdir)
  proc = _start_and_wait_for_checkpoint(args, workdir, EVERY)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == runfiles.EXIT_INTERRUPTED, err[-3000:]
  assert 'received SIGTERM: saved a checkpoint at step' in err
  assert 'Traceback' not in err
  mngr = ckpt.manager(str(workdir / 'checkpoints'), max_to_keep=2)
  saved, meta = ckpt.latest_meta(mngr)
  assert EVERY <= saved < STEPS
  # The input pipeline's iterator state travels with the checkpoint: the
  # next step to read, which the resumed iterator starts from.
  assert meta['data_state'] == {'step': saved}
  resumed = _run(args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  _same_result(workdir, reference)


def test_checkpoint_of_another_run_is_an_error(
    tiny_folder, reference, tmp_path
):
  proc = _run(_args(tiny_folder, reference, '--config.optim.method=ef'))
  assert proc.returncode == 2
  assert "optim.method: checkpoint 'def' vs config 'ef'" in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_fingerprint_covers_what_the_trajectory_depends_on():
  """Changing the learning rate, schedule, run length, augmentation or block
  seed mid-run would mix two runs; each is named. Old checkpoints (without
  the newer fields) still compare on the fields they have."""
  base = default.get_config()
  saved = ckpt.fingerprint(base)
  for key, value in [
      ('optim.lr', 0.5),
      ('optim.momentum', 0.0),
      ('optim.weight_decay', 0.0),
      ('optim.schedule', 'cosine'),
      ('optim.decay_at', (0.3,)),
      ('optim.decay_whole_epochs', False),
      ('optim.per_leaf', False),
      ('optim.warmup_epochs', 1.0),
      ('optim.dense_warmup_steps', 7),
      ('optim.block_seed', 3),
      ('sync_batch_stats', False),
      ('crop_padding', 4),
      ('flip', True),
      ('num_epochs', 99),
      ('num_train_steps', 99),
      ('model_axis_size', 2),
  ]:
    config = override(copy.deepcopy(base), **{key: value})
    with pytest.raises(
        ckpt.CheckpointMismatch, match=re.escape(key + ': checkpoint')
    ):
      ckpt.compare(saved, ckpt.fingerprint(config))
    old = {k: v for k, v in saved.items() if k != key}
    ckpt.compare(old, ckpt.fingerprint(config))  # written before key was added
  ckpt.compare(saved, ckpt.fingerprint(copy.deepcopy(base)))


def _state():
  return {'w': jnp.arange(6.0).reshape(2, 3), 'n': jnp.zeros((), jnp.int32)}


def test_half_written_checkpoint_is_never_restored(tmp_path):
  mngr = ckpt.manager(str(tmp_path), max_to_keep=3)
  ckpt.save(mngr, 5, _state(), {'fingerprint': {}, 'step': 5})
  # A save killed half-way leaves orbax's temporary directory behind.
  partial = tmp_path / '9.orbax-checkpoint-tmp-1234'
  (partial / 'state').mkdir(parents=True)
  (partial / 'state' / 'garbage').write_bytes(b'\0' * 100)
  mngr = ckpt.manager(str(tmp_path), max_to_keep=3)
  assert mngr.latest_step() == 5
  step, meta = ckpt.latest_meta(mngr)
  assert step == 5 and meta['step'] == 5
  restored = ckpt.restore(mngr, 5, jax.tree.map(jnp.zeros_like, _state()))
  np.testing.assert_array_equal(restored['w'], _state()['w'])


def test_corrupted_checkpoint_is_a_clear_error(tmp_path):
  mngr = ckpt.manager(str(tmp_path), max_to_keep=3)
  ckpt.save(mngr, 3, _state(), {'fingerprint': {}, 'step': 3})
  for root, _, files in os.walk(tmp_path / '3'):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'not a checkpoint')
  mngr = ckpt.manager(str(tmp_path), max_to_keep=3)
  with pytest.raises(
      ckpt.CheckpointError, match='unreadable.*delete that directory'
  ):
    step, _ = ckpt.latest_meta(mngr)
    ckpt.restore(mngr, step, jax.tree.map(jnp.zeros_like, _state()))


def test_unwritable_workdir_is_a_clear_error(tiny_folder, tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  with pytest.raises(trainer.ConfigError, match='cannot write to workdir'):
    trainer.train_and_evaluate(tiny_config(tiny_folder), str(blocker / 'run'))


def test_full_disk_during_save_is_a_clear_error(
    tiny_folder, tmp_path, monkeypatch
):
  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(ckpt.ocp.CheckpointManager, 'save', full)
  with pytest.raises(ckpt.CheckpointError, match='No space left on device'):
    trainer.train_and_evaluate(
        tiny_config(tiny_folder, checkpoint_every_steps=3),
        str(tmp_path),
        log=lambda *_: None,
    )


def test_nan_in_one_worker_is_divergence_and_spares_checkpoints(
    tiny_folder, tmp_path, monkeypatch
):
  bad_step, bad_worker = 7, 3  # the 8th step, one worker of eight
  make = task.make_loss_fn

  def poisoned(model, info, config):
    loss_fn = make(model, info, config)

    def wrapped(params, batch_stats, batch):
      loss, stats = loss_fn(params, batch_stats, batch)
      step, worker = batch[2][0]  # the (step, worker) row of the first example
      hit = (step == bad_step) & (worker == bad_worker)
      return jnp.where(hit, jnp.nan, 1.0) * loss, stats

    return wrapped

  monkeypatch.setattr(task, 'make_loss_fn', poisoned)
  config = tiny_config(
      tiny_folder,
      num_train_steps=12,
      checkpoint_every_steps=4,
      eval_every_steps=4,
  )
  with pytest.raises(trainer.Diverged) as e:
    trainer.train_and_evaluate(config, str(tmp_path), log=lambda *_: None)
  assert e.value.step == bad_step + 1
  summary = _summary(tmp_path)
  assert (
      summary['status'] == 'diverged'
      and summary['diverged_at_step'] == bad_step + 1
  )
  mngr = ckpt.manager(str(tmp_path / 'checkpoints'), max_to_keep=2)
  assert mngr.all_steps() == [4]  # the good one, nothing written after the NaN


def test_ef21_state_resumes_bitwise(tiny_folder, tmp_path):
  """EF21-SGDM's state (v_k, h_k, h, its count) is all a resume needs: from
  the step-3 checkpoint the run ends on the uninterrupted run's bits."""
  config = tiny_config(
      tiny_folder, checkpoint_every_steps=3, **{'optim.method': 'ef21_sgdm'}
  )
  whole = trainer.train_and_evaluate(
      config, str(tmp_path / 'whole'), log=lambda *_: None
  )
  shutil.copytree(
      tmp_path / 'whole' / 'checkpoints' / '3',
      tmp_path / 'resumed' / 'checkpoints' / '3',
  )
  logs = []
  resumed = trainer.train_and_evaluate(
      config, str(tmp_path / 'resumed'), log=logs.append
  )
  assert 'resuming from the checkpoint at step 3' in logs
  for key in (
      'params_sha256',
      'final_train_loss',
      'final_test_accuracy',
      'bytes_sent',
  ):
    assert resumed[key] == whole[key], key


@pytest.mark.parametrize('new', [4, 16, 3])
def test_reshard_keeps_the_mean_error(new):
  rng = np.random.default_rng(0)
  tree = {
      'error': rng.normal(size=(8, 5, 3)).astype(np.float32),
      'count': np.arange(8, dtype=np.int32) * 0 + 7,
  }
  out = ckpt.reshard_workers(tree, 8, new)
  assert out['error'].shape == (new, 5, 3)
  np.testing.assert_allclose(
      out['error'].mean(0), tree['error'].mean(0), rtol=1e-6, atol=1e-7
  )
  assert (out['count'] == 7).all()
  with pytest.raises(ValueError, match='leading worker axis'):
    ckpt.reshard_workers({'x': np.zeros(3)}, 8, 4)


@pytest.mark.slow
def test_elastic_resume_preserves_def_output(tiny_folder, tmp_path):
  """K = 8 -> K' = 4 with resume_reshard: y = x - mean_k e_k is unchanged;
  without the flag the changed K is named in the error."""
  workdir = str(tmp_path)
  config = tiny_config(
      tiny_folder,
      num_train_steps=6,
      eval_every_steps=6,
      checkpoint_every_steps=3,
  )
  before = trainer.train_and_evaluate(config, workdir, log=lambda *_: None)
  with pytest.raises(
      ckpt.CheckpointMismatch, match='num_workers: checkpoint 8 vs config 4'
  ):
    trainer.train_and_evaluate(
        tiny_config(
            tiny_folder,
            num_workers=4,
            num_train_steps=6,
            eval_every_steps=6,
            checkpoint_every_steps=3,
        ),
        workdir,
    )
  # Same length: nothing left to train; the resharded state's y is compared
  # with the saved one on the host.
  after = trainer.train_and_evaluate(
      tiny_config(
          tiny_folder,
          num_workers=4,
          num_train_steps=6,
          eval_every_steps=6,
          checkpoint_every_steps=3,
          resume_reshard=True,
      ),
      workdir,
      log=lambda *_: None,
  )
  assert after['resharded_from_workers'] == 8
  assert after['reshard_output_change'] <= 1e-6
  assert after['final_test_accuracy'] == before['final_test_accuracy']
  # and an interrupted run continues on the new workers: drop the last
  # checkpoint so that the latest one is mid-run (step 3 of 6, K = 8).
  mngr = ckpt.manager(os.path.join(workdir, 'checkpoints'), max_to_keep=2)
  assert mngr.all_steps() == [3, 6]
  mngr.delete(6)
  mngr.close()
  more = trainer.train_and_evaluate(
      tiny_config(
          tiny_folder,
          num_workers=4,
          num_train_steps=6,
          eval_every_steps=3,
          checkpoint_every_steps=3,
          resume_reshard=True,
      ),
      workdir,
      log=lambda *_: None,
  )
  assert more['status'] == 'completed' and more['steps'] == 6
  assert more['resharded_from_workers'] == 8
