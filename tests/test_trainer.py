"""End-to-end: train_and_evaluate and train.py on tiny settings."""

import copy
import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import default, fashion_mnist
from defjax import methods
from defjax.training import checkpoint as ckpt
from defjax.training import config_checks
from defjax.training import models
from defjax.training import optimizer
from defjax.training import runfiles
from defjax.training import trainer
from defjax.training.models import resnet_cifar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = '/usr/share/datasets/fashion-mnist'
needs_fmnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(FMNIST, 'train-images-idx3-ubyte.gz')),
    reason='Fashion-MNIST not installed (make data)',
)

RECORD_KEYS = {
    'step',
    'epoch',
    'train_loss',
    'test_accuracy',
    'test_accuracy_x',
    'lr',
    'wall_time',
    'train_time',
    'bytes_sent',
}
SUMMARY_KEYS = {
    'status',
    'final_test_accuracy',
    'final_train_loss',
    'steps',
    'wall_time',
    'finished',
    'bytes_sent',
    'config',
    'params_sha256',
}


def tiny_config(tiny_folder, **overrides):
  config = default.get_config()
  config.update(
      dataset='image_folder', data_dir=tiny_folder, model='cnn', num_workers=8
  )
  config.update(
      batch_size=2,
      num_train_steps=6,
      eval_every_steps=3,
      crop_padding=4,
      flip=True,
  )
  config.optim.update(ratio=16.0, lr=0.05)
  return override(config, **overrides)


def override(config, **overrides):
  """Sets dotted keys ('optim.lr') of ``config`` in place; returns it."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f if l.strip()]


# def_a runs def's program and reports x, which every def run also records
# (test_accuracy_x, checked below), so it needs no run of its own; ef21 is
# ef21_sgdm's transform and program with momentum 0 (test_ef21 checks its
# recursion), so a run of it would add only a compile.
@pytest.mark.parametrize(
    'method', [m for m in methods.NAMES if m not in ('def_a', 'ef21')]
)
def test_every_method_trains_and_evaluates(method, tiny_folder, tmp_path):
  config = tiny_config(tiny_folder, **{'optim.method': method})
  summary = trainer.train_and_evaluate(
      config, str(tmp_path), log=lambda *_: None
  )
  records = _records(tmp_path)
  assert [r['step'] for r in records] == [3, 6]
  for r in records:
    assert set(r) == RECORD_KEYS
    assert 0 <= r['test_accuracy'] <= 1 and 0 <= r['test_accuracy_x'] <= 1
    assert np.isfinite(r['train_loss'])
    assert (
        0 < r['train_time'] < r['wall_time']
    )  # steps after the first, nothing else
  assert (
      records[0]['train_time']
      < records[1]['train_time']
      == summary['train_time']
  )
  # bytes: the block (or all d values for sgd) + BN stats (none here) + loss
  d = summary['num_params']
  per_step = 4 * ((d if method == 'sgd' else -(-d // 16)) + 1)
  assert records[-1]['bytes_sent'] == 6 * per_step == summary['bytes_sent']
  with open(tmp_path / 'summary.json') as f:
    on_disk = json.load(f)
  assert SUMMARY_KEYS <= set(on_disk)
  assert on_disk['status'] == 'completed' and on_disk['steps'] == 6
  assert on_disk['final_test_accuracy'] == records[-1]['test_accuracy']
  assert len(on_disk['params_sha256']) == 64
  assert on_disk['config']['optim']['method'] == method
  if method not in ('def', 'psync'):  # only DEF and PSync report y, not x
    assert all(r['test_accuracy'] == r['test_accuracy_x'] for r in records)
  # The method's semantics, read back from the final checkpoint: its lam and
  # which model it outputs (DEF and PSync: y = x - mean_k e_k; the rest: x).
  # trainer.restore rebuilds the run from summary.json alone: its output
  # model is the one whose hash the run recorded.
  restored = trainer.restore(str(tmp_path))
  assert restored.step == 6
  assert summary['params_sha256'] == trainer.params_sha256(
      restored.run.output(restored.state['params'], restored.state['opt_state'])
  )
  mngr = ckpt.manager(os.path.join(tmp_path, 'checkpoints'), max_to_keep=2)
  saved = mngr.restore(  # as saved: named fields as dict keys
      6, args=ocp.args.Composite(state=ocp.args.StandardRestore())
  )['state']
  x = saved['params']
  x_hash = trainer.params_sha256(x)
  if method == 'sgd':
    assert 'error' not in saved['opt_state']
    assert summary['params_sha256'] == x_hash
    return
  if methods.get(method).transform == 'ef21':
    _check_ef21_state(saved['opt_state'], momentum=method == 'ef21_sgdm')
    assert summary['params_sha256'] == x_hash
    return
  error = saved['opt_state']['error']
  expected_lam = {
      'ef': 0.0,
      'def': 0.3,
      'def_a': 0.3,
      'saef': 1.0,
      'psync': 1.0,
  }[method]
  if 'lam' in saved['opt_state']:
    np.testing.assert_array_equal(
        saved['opt_state']['lam'], np.full(8, expected_lam, np.float32)
    )
  else:
    assert method == 'psync'
  y = jax.tree.map(lambda x, e: x - e.mean(0), x, error)
  gap = max(
      float(np.abs(a - b).max())
      for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y))
  )
  assert gap > 1e-6  # the workers' errors do not cancel, so y and x differ
  if method in ('def', 'psync'):
    assert summary['params_sha256'] != x_hash
  else:
    assert summary['params_sha256'] == x_hash


def _check_ef21_state(opt_state, *, momentum):
  """EF21's saved state: h the same on all 8 workers and mean_k h_k, the
  estimates per worker, v_k only with momentum, 6 steps counted."""
  h, h_k = opt_state['shared_estimate'], opt_state['estimate']
  for a, b in zip(jax.tree.leaves(h), jax.tree.leaves(h_k)):
    assert a.shape[0] == 8 and (a == a[0]).all()
    np.testing.assert_allclose(a[0], b.mean(0), rtol=1e-5, atol=1e-7)
  assert any(not np.allclose(b[0], b[1]) for b in jax.tree.leaves(h_k))
  assert bool(jax.tree.leaves(opt_state.get('momentum'))) == momentum
  np.testing.assert_array_equal(opt_state['count'], np.full(8, 6))


@pytest.mark.slow
def test_runs_are_deterministic_seeded_and_steps_per_dispatch_only_rounds(
    tiny_folder, tmp_path
):
  """Same config, same bits; several steps per dispatch (chunks cut at the
  evaluations every 3 steps: 3+3+1 or 2+1+2+1+1) give the same bits for
  every n > 1, and n = 1's to float rounding (another compiled program)."""
  run = lambda name, **kw: trainer.train_and_evaluate(
      tiny_config(tiny_folder, num_train_steps=7, **kw),
      str(tmp_path / name),
      log=lambda *_: None,
  )
  a = run('a', steps_per_dispatch=1)
  b = run('b', steps_per_dispatch=4)
  c = run('c', steps_per_dispatch=2)
  d = run('d', steps_per_dispatch=1, seed=1)
  drop_time = lambda w: [
      {k: v for k, v in r.items() if k not in ('wall_time', 'train_time')}
      for r in _records(tmp_path / w)
  ]
  # (A same-config rerun is bitwise equal too: test_checkpoint's resume tests.)
  assert c['params_sha256'] == b['params_sha256'] and drop_time(
      'c'
  ) == drop_time('b')
  assert [r['step'] for r in _records(tmp_path / 'b')] == [3, 6, 7]
  for x, y in zip(drop_time('b'), drop_time('a')):
    assert x['train_loss'] == pytest.approx(y['train_loss'], rel=1e-4)
  assert a['params_sha256'] != d['params_sha256']


def test_simulated_workers_per_device(tiny_folder, tmp_path):
  """K = 16 on 8 devices: two workers per device under vmap."""
  config = tiny_config(
      tiny_folder,
      num_workers=16,
      batch_size=1,
      num_train_steps=2,
      eval_every_steps=2,
  )
  summary = trainer.train_and_evaluate(
      config, str(tmp_path), log=lambda *_: None
  )
  assert summary['status'] == 'completed'


@pytest.mark.slow
def test_batchnorm_model_with_synced_and_local_stats(
    tiny_folder, tmp_path, monkeypatch
):
  # ResNet-20's code cut to one stage of one block, 4 channels wide (three
  # convolutions, three BatchNorms): the trainer's BatchNorm paths at a
  # fraction of the compile time (XLA:CPU compiles ResNet-20's init alone in
  # tens of seconds).
  monkeypatch.setitem(
      models._FACTORIES,
      'resnet20',
      lambda n: resnet_cifar.ResNet(n, stage_sizes=(1,), widths=(4,)),
  )
  for sync in (True, False):
    config = tiny_config(
        tiny_folder,
        model='resnet20',
        num_train_steps=2,
        eval_every_steps=2,
        sync_batch_stats=sync,
    )
    summary = trainer.train_and_evaluate(
        config, str(tmp_path / str(sync)), log=lambda *_: None
    )
    assert summary['status'] == 'completed'
    assert np.isfinite(summary['final_train_loss'])
  # Local statistics come back per worker; eval_stats is their mean. A
  # summary older than some config fields names every missing one, and
  # restores over defaults that supply them; a default that differs from
  # what the run ran with is caught by the checkpoint's fingerprint.
  workdir = tmp_path / 'False'
  with open(workdir / 'summary.json') as f:
    saved = json.load(f)
  old = copy.deepcopy(saved)
  for key in ('model_axis_size', 'flip', 'batch_size'):
    del old['config'][key]
  del old['config']['optim']['per_leaf']
  runfiles.write_summary(workdir, old)
  with pytest.raises(trainer.ConfigError) as e:
    trainer.restore(str(workdir))
  for key in ('batch_size', 'flip', 'optim.per_leaf', 'model_axis_size'):
    assert key in str(e.value), (key, str(e.value))
  assert 'pass defaults=' in str(e.value) and 'optim.lr' not in str(e.value)
  with pytest.raises(trainer.ConfigError, match='defaults= does not have'):
    trainer.restore(str(workdir), defaults=ml_collections.ConfigDict())
  with pytest.raises(ckpt.CheckpointMismatch, match='batch_size.*flip'):
    trainer.restore(str(workdir), defaults=default.get_config())
  del saved['config']['model_axis_size']  # its default is what the run had
  runfiles.write_summary(workdir, saved)
  restored = trainer.restore(str(workdir), defaults=default.get_config())
  local = jax.device_get(restored.state['batch_stats'])
  mean = jax.device_get(trainer.eval_stats(restored.config, local))
  for a, b in zip(jax.tree.leaves(local), jax.tree.leaves(mean)):
    assert a.shape == (8, *b.shape)
    np.testing.assert_allclose(a.mean(0), b, rtol=1e-6, atol=1e-7)
  assert any(not np.allclose(a[0], a[1]) for a in jax.tree.leaves(local))


def test_divergence_is_a_result(tiny_folder, tmp_path):
  config = tiny_config(tiny_folder, **{'optim.lr': 1e12, 'optim.method': 'sgd'})
  with pytest.raises(trainer.Diverged) as e:
    trainer.train_and_evaluate(config, str(tmp_path), log=lambda *_: None)
  with open(tmp_path / 'summary.json') as f:
    summary = json.load(f)
  assert summary['status'] == 'diverged'
  assert summary['diverged_at_step'] == e.value.step <= 6
  # The run's own record, then a second invocation (a finished run resumed)
  # appended beside it, never over it.
  trainer.train_and_evaluate(
      tiny_config(tiny_folder, **{'optim.method': 'sgd'}),
      str(tmp_path / 'ok'),
      log=lambda *_: None,
  )
  trainer.train_and_evaluate(
      tiny_config(tiny_folder, **{'optim.method': 'sgd'}),
      str(tmp_path / 'ok'),
      log=lambda *_: None,
  )
  [diverged] = runfiles.read_invocations(tmp_path)
  assert (
      diverged['status'] == 'diverged' and diverged['end_step'] == e.value.step
  )
  first, second = runfiles.read_invocations(tmp_path / 'ok')
  assert (first['start_step'], first['end_step'], first['status']) == (
      0,
      6,
      'completed',
  )
  assert (second['start_step'], second['end_step'], second['status']) == (
      6,
      6,
      'completed',
  )
  assert first['started'] <= first['ended'] <= second['started']
  for record in (diverged, first, second):
    assert (
        record['command'] == list(sys.orig_argv)
        and record['cwd'] == os.getcwd()
    )
    assert set(record['machine']) >= {'platform', 'hostname', 'cpu_count'}
    assert record['packages']['jax'] == jax.__version__
    assert record['git']['commit'] is None or len(record['git']['commit']) == 40


@pytest.mark.parametrize(
    'overrides, message',
    [
        ({'optim.method': 'adam'}, 'unknown optim.method'),
        ({'model': 'vgg19'}, 'unknown model'),
        ({'dataset': 'mnist'}, 'unknown dataset'),
        ({'optim.ratio': 0.5}, 'ratio'),
        ({'optim.lam': 1.5}, 'lam'),
        ({'num_workers': 12}, 'divisible'),
        ({'data_dir': '/nonexistent/data.tar'}, '/nonexistent'),
        ({'optim.schedule': 'linear'}, 'schedule'),
        ({'local_gradients': 'pmap'}, 'unknown local_gradients'),
        ({'dataset': 'imagenet2012'}, 'augmented on the host'),
        ({'model_axis_size': 0}, 'model_axis_size must be a positive integer'),
        (
            {'model_axis_size': 3, 'num_workers': 2},
            'model_axis_size=3 must divide the 8 devices',
        ),
        (
            {'model_axis_size': 2},
            'num_workers=8 x model_axis_size=2 needs 16 devices',
        ),
        (
            {'model_axis_size': 2, 'num_workers': 4, 'steps_per_dispatch': 2},
            'steps_per_dispatch',
        ),
        (
            {'model_axis_size': 2, 'num_workers': 4, 'sync_batch_stats': False},
            'sync_batch_stats',
        ),
        (
            {'model_axis_size': 2, 'num_workers': 4, 'optim.per_leaf': False},
            'optim.per_leaf',
        ),
        ({'optim.lr': 0.0}, 'optim.lr must be a number > 0'),
        ({'optim.lr': -0.1}, 'optim.lr must be a number > 0'),
        (
            {'optim.momentum': 1.0},
            r'optim.momentum must be a number in \[0, 1\)',
        ),
        (
            {'optim.weight_decay': -1e-4},
            'optim.weight_decay must be a number >= 0',
        ),
        (
            {'optim.warmup_epochs': -1.0},
            'optim.warmup_epochs must be a number >= 0',
        ),
        (
            {'optim.dense_warmup_steps': -1},
            'optim.dense_warmup_steps must be an integer >= 0',
        ),
        ({'eval_every_steps': -3}, 'eval_every_steps must be an integer >= 0'),
        (
            {'checkpoint_every_steps': -1},
            'checkpoint_every_steps must be an integer >= 0',
        ),
        ({'max_to_keep': 0}, 'max_to_keep must be a positive integer'),
        (
            {'optim.warmup_epochs': 1.0},
            'warmup_epochs=1 is 3 steps, not shorter than the 3 steps',
        ),
    ],
)
def test_bad_config_errors(overrides, message, tiny_folder, tmp_path):
  with pytest.raises(trainer.ConfigError, match=message):
    trainer.train_and_evaluate(
        tiny_config(tiny_folder, **overrides), str(tmp_path)
    )


def _tp_config(tiny_folder, **overrides):
  """K = 4 workers of M = 2 devices, the Megatron-annotated MLP."""
  return tiny_config(
      tiny_folder,
      **{
          'model': 'mlp_tp',
          'num_workers': 4,
          'model_axis_size': 2,
          'num_train_steps': 4,
          'eval_every_steps': 2,
          **overrides,
      },
  )


@pytest.mark.slow
def test_model_axis_size_two_trains_resumes_bitwise_and_reshards(
    tiny_folder, tmp_path
):
  """Workers of two devices train end to end; resumed from the step-2
  checkpoint (restored onto the sharded state's shardings), the run ends on
  the uninterrupted run's bits; resumed on K = 2 workers of 2 devices with
  resume_reshard, it keeps the output model and finishes."""
  config = _tp_config(tiny_folder, checkpoint_every_steps=2)
  whole = trainer.train_and_evaluate(
      config, str(tmp_path / 'whole'), log=lambda *_: None
  )
  assert whole['status'] == 'completed' and np.isfinite(
      whole['final_train_loss']
  )
  assert [r['step'] for r in _records(tmp_path / 'whole')] == [2, 4]
  # Per worker: each of its 2 devices all-reduces its per-shard blocks, half
  # of the replicated leaves' blocks, and the loss.
  d = whole['num_params']
  sharded = sum(
      max(1, n // 16) for n in (3072 * 1024 // 2, 1024 // 2, 1024 * 1024 // 2)
  )
  replicated = sum(max(1, n // 16) for n in (1024, 1024 * 3, 3))
  assert whole['bytes_per_step'] == 2 * 4 * (sharded + -(-replicated // 2) + 1)
  assert d == 3072 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 3 + 3
  mngr = ckpt.manager(str(tmp_path / 'whole' / 'checkpoints'), max_to_keep=2)
  saved = mngr.restore(
      4, args=ocp.args.Composite(state=ocp.args.StandardRestore())
  )['state']
  assert saved['opt_state']['error']['column']['kernel'].shape == (
      4,
      3072,
      1024,
  )
  # trainer.restore lays the saved state onto the run's sharded layout: its
  # output model is the one whose hash the run recorded.
  restored = trainer.restore(str(tmp_path / 'whole'))
  assert restored.step == 4 and restored.layout.devices_per_worker == 2
  assert whole['params_sha256'] == trainer.params_sha256(
      restored.run.output(restored.state['params'], restored.state['opt_state'])
  )
  shutil.copytree(
      tmp_path / 'whole' / 'checkpoints' / '2',
      tmp_path / 'resumed' / 'checkpoints' / '2',
  )
  logs = []
  resumed = trainer.train_and_evaluate(
      config, str(tmp_path / 'resumed'), log=logs.append
  )
  assert 'resuming from the checkpoint at step 2' in logs
  for key in (
      'params_sha256',
      'final_train_loss',
      'final_test_accuracy',
      'final_test_accuracy_x',
      'bytes_sent',
  ):
    assert resumed[key] == whole[key], key
  shutil.copytree(
      tmp_path / 'whole' / 'checkpoints' / '2',
      tmp_path / 'resharded' / 'checkpoints' / '2',
  )
  resharded = trainer.train_and_evaluate(
      _tp_config(
          tiny_folder,
          checkpoint_every_steps=2,
          num_workers=2,
          resume_reshard=True,
      ),
      str(tmp_path / 'resharded'),
      log=lambda *_: None,
  )
  assert resharded['status'] == 'completed' and resharded['steps'] == 4
  assert resharded['resharded_from_workers'] == 4
  assert resharded['reshard_output_change'] <= 1e-6


@pytest.mark.slow
def test_model_axis_size_two_at_ratio_one_matches_one_device_workers(
    tiny_folder, tmp_path
):
  """At ratio 1 per-shard RBGS keeps every value, as the 1-D layout's RBGS
  does: K = 4 workers of 2 devices train what K = 4 workers of one device
  train, to float tolerance (losses, accuracies, the output model's hash aside).
  """
  run = lambda m: trainer.train_and_evaluate(
      _tp_config(tiny_folder, model_axis_size=m, **{'optim.ratio': 1.0}),
      str(tmp_path / str(m)),
      log=lambda *_: None,
  )
  one, two = run(1), run(2)
  assert two['final_train_loss'] == pytest.approx(
      one['final_train_loss'], rel=1e-5
  )
  assert two['final_test_accuracy'] == one['final_test_accuracy']
  assert two['final_test_accuracy_x'] == one['final_test_accuracy_x']
  for a, b in zip(_records(tmp_path / '1'), _records(tmp_path / '2')):
    assert b['train_loss'] == pytest.approx(a['train_loss'], rel=1e-5)


def test_learning_rate_schedule_boundaries():
  """lr / 10 at 50% and 75% of the steps (or at whole epochs), counted from
  step 0 also after a linear warm-up; decays that fall on one step (a 2-step
  run) compound."""
  optim = default.get_config().optim
  optim.decay_whole_epochs = False
  lr = lambda sched, t: float(sched(t))
  s = optimizer.learning_rate_schedule(
      optim, steps_per_epoch=10, total_steps=100
  )
  for t, want in [
      (0, 0.05),
      (49, 0.05),
      (50, 0.005),
      (74, 0.005),
      (75, 0.0005),
      (99, 0.0005),
  ]:
    assert lr(s, t) == pytest.approx(want, rel=1e-6), t
  optim.warmup_epochs = 1.0
  s = optimizer.learning_rate_schedule(
      optim, steps_per_epoch=10, total_steps=100
  )
  for t, want in [
      (0, 0.0),
      (5, 0.025),
      (10, 0.05),
      (49, 0.05),
      (50, 0.005),
      (75, 0.0005),
  ]:
    assert lr(s, t) == pytest.approx(want, rel=1e-6, abs=1e-9), t
  optim.warmup_epochs = 0.0
  s = optimizer.learning_rate_schedule(optim, steps_per_epoch=1, total_steps=2)
  assert lr(s, 0) == pytest.approx(0.05) and lr(s, 1) == pytest.approx(0.0005)
  # Counted in steps, E = 6 epochs decay at steps 30 and 45; in whole epochs
  # (the authors', the default) at epochs 3 and int(4.5) = 4.
  s = optimizer.learning_rate_schedule(
      optim, steps_per_epoch=10, total_steps=60
  )
  for t, want in [(30, 0.005), (40, 0.005), (44, 0.005), (45, 0.0005)]:
    assert lr(s, t) == pytest.approx(want, rel=1e-6), t
  optim.decay_whole_epochs = True
  s = optimizer.learning_rate_schedule(
      optim, steps_per_epoch=10, total_steps=60
  )
  for t, want in [
      (29, 0.05),
      (30, 0.005),
      (39, 0.005),
      (40, 0.0005),
      (59, 0.0005),
  ]:
    assert lr(s, t) == pytest.approx(want, rel=1e-6), t
  optim.schedule = 'cosine'
  s = optimizer.learning_rate_schedule(
      optim, steps_per_epoch=10, total_steps=100
  )
  assert lr(s, 0) == pytest.approx(0.05) and lr(s, 50) == pytest.approx(
      0.025, rel=1e-5
  )
  assert lr(s, 100) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    'total_steps, decays',
    [
        (
            400,
            [200, 300],
        ),  # issue 28: whole epochs put both at step 0 (lr / 100 throughout)
        (
            702,
            [351, 468],
        ),  # 1.5 epochs: the first has no whole epoch, the second does
        (
            1000,
            [468, 750],
        ),  # 2.1 epochs: both fell on epoch 1; the second moves to 75%
        (
            1404,
            [468, 936],
        ),  # the quick start (3 epochs): whole epochs, as committed
        (
            25740,
            [12636, 19188],
        ),  # the long horizon (55 epochs): epochs 27 and 41
    ],
)
def test_short_runs_decay_within_the_run(total_steps, decays):
  """With whole-epoch decays (the default) a decay keeps its epoch only where
  that epoch is after step 0 and after the previous decay's; otherwise it
  comes at step int(f T), so a short run trains at lr before its first decay."""
  optim = default.get_config().optim
  assert optim.decay_whole_epochs
  assert (
      optimizer.decay_steps(optim, steps_per_epoch=468, total_steps=total_steps)
      == decays
  )
  s = optimizer.learning_rate_schedule(
      optim, steps_per_epoch=468, total_steps=total_steps
  )
  for t, want in [
      (0, 0.05),
      (decays[0] - 1, 0.05),
      (decays[0], 0.005),
      (decays[1] - 1, 0.005),
      (decays[1], 0.0005),
      (total_steps - 1, 0.0005),
  ]:
    assert float(s(t)) == pytest.approx(want, rel=1e-6), t


def test_warmup_must_end_before_the_first_decay_and_the_run():
  optim = default.get_config().optim
  optim.warmup_epochs = 1.0
  s = optimizer.learning_rate_schedule(
      optim, steps_per_epoch=100, total_steps=400
  )
  assert [float(s(t)) for t in (50, 100, 200, 300)] == pytest.approx(
      [0.025, 0.05, 0.005, 0.0005], rel=1e-6
  )
  with pytest.raises(
      ValueError,
      match='100 steps, not shorter than the 100 steps before the'
      ' first lr decay',
  ):  # 3 epochs: the decay right at the warm-up's end
    optimizer.learning_rate_schedule(
        optim, steps_per_epoch=100, total_steps=300
    )
  with pytest.raises(
      ValueError,
      match='468 steps, not shorter than the 200 steps before the'
      ' first lr decay',
  ):
    optimizer.learning_rate_schedule(
        optim, steps_per_epoch=468, total_steps=400
    )
  optim.schedule = 'cosine'
  with pytest.raises(
      ValueError,
      match='not shorter than the 400 steps before the end of the run',
  ):
    optimizer.learning_rate_schedule(
        optim, steps_per_epoch=468, total_steps=400
    )


def test_resolved_lam_and_output_model():
  """EF detaches nothing (lam 0), SAEF and PSync fully (1), DEF and DEF-A use
  optim.lam; DEF and PSync output the average y, the rest x."""
  optim = default.get_config().optim
  optim.lam = 0.6
  want = {
      'sgd': 0.6,
      'ef': 0.0,
      'def': 0.6,
      'def_a': 0.6,
      'saef': 1.0,
      'psync': 1.0,
  }
  for method, lam in want.items():
    optim.method = method
    assert methods.resolved_lam(method, optim.lam) == lam
  assert {m.name for m in methods.TABLE if m.averaged_output} == {
      'def',
      'psync',
  }


def tiny_cli(tiny_folder, workdir, *extra):
  """train.py's command line on the tiny image folder: the quick-start config
  at batch 2 and ratio 16, then ``extra`` (a later flag wins)."""
  return [
      sys.executable,
      os.path.join(REPO, 'train.py'),
      '--config',
      'configs/fashion_mnist.py',
      '--workdir',
      str(workdir),
      '--config.dataset=image_folder',
      f'--config.data_dir={tiny_folder}',
      '--config.batch_size=2',
      '--config.optim.ratio=16',
      *extra,
  ]


def _train_py(tmp_path, *args, env=None, timeout=300):
  return subprocess.run(
      [sys.executable, os.path.join(REPO, 'train.py'), *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=timeout,
      env=dict(os.environ, **(env or {})),
  )


@needs_fmnist
@pytest.mark.slow
def test_cli_overrides_and_quickstart_config(tmp_path):
  """The contract command line on the real Fashion-MNIST, a few steps."""
  workdir = tmp_path / 'fm'
  proc = _train_py(
      tmp_path,
      '--config',
      'configs/fashion_mnist.py',
      '--workdir',
      str(workdir),
      '--config.optim.method=ef',
      '--config.optim.ratio=64',
      '--config.seed=1',
      '--config.optim.block_seed=5',
      '--config.num_train_steps=4',
      '--config.eval_every_steps=4',
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'final test accuracy' in proc.stdout
  with open(workdir / 'summary.json') as f:
    summary = json.load(f)
  assert summary['config']['optim']['method'] == 'ef'
  assert summary['config']['optim']['ratio'] == 64
  assert summary['config']['seed'] == 1
  assert summary['config']['optim']['block_seed'] == 5
  assert summary['steps'] == 4 and summary['steps_per_epoch'] == 60000 // 128


def test_cli_help_lists_the_program_flags(tmp_path):
  """--help shows the main module's key flags; they are defined in
  defjax.training.main, not in train.py, and must be listed all the same."""
  proc = _train_py(tmp_path, '--help')  # absl exits 1 after --help
  for flag in (
      'config',
      'workdir',
      'coordinator_address',
      'num_processes',
      'process_id',
      'heartbeat_timeout_seconds',
  ):
    assert f'--{flag}:' in proc.stdout, proc.stdout


def test_cli_bad_input_is_one_line(tmp_path, tiny_folder):
  proc = _train_py(
      tmp_path,
      '--config',
      'configs/fashion_mnist.py',
      '--workdir',
      str(tmp_path / 'x'),
      '--config.optim.method=topk',
  )
  assert proc.returncode == 2
  assert (
      proc.stderr.strip()
      .splitlines()[-1]
      .startswith('error: unknown optim.method')
  )
  assert 'Traceback' not in proc.stderr
  proc = _train_py(
      tmp_path,
      '--config',
      'configs/fashion_mnist.py',
      '--workdir',
      str(tmp_path / 'y'),
      '--config.data_dir=/nonexistent',
  )
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert 'apt-get install dataset-fashion-mnist' in proc.stderr


def test_cli_unprepared_tfds_data_is_one_line(tmp_path):
  """A paper config on a machine where TFDS has not built cifar10."""
  (tmp_path / 'tfds').mkdir()
  proc = _train_py(
      tmp_path,
      '--config',
      'configs/cifar10_vgg16.py',
      '--workdir',
      str(tmp_path / 'x'),
      env={'TFDS_DATA_DIR': str(tmp_path / 'tfds')},
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  [line] = proc.stderr.strip().splitlines()
  assert line.startswith('error: cifar10 is not prepared as array_record')
  assert 'tfds build cifar10 --file_format=array_record' in line
  assert '--config.dataset=image_folder' in line


def test_cli_divergence_exit_code(tmp_path, tiny_folder):
  proc = _train_py(
      tmp_path,
      '--config',
      'configs/fashion_mnist.py',
      '--workdir',
      str(tmp_path / 'd'),
      f'--config.data_dir={tiny_folder}',
      '--config.dataset=image_folder',
      '--config.optim.lr=1e12',
      '--config.num_train_steps=4',
      '--config.batch_size=2',
  )
  assert proc.returncode == runfiles.EXIT_DIVERGED, proc.stderr[-2000:]
  assert 'diverged at step' in proc.stderr


@pytest.mark.parametrize(
    'dataset, model, overrides',
    [
        # (cifar100 is cifar10's source with 100 classes: test_data's
        # test_tfds_mock_data loads it; another run here would add only time.)
        ('cifar10', 'cnn', {'crop_padding': 4, 'flip': True}),
        # ImageNet streams host-side crops; a small crop and the small CNN keep
        # this test fast (the batch-norm path has its own test).
        (
            'imagenet2012',
            'cnn',
            {'image_size': 32, 'crop_padding': 0, 'flip': False},
        ),
    ],
)
@pytest.mark.slow
def test_tfds_datasets_with_mock_data(dataset, model, overrides, tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  config = tiny_config(
      '',
      dataset=dataset,
      model=model,
      num_train_steps=2,
      eval_every_steps=2,
      batch_size=2,
      **overrides,
  )
  with tfds.testing.mock_data(num_examples=16):
    summary = trainer.train_and_evaluate(
        config, str(tmp_path), log=lambda *_: None
    )
  assert summary['status'] == 'completed'
  assert np.isfinite(summary['final_train_loss'])


def test_dense_warmup_steps_count_dense_bytes(tiny_folder, tmp_path):
  config = tiny_config(tiny_folder, **{'optim.dense_warmup_steps': 2})
  summary = trainer.train_and_evaluate(
      config, str(tmp_path), log=lambda *_: None
  )
  d = summary['num_params']
  assert summary['bytes_sent'] == 2 * 4 * (d + 1) + 4 * 4 * (-(-d // 16) + 1)


@pytest.mark.parametrize(
    'seed,block_seed,expected', [(0, None, 0), (3, None, 3), (3, 7, 7)]
)
def test_block_sequence_follows_the_seed_unless_pinned(
    seed, block_seed, expected
):
  import jax
  import jax.numpy as jnp

  optim = default.get_config().optim
  optim.block_seed = block_seed
  _, compressor = optimizer.build(
      optim, schedule=0.1, axis_name=None, seed=seed
  )
  state = compressor.init({'w': jnp.zeros(1000)})
  np.testing.assert_array_equal(state.key, jax.random.PRNGKey(expected))


@pytest.mark.parametrize(
    'name',
    sorted(
        p[:-3]
        for p in os.listdir(os.path.join(REPO, 'configs'))
        if p.endswith('.py') and p != '__init__.py'
    ),
)
def test_every_shipped_config_is_valid(name):
  """Each file in configs/ loads and passes the checks run before any compute;
  at its full length it decays at the start of epochs int(f E), the authors'
  rule (the short-run exception never applies to a shipped config)."""
  import importlib

  config = importlib.import_module(f'configs.{name}').get_config()
  config_checks.validate(config)
  train_size = {
      'fashion_mnist': 60000,
      'cifar10': 50000,
      'cifar100': 50000,
      'imagenet2012': 1281167,
  }[config.dataset]
  per_epoch = train_size // (config.num_workers * config.batch_size)
  total = runfiles.total_steps(
      config.num_train_steps, config.num_epochs, per_epoch
  )
  assert config.optim.decay_whole_epochs
  assert optimizer.decay_steps(
      config.optim, steps_per_epoch=per_epoch, total_steps=total
  ) == [int(f * config.num_epochs) * per_epoch for f in config.optim.decay_at]
