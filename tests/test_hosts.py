"""The hierarchical layout: K hosts of M data-parallel devices (layouts.hosts).

Its algebra (K hosts x M devices with n / M examples each is the 1-D layout
with K workers of n examples), what crosses hosts in the compiled step (the
block split M ways), and the training program on it: resume and reshard.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import defjax
from defjax import compress
from defjax import wire
from defjax.layouts import data_parallel
from defjax.layouts import hosts
from defjax.training import checkpoint as ckpt
from defjax.training import trainer
from helpers import mlp_loss, mlp_params, momentum_sgd
from test_trainer import tiny_config

K, M, N = 2, 4, 12  # hosts, devices per host, a worker's examples per step
RATIO = 16


def _transform(method, axis_name, ratio=RATIO):
  if method == 'sgd':
    return defjax.data_parallel(momentum_sgd(), axis_name=axis_name)
  if method == 'psync':
    return defjax.psync(momentum_sgd(), defjax.rbgs(ratio), axis_name=axis_name)
  lam = {'ef': 0.0, 'def': 0.3}[method]
  return defjax.error_feedback(
      momentum_sgd(), defjax.rbgs(ratio), lam=lam, axis_name=axis_name
  )


def _loss(params, model_state, batch):
  return mlp_loss(params, batch), model_state


def _data(steps, n=N, seed=0):
  rng = np.random.default_rng(seed)
  return [
      (
          rng.normal(size=(K, n, 12)).astype(np.float32),
          rng.integers(0, 3, (K, n)).astype(np.int32),
      )
      for _ in range(steps)
  ]


def _run(layout, tx, data):
  params = jax.device_put(mlp_params(), layout.replicated)
  state = layout.init_state(tx, params)
  step = layout.train_step(_loss, tx, donate=False)
  for x, y in data:
    if isinstance(layout, hosts.HostLayout):
      batch = (layout.global_batch(x), layout.global_batch(y))
    else:
      batch = jax.device_put((x, y), layout.per_worker)
    params, _, state, loss = step(params, {}, state, batch)
  y = layout.averaged_params()(params, state)
  return jax.tree.map(np.asarray, (params, state, y, loss))


def _max_diff(a, b):
  return max(
      float(np.abs(np.asarray(u, np.float64) - np.asarray(v)).max())
      for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


@pytest.mark.parametrize('method', ['sgd', 'ef', 'def', 'psync'])
def test_hosts_equal_the_1d_layout_with_whole_host_batches(method):
  """K hosts x M devices with N / M examples each train as K workers of N
  examples on the 1-D layout (a model without batch norm): the same x, error
  and momentum, and y, to float rounding (the split means sum in another
  order)."""
  data = _data(4)
  layout = hosts.make_layout(K, M)
  assert layout.mesh.shape == {'data': K, 'replica': M}
  split = _run(layout, _transform(method, layout.axis_name), data)
  flat = data_parallel.make_layout(K)
  whole = _run(flat, _transform(method, flat.axis_name), data)
  assert _max_diff(split, whole) < 1e-6
  # ... and not as K workers of one device's N / M examples.
  part = _run(
      flat,
      _transform(method, flat.axis_name),
      [(x[:, : N // M], y[:, : N // M]) for x, y in data],
  )
  assert _max_diff(split[0], part[0]) > 1e-4


def test_split_mean_is_the_mean_on_every_device():
  """compress.worker_mean with a SplitAxis: the mean over 'data' of a tree
  equal along 'replica', for sizes that do not divide by M (padding)."""
  layout = hosts.make_layout(K, M)
  rng = np.random.default_rng(1)
  tree = {
      'a': rng.normal(size=(K, 5)).astype(np.float32),
      'b': rng.normal(size=(K, 2, 3)).astype(np.float32),
  }
  f = jax.jit(
      jax.shard_map(
          lambda t: compress.worker_mean(
              jax.tree.map(lambda x: x[0], t), layout.axis_name
          ),
          mesh=layout.mesh,
          in_specs=jax.sharding.PartitionSpec('data'),
          out_specs=jax.sharding.PartitionSpec(),
          check_vma=False,
      )
  )
  out = f(jax.device_put(tree, layout.per_worker))
  for key in tree:
    np.testing.assert_allclose(out[key], tree[key].mean(0), rtol=1e-6)


def _crossing(layout, tx, ms=None):
  """Every collective of the compiled step whose groups span hosts."""
  params = jax.device_put(mlp_params(), layout.replicated)
  state = layout.init_state(tx, params)
  ms = {} if ms is None else ms

  def loss(p, model_state, batch):
    out = mlp_loss(p, batch)
    return out, jax.tree.map(lambda s: s + out, model_state)

  step = layout.train_step(loss, tx, donate=False)
  x, y = _data(1)[0]
  batch = (layout.global_batch(x), layout.global_batch(y))
  compiled = step.lower(params, ms, state, batch).compile()
  return [t for t in wire.transfers(compiled, layout.mesh) if t.spans('data')]


def _cross_sizes(found):
  return sorted(math.prod(s) for t in found for _, s in t.collective.shapes)


@pytest.mark.parametrize('method', ['def', 'sgd'])
def test_only_the_split_block_crosses_hosts(method):
  """Across hosts each device all-reduces ceil(b / M) values of the block
  (ceil(d / M) for SGD), ceil(s / M) of the s synced statistics and the
  scalar loss; nothing else, and no collective across hosts gathers. Built
  with plain axis_name 'data' (no split), the check sees b values: M copies
  of the block per host."""
  layout = hosts.make_layout(K, M)
  d = sum(x.size for x in jax.tree.leaves(mlp_params()))
  b = d if method == 'sgd' else math.ceil(d / RATIO)
  stats = {'mean': jnp.zeros(7), 'var': jnp.zeros(3)}  # 10 synced values
  found = _crossing(
      layout,
      _transform(method, layout.axis_name),
      jax.device_put(stats, layout.replicated),
  )
  assert all(
      t.collective.op == 'all-reduce' and not t.spans('replica')
      for t in found
      if math.prod(t.collective.shapes[0][1]) > 1
  ), found
  assert _cross_sizes(found) == sorted(
      [math.ceil(b / M), math.ceil(10 / M), 1]
  ), found
  assert layout.bytes_per_step(b, 10) == 4 * (
      M * math.ceil(b / M) + M * math.ceil(10 / M) + M
  )
  unsplit = _crossing(layout, _transform(method, 'data'))
  assert (
      sum(_cross_sizes(unsplit)) == b + 1
  )  # b values from every device, and the loss


def test_layout_refuses_collectives_over_other_axes():
  layout = hosts.make_layout(K, M)
  tx = _transform('def', ('data', 'replica'))
  with pytest.raises(ValueError, match="spans \\('data', 'replica'\\)"):
    layout.train_step(_loss, tx, donate=False).lower(
        *_abstract_args(layout, tx)
    )
  with pytest.raises(ValueError, match='devices_per_host=4 need 12 devices'):
    hosts.make_layout(3, 4)


def _abstract_args(layout, tx):
  params = jax.device_put(mlp_params(), layout.replicated)
  x, y = _data(1)[0]
  return (
      params,
      {},
      layout.init_state(tx, params),
      (layout.global_batch(x), layout.global_batch(y)),
  )


def _hosts_config(tiny_folder, **overrides):
  return tiny_config(
      tiny_folder,
      **{'num_workers': 2, 'devices_per_host': 4, 'batch_size': 4, **overrides},
  )


@pytest.mark.slow
def test_trains_from_the_program_resumes_bitwise_and_reshards(
    tiny_folder, tmp_path
):
  """train_and_evaluate on 2 hosts x 4 devices: 6 steps in one go equal 3 +
  3 resumed (bits); resumed on 1 host x 4 devices with resume_reshard, DEF's
  output model y is kept (to float rounding)."""
  quiet = dict(log=lambda *_: None)
  config = lambda **kw: _hosts_config(
      tiny_folder, eval_every_steps=3, checkpoint_every_steps=3, **kw
  )
  whole = trainer.train_and_evaluate(
      config(num_train_steps=6), str(tmp_path / 'a'), **quiet
  )
  assert whole['status'] == 'completed'
  assert whole['bytes_per_step'] == hosts.make_layout(2, 4).bytes_per_step(
      math.ceil(whole['num_params'] / 16), 0
  )
  # trainer.restore lays the saved state onto the hosts layout again: its
  # output model is the one whose hash the run recorded.
  restored = trainer.restore(str(tmp_path / 'a'))
  assert isinstance(restored.layout, hosts.HostLayout)
  assert restored.step == 6 and restored.layout.devices_per_worker == 4
  assert whole['params_sha256'] == trainer.params_sha256(
      restored.run.output(restored.state['params'], restored.state['opt_state'])
  )
  trainer.train_and_evaluate(
      config(num_train_steps=6), str(tmp_path / 'b'), **quiet
  )
  mngr = ckpt.manager(
      os.path.join(tmp_path / 'b', 'checkpoints'), max_to_keep=2
  )
  mngr.delete(6)
  mngr.close()
  os.remove(tmp_path / 'b' / 'summary.json')
  resumed = trainer.train_and_evaluate(
      config(num_train_steps=6), str(tmp_path / 'b'), **quiet
  )
  assert resumed['params_sha256'] == whole['params_sha256']
  one_host = trainer.train_and_evaluate(
      config(num_train_steps=6, num_workers=1, resume_reshard=True),
      str(tmp_path / 'a'),
      **quiet,
  )
  assert one_host['resharded_from_workers'] == 2
  assert one_host['reshard_output_change'] <= 1e-6
