"""Compressors: linearity, block selection, coverage, comparison compressors."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import defjax
from defjax import compress as compress_lib
from defjax.layouts import sharded
from helpers import K, assert_trees_close, mlp_params

# Per-shard RBGS (one block per local shard) on one worker of M model devices:
# mlp_params' layers split Megatron-style, its last bias whole on every device.
SHARD_SPECS = {
    'layer0': {'w': P(None, 'model'), 'b': P('model')},
    'layer1': {'w': P('model', None), 'b': P()},
}


def _per_shard(ratio, key, specs=SHARD_SPECS, model_axis_size=4):
  mesh = sharded.make_layout(1, model_axis_size).mesh
  return compress_lib.per_shard_rbgs(ratio, specs, mesh, key=key)


def _tree(seed, params=None):
  params = mlp_params() if params is None else params
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return treedef.unflatten(
      [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  )


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _state_at(compressor, params, step):
  state = compressor.init(params)
  return state._replace(count=jnp.asarray(step, jnp.int32))


LINEAR = {
    'rbgs': lambda: defjax.rbgs(7, key=3),
    'rbgs_per_leaf': lambda: defjax.rbgs(7, key=3, per_leaf=True),
    'rbgs_per_shard': lambda: _per_shard(7, key=3),
    'randomk': lambda: defjax.randomk(7, key=3),
    'scaled': lambda: defjax.scaled(0.25),
    'identity': defjax.identity,
}


@pytest.mark.parametrize('name', LINEAR)
def test_linear_and_shared(name):
  """C(a) + C(b) = C(a + b), and mean_k C(p_k) = C(mean_k p_k) (identity 4)."""
  c = LINEAR[name]()
  params = mlp_params()
  state = c.init(params)
  a, b = _tree(1), _tree(2)
  compress = jax.jit(c.compress)
  assert_trees_close(
      jax.tree.map(jnp.add, compress(a, state), compress(b, state)),
      compress(jax.tree.map(jnp.add, a, b), state),
  )
  ps = jax.tree.map(
      lambda *xs: jnp.stack(xs), *[_tree(10 + k) for k in range(K)]
  )
  # Jitted: per-shard RBGS's nested shard_map needs its mesh's devices.
  mean_c, residual, new_state = jax.jit(
      jax.vmap(
          lambda p, s: c.aggregate(p, s, 'w'), in_axes=(0, None), axis_name='w'
      )
  )(ps, state)
  mean_p = jax.tree.map(lambda x: x.mean(0), ps)
  for k in range(K):
    assert_trees_close(
        jax.tree.map(lambda x: x[k], mean_c), compress(mean_p, state)
    )
    p_k = jax.tree.map(lambda x: x[k], ps)
    # residual = p_k - C(p_k)
    assert_trees_close(
        jax.tree.map(lambda x: x[k], residual),
        jax.tree.map(jnp.subtract, p_k, compress(p_k, state)),
    )


def test_rbgs_first_step_block_values():
  """The kept values are exactly the circular block at the shared start."""
  ratio, seed = 10, 5
  c = defjax.rbgs(ratio, key=seed)
  params = mlp_params()
  d = _flat(params).size
  b = math.ceil(d / ratio)
  for step in (0, 1, 17):
    state = _state_at(c, params, step)
    start = int(
        jax.random.randint(
            jax.random.fold_in(jax.random.PRNGKey(seed), step),
            (),
            0,
            d,
            dtype=jnp.int32,
        )
    )
    expected_idx = (start + np.arange(b)) % d
    a = _tree(step)
    flat = _flat(a)
    kept = _flat(c.compress(a, state))
    expected = np.zeros(d, np.float32)
    expected[expected_idx] = flat[expected_idx]
    np.testing.assert_array_equal(kept, expected)
  assert c.payload(params) == b


def test_rbgs_block_wraps_around():
  """A block starting near the end continues at index 0 (no clamping)."""
  d, ratio = 20, 4  # b = 5
  c = defjax.rbgs(ratio, key=0)
  params = {'v': jnp.zeros(d)}
  for step in range(200):
    state = _state_at(c, params, step)
    kept = np.asarray(c.compress({'v': jnp.arange(1.0, d + 1)}, state)['v'])
    nz = np.flatnonzero(kept)
    assert nz.size == 5
    start = int(
        jax.random.randint(
            jax.random.fold_in(jax.random.PRNGKey(0), step),
            (),
            0,
            d,
            dtype=jnp.int32,
        )
    )
    if start > d - 5:
      assert 0 in nz and d - 1 in nz  # the block wrapped
      return
  pytest.fail('no wrapping block in 200 steps')


@pytest.mark.parametrize('blocks', ['global', 'per_leaf', 'per_shard'])
def test_uniform_coverage(blocks):
  """Every coordinate, first and last included, is kept with frequency b/d.

  For each coordinate the indicator over T independent steps is Bernoulli(p)
  with p = b/d (circular blocks). Hoeffding plus a union bound over the d
  coordinates: P(any |freq - p| > eps) <= 2 d exp(-2 T eps^2) = 1e-6 for the
  eps below. A clamped (non-circular) block would keep coordinate 0 with
  probability 1/d, far outside the bound.
  """
  params = {'a': jnp.zeros((6, 5)), 'b': jnp.zeros(20)}  # d = 50
  ratio, T = 5, 4000
  if blocks == 'per_shard':  # 2 model devices: 15 and 10 values each
    c = _per_shard(
        ratio, 11, {'a': P('model', None), 'b': P('model')}, model_axis_size=2
    )
  else:
    c = defjax.rbgs(ratio, key=11, per_leaf=blocks == 'per_leaf')
  state = c.init(params)
  ones = jax.tree.map(jnp.ones_like, params)

  @jax.jit
  def counts():
    def kept(t):
      return c.compress(ones, state._replace(count=t.astype(jnp.int32)))

    return jax.tree.map(lambda x: x.sum(0), jax.lax.map(kept, jnp.arange(T)))

  freq = jax.tree.map(lambda x: np.ravel(x) / T, counts())
  if blocks == 'per_shard':
    p = {'a': (15 // ratio) / 15, 'b': (10 // ratio) / 10}
  elif blocks == 'per_leaf':
    p = {'a': (30 // ratio) / 30, 'b': (20 // ratio) / 20}
  else:
    p = {'a': 10 / 50, 'b': 10 / 50}
  eps = math.sqrt(math.log(2 * 50 / 1e-6) / (2 * T))
  for name in params:
    f = freq[name]
    assert np.all(np.abs(f - p[name]) <= eps), (name, f.min(), f.max(), p[name])
  np.testing.assert_array_less(np.abs(_flat(freq)[[0, -1]] - p['a']), eps)


@pytest.mark.parametrize('name', ['rbgs', 'rbgs_per_shard'])
def test_all_workers_select_the_same_block(name):
  """Identity 6: the block depends on the shared seed and step, not the worker."""
  params = mlp_params()
  if name == 'rbgs':
    c = defjax.rbgs(16, key=2)
    kept = c.payload(params)
  else:  # each of the 4 model devices keeps a block of its shard of a sharded leaf
    c = _per_shard(16, key=2)
    specs = jax.tree.leaves(SHARD_SPECS, is_leaf=lambda s: isinstance(s, P))
    kept = sum(
        max(1, (x.size // (4 if 'model' in s else 1)) // 16)
        * (4 if 'model' in s else 1)
        for x, s in zip(jax.tree.leaves(params), specs)
    )
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  # Every worker initialises and carries its own state, from its own values:
  # nothing but the seed and the step count may decide the block.
  states = stack([c.init(_tree(200 + k)) for k in range(K)])
  aggregate = jax.jit(
      jax.vmap(lambda p, s: c.aggregate(p, s, 'w'), axis_name='w')
  )
  seen = []
  for t in range(3):
    ps = stack([_tree(100 + 10 * t + k) for k in range(K)])
    _, residual, states = aggregate(ps, states)
    zeroed = np.stack(
        [_flat(jax.tree.map(lambda x: x[k], residual)) == 0 for k in range(K)]
    )
    assert zeroed[0].sum() == kept
    assert (zeroed == zeroed[0]).all()
    seen.append(zeroed[0])
  assert not np.array_equal(
      seen[0], seen[1]
  )  # and the block moves from step to step


def test_per_leaf_blocks():
  """Per-leaf RBGS: max(1, floor(n/ratio)) circular values in every leaf."""
  params = mlp_params()
  ratio = 8
  c = defjax.rbgs(ratio, per_leaf=True)
  sizes = [x.size for x in jax.tree.leaves(params)]
  expected = [max(1, n // ratio) for n in sizes]
  assert compress_lib.per_leaf_block_sizes(params, ratio) == expected
  assert c.payload(params) == sum(expected)
  state = c.init(params)
  a = jax.tree.map(lambda x: x + 1.0, _tree(3))  # no zeros
  kept = c.compress(a, state)
  for leaf, n_kept in zip(jax.tree.leaves(kept), expected):
    nz = np.flatnonzero(np.ravel(leaf))
    assert nz.size == n_kept
    n = leaf.size
    # contiguous modulo n: consecutive gaps are 1 except at most one wrap
    gaps = np.diff(np.sort(nz))
    assert (gaps != 1).sum() <= 1
    if (gaps != 1).sum() == 1:
      assert nz.min() == 0 and nz.max() == n - 1


def test_topk_keeps_largest_and_aggregates():
  c = defjax.topk(10)
  params = mlp_params()
  d = _flat(params).size
  b = math.ceil(d / 10)
  state = c.init(params)
  a = _tree(4)
  kept = _flat(c.compress(a, state))
  flat = _flat(a)
  assert np.count_nonzero(kept) == b
  threshold = np.sort(np.abs(flat))[-b]
  assert np.all(np.abs(flat[kept != 0]) >= threshold)
  ps = jax.tree.map(
      lambda *xs: jnp.stack(xs), *[_tree(20 + k) for k in range(K)]
  )
  mean_c, residual, _ = jax.vmap(
      c.aggregate, in_axes=(0, None, None), axis_name='w'
  )(ps, state, 'w')
  expected = np.mean(
      [
          _flat(c.compress(jax.tree.map(lambda x: x[k], ps), state))
          for k in range(K)
      ],
      0,
  )
  np.testing.assert_allclose(
      _flat(jax.tree.map(lambda x: x[0], mean_c)),
      expected,
      rtol=1e-5,
      atol=1e-7,
  )
  for k in range(K):
    p_k = jax.tree.map(lambda x: x[k], ps)
    np.testing.assert_allclose(
        _flat(jax.tree.map(lambda x: x[k], residual)),
        _flat(p_k) - _flat(c.compress(p_k, state)),
        atol=1e-7,
    )
  assert c.payload(params) == 2 * b


def test_randomk_selects_shared_random_coordinates():
  c = defjax.randomk(4, key=9)
  params = {'v': jnp.zeros(400)}
  kept0 = np.asarray(
      c.compress({'v': jnp.ones(400)}, _state_at(c, params, 0))['v']
  )
  kept1 = np.asarray(
      c.compress({'v': jnp.ones(400)}, _state_at(c, params, 1))['v']
  )
  # with replacement: at most b, about b (1 - b / 2d) distinct coordinates
  assert 70 <= kept0.sum() <= 100
  assert not np.array_equal(kept0, kept1)
  # not a block: more than a few runs of consecutive indices
  assert np.count_nonzero(np.diff(kept0)) > 20


@pytest.mark.parametrize(
    'factory',
    [
        lambda: defjax.rbgs(0.5),
        lambda: defjax.rbgs(0),
        lambda: defjax.rbgs(-3),
        lambda: defjax.rbgs(float('nan')),
        lambda: defjax.rbgs('256'),
        lambda: defjax.rbgs(True),
        lambda: defjax.randomk(0.9),
        lambda: defjax.topk(0),
        lambda: defjax.scaled(0),
        lambda: defjax.scaled(1.5),
    ],
)
def test_bad_compressor_arguments(factory):
  with pytest.raises(ValueError):
    factory()


def test_ratio_accepts_numpy_and_0d_array_scalars():
  for ratio in (np.float32(16), np.int64(16), np.array(16.0), jnp.array(16)):
    assert defjax.rbgs(ratio).payload({'w': jnp.zeros(64)}) == 4
  with pytest.raises(ValueError, match='ratio must be a number'):
    defjax.rbgs(np.array([16.0]))


@pytest.mark.parametrize('name', LINEAR)
def test_non_float_leaves_rejected(name):
  with pytest.raises(ValueError, match='step'):
    LINEAR[name]().init({'w': jnp.zeros(3), 'step': jnp.zeros((), jnp.int32)})


def test_dense_warmup_then_blocks():
  """dense_warmup: C = identity for the first steps (nothing left behind),
  then the wrapped compressor, continuing its own step count."""
  params = mlp_params()
  c = defjax.dense_warmup(defjax.rbgs(10, key=1), 2)
  plain = defjax.rbgs(10, key=1)
  state = c.init(params)
  ps = jax.tree.map(
      lambda *xs: jnp.stack(xs), *[_tree(40 + k) for k in range(K)]
  )
  agg = jax.jit(
      jax.vmap(c.aggregate, in_axes=(0, None, None), axis_name='w'),
      static_argnums=2,
  )
  mean_p = _flat(jax.tree.map(lambda x: x.mean(0), ps))
  for step in range(4):
    mean_c, residual, states = agg(ps, state, 'w')
    got = _flat(jax.tree.map(lambda x: x[0], mean_c))
    if step < 2:
      np.testing.assert_allclose(got, mean_p, rtol=1e-5, atol=1e-7)
      assert not np.any(_flat(residual))
    else:
      expected = _flat(
          plain.compress(
              jax.tree.map(lambda x: x.mean(0), ps),
              _state_at(plain, params, step - 2),
          )
      )
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
      assert np.count_nonzero(got) == plain.payload(params)
    state = jax.tree.map(lambda x: x[0], states)
  with pytest.raises(ValueError, match='steps'):
    defjax.dense_warmup(defjax.rbgs(4), -1)


# ------------------------------------------------------------ keys and state


@pytest.mark.parametrize('per_leaf', [False, True])
def test_every_key_form_gives_the_int_seeds_blocks(per_leaf):
  """An int seed s, PRNGKey(s) and jax.random.key(s) select the same blocks, bit for bit: the state holds PRNGKey(s) in every case,
  the key the committed runs drew their blocks from."""
  params = mlp_params()
  a = _tree(5)
  for s in (0, 7):
    forms = {
        'int': defjax.rbgs(9, key=s, per_leaf=per_leaf),
        'numpy int': defjax.rbgs(9, key=np.int64(s), per_leaf=per_leaf),
        'raw key': defjax.rbgs(9, key=jax.random.PRNGKey(s), per_leaf=per_leaf),
        'typed key': defjax.rbgs(9, key=jax.random.key(s), per_leaf=per_leaf),
    }
    if s == 0:
      forms['default'] = defjax.rbgs(9, per_leaf=per_leaf)
    expected = None
    for name, c in forms.items():
      state = c.init(params)
      np.testing.assert_array_equal(
          state.key, jax.random.PRNGKey(s), err_msg=name
      )
      assert jax.typeof(state.key) == jax.typeof(jax.random.PRNGKey(s)), name
      kept = [_flat(c.compress(a, _state_at(c, params, t))) for t in range(20)]
      if expected is None:
        expected = kept
      for t, (got, want) in enumerate(zip(kept, expected)):
        np.testing.assert_array_equal(got, want, err_msg=f'{name}, step {t}')


def test_randomk_key_forms_agree():
  params = {'v': jnp.zeros(300)}
  ones = {'v': jnp.ones(300)}
  kept = [
      np.asarray(c.compress(ones, _state_at(c, params, 3))['v'])
      for c in (
          defjax.randomk(4, key=2),
          defjax.randomk(4, key=jax.random.key(2)),
          defjax.randomk(4, key=jax.random.PRNGKey(2)),
      )
  ]
  np.testing.assert_array_equal(kept[0], kept[1])
  np.testing.assert_array_equal(kept[0], kept[2])


@pytest.mark.parametrize(
    'factory',
    [
        lambda: defjax.rbgs(4, key=True),
        lambda: defjax.rbgs(4, key=1.5),
        lambda: defjax.rbgs(4, key='0'),
        lambda: defjax.rbgs(4, key=jnp.zeros(3, jnp.uint32)),
        lambda: defjax.rbgs(4, key=jnp.zeros(2, jnp.int32)),
        lambda: defjax.rbgs(4, key=jax.random.split(jax.random.key(0), 2)),
        lambda: defjax.rbgs(4, key=jax.random.key(0, impl='rbg')),
        lambda: defjax.rbgs(4, key=None),
        lambda: defjax.randomk(4, key=None),
    ],
)
def test_bad_keys(factory):
  with pytest.raises(ValueError, match='key'):
    factory()


def test_as_key_is_the_raw_key_of_every_form():
  """compress.as_key, what a compressor's init (also sharded.rbgs's) keeps."""
  from defjax import compress

  for key in (7, np.int64(7), jax.random.PRNGKey(7), jax.random.key(7)):
    raw = compress.as_key(key)
    np.testing.assert_array_equal(raw, jax.random.PRNGKey(7))
    assert jax.typeof(raw) == jax.typeof(jax.random.PRNGKey(7))
    assert compress.check_key(key) is key
  with pytest.raises(ValueError, match='key'):
    compress.as_key(jnp.zeros(3, jnp.uint32))


STATEFUL = {
    # Per-shard RBGS's state comes back placed on its mesh (test_sharded
    # checks its types across steps there).
    **{k: v for k, v in LINEAR.items() if k != 'rbgs_per_shard'},
    'topk': lambda: defjax.topk(7),
    'dense_warmup': lambda: defjax.dense_warmup(defjax.rbgs(7, key=3), 1),
}


@pytest.mark.parametrize('name', STATEFUL)
def test_state_types_unchanged_by_aggregate(name):
  """jit'd aggregate keeps every state leaf's type (counters stay int32)."""
  c = STATEFUL[name]()
  params = mlp_params()
  state = c.init(params)
  types = jax.tree.map(jax.typeof, state)
  aggregate = jax.jit(c.aggregate)
  for t in range(2):
    _, _, state = aggregate(_tree(t), state)
    assert jax.tree.map(jax.typeof, state) == types


def test_step_counters_saturate():
  """optax.safe_increment: the step count stops at int32's max, never wraps."""
  top = jnp.iinfo(jnp.int32).max
  params = {'w': jnp.ones(8)}
  c = defjax.rbgs(4)
  state = c.init(params)._replace(count=jnp.asarray(top, jnp.int32))
  _, _, state = c.aggregate(params, state)
  assert state.count.dtype == jnp.int32 and int(state.count) == top
  w = defjax.dense_warmup(c, 1)
  state = w.init(params)._replace(count=jnp.asarray(top, jnp.int32))
  _, _, state = w.aggregate(params, state)
  assert state.count.dtype == jnp.int32 and int(state.count) == top


@pytest.mark.parametrize(
    'factory',
    [defjax.identity, lambda: defjax.scaled(0.5), lambda: defjax.topk(4)],
)
def test_deterministic_compressors_hold_optax_empty_state(factory):
  state = factory().init(mlp_params())
  assert isinstance(state, optax.EmptyState)
  assert jax.tree.leaves(state) == []


def test_mixed_dtype_trees():
  """Random-K and Top-K ravel a float32 + bfloat16 tree in float32 (the
  promoted dtype, jax.flatten_util's convention) and give each leaf back in
  its own dtype."""
  tree = {
      'a': jax.random.normal(jax.random.PRNGKey(0), (40,)),
      'b': jax.random.normal(jax.random.PRNGKey(1), (24,)).astype(jnp.bfloat16),
  }
  flat = np.concatenate(
      [np.asarray(tree['a']), np.asarray(tree['b'], np.float32)]
  )
  for c in (defjax.topk(8), defjax.randomk(8, key=4)):
    state = c.init(tree)
    kept = c.compress(tree, state)
    mean_c, residual, _ = jax.jit(c.aggregate)(tree, state)
    for out in (kept, mean_c, residual):
      assert jax.tree.map(lambda x: x.dtype, out) == jax.tree.map(
          lambda x: x.dtype, tree
      )
    got = np.concatenate(
        [np.asarray(kept['a']), np.asarray(kept['b'], np.float32)]
    )
    nz = np.flatnonzero(got)
    np.testing.assert_array_equal(
        got[nz], flat[nz]
    )  # bfloat16 -> float32 is exact
    assert 0 < nz.size <= 8
    assert_trees_close(mean_c, kept)
    np.testing.assert_array_equal(  # C(p) + (p - C(p)) = p exactly
        np.concatenate(
            [
                np.asarray(x, np.float32).ravel()
                for x in jax.tree.leaves(
                    jax.tree.map(jnp.add, mean_c, residual)
                )
            ]
        ),
        flat,
    )
    if isinstance(
        state, optax.EmptyState
    ):  # Top-K: the largest |values| of the tree
      np.testing.assert_array_equal(nz, np.sort(np.argsort(-np.abs(flat))[:8]))


@pytest.mark.parametrize('name', STATEFUL)
def test_payload_of_abstract_params(name):
  """payload sizes a jax.eval_shape tree as it sizes the arrays (no warning:
  jnp.size, hence optax.tree.size, deprecates ShapeDtypeStruct leaves)."""
  c = STATEFUL[name]()
  params = mlp_params()
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    assert c.payload(jax.eval_shape(lambda: params)) == c.payload(params)


@pytest.mark.parametrize('per_leaf', [False, True])
def test_rbgs_residual_is_p_off_the_block_and_positive_zero_on_it(per_leaf):
  """p - C(p) bit for bit: p itself off the block and +0.0 on it, also where
  p is -0.0 or infinite (the residual's 0 is computed from the block values)."""
  p = {
      'a': jnp.array(
          [-0.0, jnp.inf, -jnp.inf, 1.5, -2.0, 3.0, -0.0, 7.0], jnp.float32
      ),
      'b': jnp.arange(-4.0, 4.0, dtype=jnp.float32),
  }
  c = defjax.rbgs(2, key=3, per_leaf=per_leaf)
  state = c.init(p)
  block = c.compress(jax.tree.map(jnp.ones_like, p), state)  # 1 on the block
  _, residual, _ = jax.jit(c.aggregate)(p, state)
  for name in p:
    x, r = np.asarray(p[name]), np.asarray(residual[name])
    on = np.asarray(block[name]) == 1
    assert on.any() and (~on).any()
    np.testing.assert_array_equal(
        r[~on].view(np.uint32), x[~on].view(np.uint32)
    )
    assert np.all(r[on] == 0) and not np.any(np.signbit(r[on]))


@pytest.mark.parametrize('per_leaf', [False, True])
def test_error_feedback_step_does_not_copy_the_donated_error(per_leaf):
  """With either block layout, the compiled optimizer step with donated state
  writes e' into e's buffer without first copying e (XLA would copy it if
  the pass writing e' were not ordered after the block's gather)."""
  import re

  params = {'w': jnp.zeros((64, 64)), 'b': jnp.zeros((64,))}
  tx = defjax.error_feedback(
      optax.chain(
          optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9)
      ),
      defjax.rbgs(16, per_leaf=per_leaf),
      lam=0.3,
  )

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    return params, state, defjax.eval_point(params, state)

  state = tx.init(params)
  text = (
      jax.jit(step, donate_argnums=(0, 1))
      .lower(params, state, params)
      .compile()
      .as_text()
  )
  copies = re.findall(r'= f32\[([0-9,]*)\]\{[0-9,]*\} copy\(', text)
  assert not [c for c in copies if c in ('64,64', '64')], copies
