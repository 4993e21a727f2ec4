"""The 1-D layout's shard_map train step on 8 CPU devices: wire payload,
equivalence, layout."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import defjax
from defjax import wire
from defjax.layouts import data_parallel
from helpers import (
    all_reduce_elements,
    assert_trees_close,
    batches,
    mlp_loss,
    mlp_params,
    momentum_sgd,
    run_workers,
)


def _loss(params, model_state, batch):
  return mlp_loss(params, batch), model_state


def _setup(tx_factory, num_workers, steps=4, local_gradients='vmap'):
  layout = data_parallel.make_layout(
      num_workers, local_gradients=local_gradients
  )
  tx = tx_factory(layout.axis_name)
  params = jax.device_put(mlp_params(), layout.replicated)
  state = layout.init_state(tx, params)
  step = layout.train_step(_loss, tx, donate=False)
  xs, ys = batches(steps, workers=num_workers)
  return layout, tx, params, state, step, xs, ys


def _big_params():
  # d = 64*512 + 512 + 512*10 + 10 = 38,410: large enough that a full-length
  # all-reduce stands out from the block and the scalar loss.
  return mlp_params(sizes=(64, 512, 10))


@pytest.mark.parametrize('ratio', [16, 256])
@pytest.mark.parametrize('per_leaf', [False, True])
def test_compiled_step_all_reduces_only_the_block(ratio, per_leaf):
  """Identity 7: the compiled step's all-reduce payload is b floats, never d."""
  layout = data_parallel.make_layout(8)
  tx = defjax.error_feedback(
      momentum_sgd(),
      defjax.rbgs(ratio, per_leaf=per_leaf),
      lam=0.3,
      axis_name=layout.axis_name,
  )
  params = jax.device_put(_big_params(), layout.replicated)
  d = optax.tree.size(params)
  state = layout.init_state(tx, params)
  step = layout.train_step(_loss, tx, donate=False)
  x = jnp.zeros((8, 4, 64))
  y = jnp.zeros((8, 4), jnp.int32)
  compiled = step.lower(
      params, {}, state, jax.device_put((x, y), layout.per_worker)
  ).compile()
  found = wire.collectives(compiled)
  shapes = [s for c in found for _, s in c.shapes]
  sizes = sorted(math.prod(s) for s in shapes)
  # b from ALGORITHMS.md, not from the compressor: ceil(d / ratio) for the
  # global block, sum of max(1, floor(n_leaf / ratio)) for per-leaf blocks.
  if per_leaf:
    b = sum(max(1, x.size // ratio) for x in jax.tree.leaves(params))
  else:
    b = math.ceil(d / ratio)
  assert {c.op for c in found} == {'all-reduce'}
  # one operand of b values (the block), the rest scalars (the loss)
  assert sizes[-1] == b and all(s <= 1 for s in sizes[:-1]), sizes
  assert max(sizes) < d


@pytest.mark.parametrize('num_workers', [8, 16])
def test_step_rejects_a_transform_built_for_other_workers(num_workers):
  """A transform whose all-reduce misses some workers (axis_name 'data' with
  2 workers per device, or None) would silently drop their gradients: the
  step refuses it at trace time, also inside an optax chain."""
  layout = data_parallel.make_layout(num_workers)
  params = jax.device_put(mlp_params(), layout.replicated)
  xs, ys = batches(1, workers=num_workers)
  batch = jax.device_put((xs[0], ys[0]), layout.per_worker)
  wrong = [None, 'data'] if num_workers == 16 else [None]
  for axis_name in wrong:
    for tx in (
        defjax.error_feedback(
            momentum_sgd(), defjax.rbgs(8), axis_name=axis_name
        ),
        optax.chain(
            optax.clip(1.0),
            defjax.data_parallel(momentum_sgd(), axis_name=axis_name),
        ),
    ):
      state = layout.init_state(tx, params)
      step = layout.train_step(_loss, tx, donate=False)
      with pytest.raises(ValueError, match='axis_name='):
        step(params, {}, state, batch)
  tx = optax.chain(
      optax.clip(1.0),
      defjax.psync(momentum_sgd(), defjax.rbgs(8), axis_name=layout.axis_name),
  )
  state = layout.init_state(tx, params)
  step = layout.train_step(_loss, tx, donate=False)
  step(params, {}, state, batch)  # the right axes pass


def test_hlo_check_catches_the_full_gradient_all_reduce():
  """The trap: grad w.r.t. replicated params under check_vma=True all-reduces
  the full gradient. The HLO check above must see it (so it can fail)."""
  layout = data_parallel.make_layout(8)
  params = jax.device_put(_big_params(), layout.replicated)
  d = optax.tree.size(params)

  def naive(params, batch):
    x, y = batch
    g = jax.grad(mlp_loss)(params, (x[0], y[0]))  # no pcast: implicit psum
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, g)

  step = jax.jit(
      jax.shard_map(
          naive,
          mesh=layout.mesh,
          in_specs=(P(), P('data')),
          out_specs=P(),
          check_vma=True,
      )
  )
  x = jnp.zeros((8, 4, 64))
  y = jnp.zeros((8, 4), jnp.int32)
  compiled = step.lower(
      params, jax.device_put((x, y), layout.per_worker)
  ).compile()
  assert sum(all_reduce_elements(compiled)) >= d

  def fixed(params, batch):
    params = jax.lax.pcast(params, 'data', to='varying')
    return naive(params, batch)

  step = jax.jit(
      jax.shard_map(
          fixed,
          mesh=layout.mesh,
          in_specs=(P(), P('data')),
          out_specs=P('data'),
          check_vma=True,
      )
  )
  compiled = step.lower(
      params, jax.device_put((x, y), layout.per_worker)
  ).compile()
  assert all_reduce_elements(compiled) == []


# Every placement of workers with DEF (per-worker error and gradient point
# to place), and SGD's transform in one: the placement does not depend on it.
@pytest.mark.parametrize(
    'method, num_workers, local_gradients',
    [
        ('def', 8, 'vmap'),
        ('def', 16, 'vmap'),
        ('def', 16, 'unroll'),
        ('def', 4, 'vmap'),
        ('sgd', 16, 'unroll'),
    ],
)
def test_sharded_step_equals_simulated_workers(
    method, num_workers, local_gradients
):
  """shard_map over 8 devices (1, 2 or a subset of workers per device; two
  per device with their gradients vmapped or unrolled) gives the vmap
  simulation's trajectory."""

  def factory(axis_name):
    if method == 'sgd':
      return defjax.data_parallel(momentum_sgd(), axis_name=axis_name)
    return defjax.error_feedback(
        momentum_sgd(), defjax.rbgs(8), lam=0.3, axis_name=axis_name
    )

  layout, tx, params, state, step, xs, ys = _setup(
      factory, num_workers, local_gradients=local_gradients
  )
  for t in range(xs.shape[0]):
    batch = jax.device_put((xs[t], ys[t]), layout.per_worker)
    params, _, state, loss = step(params, {}, state, batch)
  assert step._cache_size() == 1  # no recompilation from step to step
  x_ref, states_ref, _ = run_workers(factory('w'), mlp_params(), xs, ys)
  assert_trees_close(params, x_ref, rtol=1e-5, atol=1e-6)
  assert_trees_close(state, states_ref, rtol=1e-5, atol=1e-6)
  assert np.isfinite(float(loss))


def test_state_type_and_sharding_unchanged_by_step():
  layout, tx, params, state, step, xs, ys = _setup(
      lambda a: defjax.error_feedback(
          momentum_sgd(), defjax.rbgs(8), lam=0.3, axis_name=a
      ),
      8,
  )
  types = jax.tree.map(jax.typeof, state)
  shardings = jax.tree.map(lambda a: a.sharding, state)
  params_sharding = jax.tree.map(lambda a: a.sharding, params)
  for t in range(2):
    params, _, state, _ = step(
        params, {}, state, jax.device_put((xs[t], ys[t]), layout.per_worker)
    )
  assert jax.tree.map(jax.typeof, state) == types
  assert jax.tree.map(lambda a: a.sharding, state) == shardings
  assert jax.tree.map(lambda a: a.sharding, params) == params_sharding
  assert all(s.spec == P('data') for s in jax.tree.leaves(shardings))


def test_model_state_is_synced_or_per_worker():
  """Batch-norm-like model state: averaged over workers, or kept per worker."""

  def loss(params, model_state, batch):
    x, y = batch
    return mlp_loss(params, batch), {'mean': x.mean()}

  for sync, k, local_gradients in (
      (True, 8, 'vmap'),
      (False, 8, 'vmap'),
      (True, 16, 'unroll'),
      (False, 16, 'unroll'),
  ):
    layout = data_parallel.make_layout(k, local_gradients=local_gradients)
    tx = defjax.data_parallel(optax.sgd(0.1), axis_name=layout.axis_name)
    params = jax.device_put(mlp_params(), layout.replicated)
    state = layout.init_state(tx, params)
    step = layout.train_step(loss, tx, sync_model_state=sync, donate=False)
    xs, ys = batches(1, workers=k)
    ms = {'mean': jnp.zeros(())} if sync else {'mean': jnp.zeros(k)}
    ms = jax.device_put(ms, layout.replicated if sync else layout.per_worker)
    _, ms, _, _ = step(
        params, ms, state, jax.device_put((xs[0], ys[0]), layout.per_worker)
    )
    per_worker = np.asarray(xs[0]).reshape(k, -1).mean(1)
    if sync:
      np.testing.assert_allclose(
          float(ms['mean']), per_worker.mean(), rtol=1e-5
      )
    else:
      np.testing.assert_allclose(
          np.asarray(ms['mean']), per_worker, rtol=1e-4, atol=1e-7
      )


def test_averaged_params_of_stacked_state():
  layout, tx, params, state, step, xs, ys = _setup(
      lambda a: defjax.error_feedback(
          momentum_sgd(), defjax.rbgs(8), lam=0.3, axis_name=a
      ),
      8,
  )
  for t in range(3):
    params, _, state, _ = step(
        params, {}, state, jax.device_put((xs[t], ys[t]), layout.per_worker)
    )
  y = layout.averaged_params()(params, state)
  # On the host: eager means of per-worker arrays are multi-device programs,
  # which may deadlock XLA:CPU when several are in flight (issue #12).
  expected = jax.tree.map(
      lambda p, e: np.asarray(p) - np.asarray(e).mean(0), params, state.error
  )
  assert_trees_close(y, expected, rtol=1e-6, atol=1e-7)


def test_layout():
  assert data_parallel.make_layout(8).workers_per_device == 1
  assert data_parallel.make_layout(16).workers_per_device == 2
  assert data_parallel.make_layout(16).axis_name == ('data', 'local')
  assert data_parallel.make_layout(3).num_devices == 3
  assert data_parallel.make_layout(16).worker_rows(0) == slice(0, 16)
  with pytest.raises(ValueError, match='divisible'):
    data_parallel.make_layout(12)
  with pytest.raises(ValueError, match='positive'):
    data_parallel.make_layout(0)


def test_transform_runs_unchanged_under_pmap():
  """The same per-worker transform under jax.pmap (8 CPU devices)."""
  tx = defjax.error_feedback(
      momentum_sgd(), defjax.rbgs(8), lam=0.3, axis_name='w'
  )
  params = mlp_params()
  xs, ys = batches(3)

  def worker_step(params, state, x, y):
    grads = jax.grad(mlp_loss)(defjax.eval_point(params, state), (x, y))
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.pmap(worker_step, axis_name='w', in_axes=(None, 0, 0, 0))
  states = jax.tree.map(lambda x: jnp.stack([x] * 8), tx.init(params))
  p = params
  for t in range(3):
    new_p, states = step(p, states, xs[t], ys[t])
    for k in range(1, 8):  # every device computed the same replicated params
      assert_trees_close(
          jax.tree.map(lambda a: a[k], new_p),
          jax.tree.map(lambda a: a[0], new_p),
          rtol=0,
          atol=0,
      )
    p = jax.tree.map(lambda a: a[0], new_p)
  x_ref, _, _ = run_workers(tx, params, xs, ys)
  assert_trees_close(p, x_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('num_workers', [8, 16])
@pytest.mark.parametrize('method', ['def', 'psync', 'sgd'])
def test_multi_step_is_bitwise_n_single_steps(num_workers, method):
  """n steps in one lax.scan dispatch: the same bits as n dispatches of one
  step (params, every worker's state, each step's loss), with 1 or 2 workers
  per device, and any n from one function."""

  def factory(axis_name):
    if method == 'sgd':
      return defjax.data_parallel(momentum_sgd(), axis_name=axis_name)
    if method == 'psync':
      return defjax.psync(
          momentum_sgd(), defjax.rbgs(8, per_leaf=True), axis_name=axis_name
      )
    return defjax.error_feedback(
        momentum_sgd(), defjax.rbgs(8), lam=0.3, axis_name=axis_name
    )

  layout, tx, params, state, step, xs, ys = _setup(
      factory, num_workers, steps=5
  )
  multi = layout.train_step(_loss, tx, donate=False, multi_step=True)
  p1, s1, losses = params, state, []
  for t in range(5):
    p1, _, s1, loss = step(
        p1, {}, s1, jax.device_put((xs[t], ys[t]), layout.per_worker)
    )
    losses.append(loss)
  pn, sn = params, state
  chunks = []
  for lo, hi in ((0, 3), (3, 5)):  # two chunk lengths, as at an eval boundary
    batch = jax.device_put((xs[lo:hi], ys[lo:hi]), layout.per_step_and_worker)
    pn, _, sn, loss = multi(pn, {}, sn, batch)
    assert loss.shape == (hi - lo,)
    chunks.append(loss)
  assert_trees_close(pn, p1, rtol=0, atol=0)
  assert_trees_close(sn, s1, rtol=0, atol=0)
  np.testing.assert_array_equal(np.concatenate(chunks), np.stack(losses))
  assert jax.tree.map(lambda a: a.sharding, sn) == jax.tree.map(
      lambda a: a.sharding, s1
  )


def test_multi_step_all_reduces_only_the_block():
  """Inside the scan each step still all-reduces b values, never d."""
  layout = data_parallel.make_layout(8)
  tx = defjax.error_feedback(
      momentum_sgd(),
      defjax.rbgs(256, per_leaf=True),
      lam=0.3,
      axis_name=layout.axis_name,
  )
  params = jax.device_put(_big_params(), layout.replicated)
  state = layout.init_state(tx, params)
  multi = layout.train_step(_loss, tx, donate=False, multi_step=True)
  x = jnp.zeros((4, 8, 4, 64))
  y = jnp.zeros((4, 8, 4), jnp.int32)
  compiled = multi.lower(
      params, {}, state, jax.device_put((x, y), layout.per_step_and_worker)
  ).compile()
  sizes = sorted(
      math.prod(s) for c in wire.collectives(compiled) for _, s in c.shapes
  )
  b = sum(max(1, x.size // 256) for x in jax.tree.leaves(params))
  assert sizes[-1] == b and all(s <= 1 for s in sizes[:-1]), sizes
