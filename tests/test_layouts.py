"""Every layout behind the one interface (``defjax.layouts.base.Layout``): the
same program, written once, runs DEF on each."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import defjax
from configs import default
from defjax import layouts
from defjax.layouts import data_parallel, sharded
from helpers import assert_trees_close, batches, mlp_loss, mlp_params, momentum_sgd

SIZES = (12, 64, 3)
# Megatron-style specs: the sharded layout splits the hidden units over
# 'model'; the 1-D layout replicates x whatever they say.
SPECS = {
    'layer0': {'w': P(None, 'model'), 'b': P('model')},
    'layer1': {'w': P('model', None), 'b': P()},
}
LAYOUTS = {
    'data_parallel': lambda: data_parallel.make_layout(8),
    'data_parallel_2_per_device': lambda: data_parallel.make_layout(16),
    'sharded_4x2': lambda: sharded.make_layout(4, 2),
}


def _loss(params, model_state, batch):
  return mlp_loss(params, batch), model_state


@pytest.mark.parametrize('name', LAYOUTS)
def test_def_through_the_interface(name):
  """x placed, state initialised and stepped, y read and bytes counted by the
  layout alone; the state keeps its types and shardings from step to step,
  and y = x - mean_k e_k."""
  layout = LAYOUTS[name]()
  assert isinstance(layout, layouts.Layout)
  whole = mlp_params(sizes=SIZES)
  params = jax.device_put(whole, layout.param_shardings(whole, SPECS))
  compressor = layout.rbgs(8, SPECS, per_leaf=True)
  tx = defjax.error_feedback(
      momentum_sgd(), compressor, lam=0.3, axis_name=layout.axis_name
  )
  state = layout.init_state(tx, params, SPECS)
  want = layout.state_shardings(jax.eval_shape(tx.init, params), params, SPECS)
  for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
    assert a.sharding.is_equivalent_to(s, a.ndim)
  types = jax.tree.map(jax.typeof, state)
  step = layout.train_step(_loss, tx, SPECS, donate=False)
  xs, ys = (np.asarray(a) for a in batches(2, workers=layout.num_workers))
  rows = layout.worker_rows()
  for t in range(2):
    batch = (layout.global_batch(xs[t][rows]), layout.global_batch(ys[t][rows]))
    params, _, state, loss = step(params, {}, state, batch)
  assert np.isfinite(float(loss))
  assert jax.tree.map(jax.typeof, state) == types
  y = layout.averaged_params(SPECS)(params, state)
  expected = jax.tree.map(
      lambda p, e: np.asarray(p) - np.asarray(e).mean(0), params, state.error
  )
  assert_trees_close(y, expected, rtol=1e-6, atol=1e-7)
  payload = compressor.payload(params)
  assert layout.bytes_per_step(payload) == layout.devices_per_worker * 4 * (
      payload + 1
  )
  assert layout.dense_payload(params, SPECS) * layout.devices_per_worker >= sum(
      x.size for x in jax.tree.leaves(whole)
  )


@pytest.mark.parametrize(
    'overrides, layout_class, devices',
    [
        ({}, data_parallel.DataParallelLayout, 8),
        ({'num_workers': 16}, data_parallel.DataParallelLayout, 16),
        ({'num_workers': 4, 'model_axis_size': 2}, sharded.ShardedLayout, 8),
    ],
)
def test_a_config_picks_its_layout(overrides, layout_class, devices):
  config = default.get_config()
  config.update(overrides)
  layouts.check_config(config)
  layout = layouts.for_config(config)
  assert type(layout) is layout_class
  assert layout.num_workers == config.num_workers
  assert layout.devices_per_worker == config.model_axis_size
  assert layouts.devices_for(config) == devices
