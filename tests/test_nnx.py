"""docs/guides/nnx.md: its code runs as written, trains the numbers the linen
path trains from the same weights, and resumes from its checkpoint exactly."""

import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import defjax
from helpers import assert_trees_close

STEPS = 5


@pytest.fixture(scope='module')
def guide():
  """The namespace the guide's code blocks leave, run in order (the run
  test_docs checks, made once per test process)."""
  from test_docs import run_page

  return run_page('docs/guides/nnx.md')


def trees_equal(a, b):
  """Same structure and the same bits in every leaf."""
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(x, y)
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def nnx_params(module):
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def train(ns, step, params, steps=STEPS):
  """``steps`` steps of a guide-shaped step from ``params`` and fresh worker
  state on the guide's data; returns x, the per-worker state and y."""
  params = jax.device_put(params, ns['replicated'])
  opt_state = jax.jit(ns['init_workers'], out_shardings=ns['per_worker'])(
      params
  )
  for t in range(steps):
    params, opt_state, loss = step(
        params, opt_state, jax.device_put(ns['batch_at'](t), ns['per_worker'])
    )
    float(loss)  # one multi-device program at a time (XLA:CPU)
  # Waited for: XLA:CPU can deadlock on two independent collective programs.
  return jax.block_until_ready(
      (params, opt_state, ns['average'](params, opt_state))
  )


def all_reduce_shapes(compiled_text):
  """The result shapes of every all-reduce in compiled HLO, e.g. [[(43,), ()]]."""
  found = []
  for line in compiled_text.splitlines():
    m = re.search(r'= \(?([^=]*?)\)? all-reduce(?:-start)?\(', line)
    if m:
      found.append(
          [
              tuple(int(d) for d in dims.split(',') if d)
              for dims in re.findall(r'\w+\[([\d,]*)\]', m.group(1))
          ]
      )
  return found


# ------------------------------------------------------------ the guide runs


def test_guide_trains_and_merges_back(guide):
  ns = guide
  losses = ns['losses']
  assert len(losses) == 20 and all(map(math.isfinite, losses))
  assert losses[-1] < 0.75 * losses[0]
  assert ns['accuracy'](ns['def_model']) > 0.5  # 4 classes: chance is 0.25

  params, opt_state, K = ns['params'], ns['opt_state'], ns['K']
  for x in jax.tree.leaves(params):
    assert x.sharding.is_equivalent_to(ns['replicated'], x.ndim)
  for leaf in jax.tree.leaves(opt_state):
    assert leaf.shape[0] == K
    assert leaf.sharding.is_equivalent_to(ns['per_worker'], leaf.ndim)

  # nnx.update wrote the trained x into the module (and it is not the init).
  assert trees_equal(nnx_params(ns['model']), params)
  assert not trees_equal(nnx_params(ns['MLP'](rngs=nnx.Rngs(0))), params)

  # DEF's output y = x - mean_k e_k, and the error is not zero.
  y = ns['average'](params, opt_state)
  error = opt_state.error
  assert_trees_close(
      y, jax.tree.map(lambda x, e: x - np.mean(e, 0), params, error)
  )
  assert not trees_equal(y, params)


def test_guide_step_all_reduces_only_the_block(guide):
  """One all-reduce: the b values of RBGS's block and the scalar loss."""
  ns = guide
  params = ns['params']
  d = sum(x.size for x in jax.tree.leaves(params))
  b = -(-d // 16)  # rbgs(16), one global block
  batch = jax.device_put(ns['batch_at'](0), ns['per_worker'])
  text = (
      ns['train_step'].lower(params, ns['opt_state'], batch).compile().as_text()
  )
  assert all_reduce_shapes(text) == [[(b,), ()]]
  # The parser sees a full all-reduce where there is one: the data-parallel
  # step all-reduces every gradient value.
  dp = jax.jit(
      jax.shard_map(
          _data_parallel_worker(ns),
          mesh=ns['mesh'],
          in_specs=(P(), P(), P('data')),
          out_specs=(P(), P(), P()),
          check_vma=False,
      )
  )
  dp_state = ns['dp_optimizer'].tx.init(params)
  shapes = all_reduce_shapes(
      dp.lower(params, dp_state, batch).compile().as_text()
  )
  assert sum(math.prod(s) for shapes_ in shapes for s in shapes_) == d + 1


def _data_parallel_worker(ns):
  tx = ns['dp_optimizer'].tx

  def worker(params, state, batch):
    batch = jax.tree.map(lambda a: a[0], batch)
    loss, grads = jax.value_and_grad(ns['loss_fn'])(params, batch)
    updates, state = tx.update(grads, state, params)
    return (
        optax.apply_updates(params, updates),
        state,
        jax.lax.pmean(loss, 'data'),
    )

  return worker


def test_nnx_optimizer_single_worker_is_plain_optax(guide):
  """The guide's K = 1 nnx.Optimizer step trains what tx.update trains with
  the gradient at eval_point: bitwise, it is the same computation."""
  ns = guide
  tx = ns['optimizer'].tx

  def reference(at_eval_point):
    @jax.jit
    def step(params, state, batch):
      point = defjax.eval_point(params, state) if at_eval_point else params
      grads = jax.grad(ns['loss_fn'])(point, batch)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    params = nnx_params(ns['MLP'](rngs=nnx.Rngs(0)))
    state = tx.init(params)
    for t in range(5):
      x, y = ns['batch_at'](t)
      params, state = step(params, state, (x[0], y[0]))
    return params, state

  params, state = reference(at_eval_point=True)
  assert trees_equal(nnx_params(ns['single']), params)
  got_state = nnx.as_pure(ns['optimizer'].opt_state)
  assert all(
      np.array_equal(a, b)
      for a, b in zip(
          jax.tree.leaves(got_state), jax.tree.leaves(state), strict=True
      )
  )
  # DEF's output as the guide reads it: x - e.
  x_params = nnx.as_pure(nnx.state(ns['single'], nnx.Param))
  y = defjax.averaged_params(x_params, got_state)
  assert trees_equal(
      nnx.to_pure_dict(y), jax.tree.map(lambda x, e: x - e, params, state.error)
  )
  assert not trees_equal(nnx.to_pure_dict(y), params)
  # The eval point matters: the gradient at x trains other numbers.
  assert not trees_equal(
      nnx_params(ns['single']), reference(at_eval_point=False)[0]
  )


def test_nnx_optimizer_data_parallel_is_plain_optax(guide):
  """The guide's nnx.Optimizer under nnx.shard_map trains what the same
  transform trains through jax.shard_map on plain pytrees (bitwise)."""
  ns = guide
  step = jax.jit(
      jax.shard_map(
          _data_parallel_worker(ns),
          mesh=ns['mesh'],
          in_specs=(P(), P(), P('data')),
          out_specs=(P(), P(), P()),
          check_vma=False,
      )
  )
  params = jax.device_put(
      nnx_params(ns['MLP'](rngs=nnx.Rngs(0))), ns['replicated']
  )
  state = jax.device_put(ns['dp_optimizer'].tx.init(params), ns['replicated'])
  for t in range(5):
    params, state, loss = step(
        params, state, jax.device_put(ns['batch_at'](t), ns['per_worker'])
    )
    float(loss)
  assert trees_equal(nnx_params(ns['dp_model']), params)
  assert not trees_equal(nnx_params(ns['MLP'](rngs=nnx.Rngs(0))), params)


# ------------------------------------------------- the same numbers as linen


class LinenMLP(nn.Module):
  """The guide's MLP in linen; its params have the layout of nnx.to_pure_dict's."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name='out')(nn.relu(nn.Dense(32, name='hidden')(x)))


def linen_loss(params, batch):
  x, y = batch
  logits = LinenMLP().apply({'params': params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def linen_step(ns):
  """The guide's step, with the linen model's loss in place of the NNX one."""
  tx = ns['tx']

  def worker_step(params, opt_state, batch):
    opt_state, batch = jax.tree.map(lambda a: a[0], (opt_state, batch))
    point = defjax.eval_point(params, opt_state)
    loss, grads = jax.value_and_grad(linen_loss)(point, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    opt_state = jax.tree.map(lambda a: a[None], opt_state)
    return params, opt_state, jax.lax.pmean(loss, 'data')

  return jax.jit(
      jax.shard_map(
          worker_step,
          mesh=ns['mesh'],
          in_specs=(P(), P('data'), P('data')),
          out_specs=(P(), P('data'), P()),
          check_vma=False,
      )
  )


def library_linen_run(ns, params):
  """The README's linen path: the 1-D layout's state, step and output model."""
  from defjax.layouts import data_parallel  # pylint: disable=g-import-not-at-top

  layout = data_parallel.make_layout(num_workers=ns['K'])
  assert (
      layout.axis_name == 'data'
  )  # so the guide's tx is this layout's transform
  step = layout.train_step(
      lambda p, ms, batch: (linen_loss(p, batch), ms), ns['tx'], donate=False
  )
  params = jax.device_put(params, layout.replicated)
  opt_state = layout.init_state(ns['tx'], params)
  for t in range(STEPS):
    params, _, opt_state, loss = step(
        params,
        {},
        opt_state,
        jax.device_put(ns['batch_at'](t), layout.per_worker),
    )
    float(loss)
  return jax.block_until_ready(
      (params, opt_state, layout.averaged_params()(params, opt_state))
  )


def test_same_numbers_as_linen(guide):
  """From the same initial weights, the NNX step and the linen step give the
  same x, errors, momenta and y, bit for bit: they lower to the same program
  (asserted below), since nnx.Linear and nn.Dense emit the same operations
  and split/merge leave no trace in it."""
  ns = guide
  nnx_init = nnx_params(ns['MLP'](rngs=nnx.Rngs(0)))
  linen_init = LinenMLP().init(jax.random.key(0), jnp.zeros((1, 16)))['params']
  copied = jax.tree.map(
      lambda _, w: np.array(w), linen_init, nnx_init
  )  # NNX's weights

  step = linen_step(ns)
  nnx_run = train(ns, ns['train_step'], nnx_init)
  linen_run = train(ns, step, copied)
  assert trees_equal(nnx_run[0], linen_run[0])  # x
  assert trees_equal(nnx_run[1].error, linen_run[1].error)  # e_k
  assert trees_equal(nnx_run[1], linen_run[1])  # all per-worker state
  assert trees_equal(nnx_run[2], linen_run[2])  # y
  assert not trees_equal(
      nnx_run[1].error, jax.tree.map(jnp.zeros_like, nnx_run[1].error)
  )

  batch = jax.device_put(ns['batch_at'](0), ns['per_worker'])
  lower = lambda step, p: step.lower(p, nnx_run[1], batch).as_text(
      debug_info=False
  )
  assert lower(ns['train_step'], nnx_init) == lower(step, copied)

  # The comparison can fail: linen's own initial weights train other numbers.
  other = train(ns, step, linen_init)
  assert not trees_equal(other[0], nnx_run[0])
  assert not trees_equal(other[1].error, nnx_run[1].error)

  # The README's linen path (defjax.layouts.data_parallel's train_step) gives the same
  # numbers too. Asserted to float tolerance only: its step runs the
  # transform under a vmap over each device's workers, another program,
  # which the library documents as agreeing to float rounding (on this MLP
  # it is bitwise today).
  library_run = library_linen_run(ns, copied)
  assert_trees_close(library_run, nnx_run, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------- resume


def test_checkpoint_resume_is_exact(guide):
  """The guide restores after 20 steps and ends 3 steps later on the bits of
  the uninterrupted run, with the per-worker state on its devices."""
  ns = guide
  assert ns['start'] == ns['saved_at'] == 20
  assert not os.path.exists(ns['ckpt_dir'])  # the guide cleans up
  restored = ns['restored']
  for x in jax.tree.leaves(restored['params']):
    assert x.sharding.is_equivalent_to(ns['replicated'], x.ndim)
  for leaf in jax.tree.leaves(restored['opt_state']):
    assert leaf.shape[0] == ns['K']
    assert leaf.sharding.is_equivalent_to(ns['per_worker'], leaf.ndim)
  assert trees_equal(ns['resumed'], ns['uninterrupted'])

  # The comparison can fail: resuming x alone, with the workers' errors and
  # momenta reset, ends elsewhere.
  params = restored['params']
  opt_state = jax.jit(ns['init_workers'], out_shardings=ns['per_worker'])(
      params
  )
  for t in range(ns['start'], ns['saved_at'] + 3):
    params, opt_state, loss = ns['train_step'](
        params, opt_state, jax.device_put(ns['batch_at'](t), ns['per_worker'])
    )
    float(loss)
  assert not trees_equal(params, ns['uninterrupted'][0])
