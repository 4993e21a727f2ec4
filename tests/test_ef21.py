"""EF21-SGDM (defjax.ef21) against its recursion in ALGORITHMS.md."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import defjax
from defjax import wire
from defjax.layouts import data_parallel
from helpers import K, assert_trees_close, batches, mlp_loss, mlp_params, momentum_sgd, run_workers

LR, MU, WD = 0.1, 0.9, 5e-4


def _flat(tree):
  return np.concatenate(
      [np.ravel(np.asarray(a)) for a in jax.tree.leaves(tree)]
  )


_jit_grad = jax.jit(jax.grad(mlp_loss))


def _grad(params, x, y):
  return _flat(_jit_grad(params, (x, y)))


def _block(seed, step, d, ratio):
  """RBGS's circular block at ``step`` from ALGORITHMS.md, not from the compressor."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
  start = int(jax.random.randint(key, (), 0, d, dtype=jnp.int32))
  return (start + np.arange(math.ceil(d / ratio))) % d


@pytest.mark.parametrize(
    'compressor', [lambda: defjax.rbgs(1), defjax.identity]
)
def test_ratio1_is_momentum_sgd_on_the_mean_gradient(compressor):
  """C = identity: h = mean_k v_k, so x follows momentum SGD on the mean
  gradient (with weight decay and a step schedule), to float rounding: h is
  the running sum h + mean_k (v_k - h_k), not mean_k v_k computed afresh,
  and the momentum is taken per worker before the mean, not after it."""
  schedule = optax.piecewise_constant_schedule(LR, {10: 0.3})
  params = mlp_params()
  xs, ys = batches(25)
  tx = defjax.ef21(
      schedule, compressor(), momentum=MU, weight_decay=WD, axis_name='w'
  )
  x, states, _ = run_workers(tx, params, xs, ys)
  x_sgd, _, _ = run_workers(
      defjax.data_parallel(momentum_sgd(schedule, MU, WD), axis_name='w'),
      params,
      xs,
      ys,
  )
  assert_trees_close(x, x_sgd, rtol=1e-5, atol=1e-6)
  # the same run with the schedule ignored would differ: the schedule is used
  x_const, _, _ = run_workers(
      defjax.ef21(
          LR, compressor(), momentum=MU, weight_decay=WD, axis_name='w'
      ),
      params,
      xs,
      ys,
  )
  assert max(np.abs(_flat(x_const) - _flat(x_sgd))) > 1e-4
  # nothing is left behind: every worker's estimate is its own momentum
  assert_trees_close(states.estimate, states.momentum, rtol=1e-5, atol=1e-7)
  worker = lambda tree, k: _flat(jax.tree.map(lambda a: a[k], tree))
  assert (
      np.abs(worker(states.estimate, 0) - worker(states.estimate, 1)).max()
      > 1e-3
  )


def test_state_it_keeps():
  """v_k is worker k's momentum of its own gradients at x; h is the same on
  every worker, bit for bit, and equals mean_k h_k; the counts advance. With
  RBGS each coordinate of h holds mean_k v_k from the last step its block
  came (0 before): between refreshes x keeps moving along that value, so
  EF21-SGDM applies momentum up to ~ratio steps old at every step."""
  ratio, seed, steps = 8, 3, 6
  params = mlp_params()
  xs, ys = batches(steps)
  tx = defjax.ef21(
      LR,
      defjax.rbgs(ratio, key=seed),
      momentum=MU,
      weight_decay=WD,
      axis_name='w',
  )
  _, states, path = run_workers(tx, params, xs, ys)
  assert isinstance(states, defjax.EF21State)
  d = _flat(params).size
  v = np.zeros((K, d), np.float32)
  held = np.zeros(d, np.float32)  # mean_k v_k at each coordinate's last block
  for t, x_t in enumerate([params] + path[:-1]):
    v = np.stack(
        [
            MU * v[k] + _grad(x_t, xs[t, k], ys[t, k]) + WD * _flat(x_t)
            for k in range(K)
        ]
    )
    block = _block(seed, t, d, ratio)
    held[block] = v.mean(0)[block]
  h_k = np.stack(
      [_flat(jax.tree.map(lambda a: a[k], states.estimate)) for k in range(K)]
  )
  h = np.stack(
      [
          _flat(jax.tree.map(lambda a: a[k], states.shared_estimate))
          for k in range(K)
      ]
  )
  np.testing.assert_allclose(
      np.stack(
          [
              _flat(jax.tree.map(lambda a: a[k], states.momentum))
              for k in range(K)
          ]
      ),
      v,
      rtol=1e-4,
      atol=1e-6,
  )
  assert (h == h[0]).all()  # the K copies of h are one value
  np.testing.assert_allclose(h[0], h_k.mean(0), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(h[0], held, rtol=1e-4, atol=1e-6)
  assert (held == 0).any() and (held != 0).any()  # some never refreshed
  assert not np.allclose(h_k[0], h_k[1])  # the estimates are per worker
  assert (np.asarray(states.count) == steps).all()
  assert (np.asarray(states.compressor_state.count) == steps).all()
  # x moved by -LR h at the last step
  np.testing.assert_allclose(
      _flat(path[-1]) - _flat(path[-2]), -LR * h[0], rtol=1e-4, atol=1e-6
  )
  # gradients are taken at x: the state holds no error to detach
  assert defjax.eval_point(params, tx.init(params)) is params
  assert defjax.averaged_params(params, tx.init(params)) is params


def test_no_momentum_is_ef21():
  """mu = 0 is EF21 as its paper writes it (x^{t+1} = x^t - gamma g^t, then
  g_k^{t+1} = g_k^t + C(grad f_k(x^{t+1}) - g_k^t), g^{t+1} = mean_k
  g_k^{t+1}), from g^0 = g_k^0 = 0: after T steps x is that x^{T+1}. No
  momentum is stored."""
  ratio, seed, steps = 8, 5, 12
  params = mlp_params()
  xs, ys = batches(steps)
  tx = defjax.ef21(
      LR, defjax.rbgs(ratio, key=seed), momentum=0.0, axis_name='w'
  )
  x, states, _ = run_workers(tx, params, xs, ys)
  assert states.momentum == optax.EmptyState()

  c = defjax.rbgs(ratio, key=seed)

  @jax.jit
  def paper_step(
      x, g_k, g, cstate, xs, ys
  ):  # g_k: the K workers' g_k^t, stacked
    x = jax.tree.map(lambda a, b: a - LR * b, x, g)
    grads = jax.vmap(jax.grad(mlp_loss), in_axes=(None, 0))(x, (xs, ys))
    g_k = jax.tree.map(
        lambda a, b: a + b,
        g_k,
        jax.vmap(c.compress, in_axes=(0, None))(
            jax.tree.map(lambda a, b: a - b, grads, g_k), cstate
        ),
    )
    return (
        x,
        g_k,
        jax.tree.map(lambda a: a.mean(0), g_k),
        cstate._replace(count=cstate.count + 1),
    )

  cstate = c.init(params)
  g = jax.tree.map(jnp.zeros_like, params)
  g_k, x_ref = jax.tree.map(lambda a: jnp.stack([a] * K), g), params
  for t in range(steps):
    x_ref, g_k, g, cstate = paper_step(x_ref, g_k, g, cstate, xs[t], ys[t])
  x_ref = jax.tree.map(lambda a, b: a - LR * b, x_ref, g)
  assert_trees_close(x, x_ref, rtol=1e-5, atol=1e-6)
  assert np.abs(_flat(x) - _flat(params)).max() > 1e-3


@pytest.mark.parametrize('num_workers', [8, 16])
def test_steps_by_hand_under_shard_map(num_workers):
  """Two steps of the compiled shard_map program at ratio 10 on the 8 CPU
  devices (one or two workers per device) against the recursion computed by
  hand in NumPy with the block from ALGORITHMS.md; the step's only
  non-scalar all-reduce is the block of b values."""
  ratio, seed = 10, 4
  layout = data_parallel.make_layout(num_workers)
  tx = defjax.ef21(
      LR,
      defjax.rbgs(ratio, key=seed),
      momentum=MU,
      weight_decay=WD,
      axis_name=layout.axis_name,
  )
  params = jax.device_put(mlp_params(), layout.replicated)
  state = layout.init_state(tx, params)
  step = layout.train_step(
      lambda p, ms, b: (mlp_loss(p, b), ms), tx, donate=False
  )
  xs, ys = batches(2, workers=num_workers)
  batch = lambda t: jax.device_put((xs[t], ys[t]), layout.per_worker)
  compiled = step.lower(params, {}, state, batch(0)).compile()
  sizes = sorted(
      math.prod(s) for c in wire.collectives(compiled) for _, s in c.shapes
  )
  d = _flat(params).size
  b = math.ceil(d / ratio)
  assert sizes[-1] == b and all(s <= 1 for s in sizes[:-1]), sizes

  x = _flat(params)
  v = np.zeros((num_workers, d), np.float32)
  h_k = np.zeros_like(v)
  h = np.zeros(d, np.float32)
  unflatten = lambda flat: jax.tree.unflatten(
      jax.tree.structure(params),
      np.split(flat, np.cumsum([a.size for a in jax.tree.leaves(params)])[:-1]),
  )
  for t in range(2):
    params, _, state, _ = compiled(params, {}, state, batch(t))
    x_tree = jax.tree.map(lambda f, a: f.reshape(a.shape), unflatten(x), params)
    g = np.stack(
        [_grad(x_tree, xs[t, k], ys[t, k]) for k in range(num_workers)]
    )
    v = MU * v + g + WD * x
    block = _block(seed, t, d, ratio)
    c = np.zeros_like(v)
    c[:, block] = (v - h_k)[:, block]
    h_k = h_k + c
    h = h + c.mean(0)
    x = x - LR * h
    np.testing.assert_allclose(_flat(params), x, rtol=1e-5, atol=1e-6)
  off_block = np.setdiff1d(
      np.arange(d),
      np.union1d(_block(seed, 0, d, ratio), _block(seed, 1, d, ratio)),
  )
  assert (h[off_block] == 0).all() and np.abs(h).max() > 0
  for k in range(num_workers):
    np.testing.assert_allclose(
        _flat(jax.tree.map(lambda a: a[k], state.estimate)),
        h_k[k],
        rtol=1e-4,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        _flat(jax.tree.map(lambda a: a[k], state.momentum)),
        v[k],
        rtol=1e-4,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    'kwargs, match',
    [
        (dict(momentum=1.0), 'momentum'),
        (dict(momentum=-0.1), 'momentum'),
        (dict(momentum='0.9'), 'momentum'),
        (dict(weight_decay=-1e-4), 'weight_decay'),
        (dict(weight_decay=float('nan')), 'weight_decay'),
    ],
)
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    defjax.ef21(0.1, defjax.rbgs(4), **kwargs)
  with pytest.raises(ValueError, match='compressor'):
    defjax.ef21(0.1, 256)
  with pytest.raises(ValueError, match='params'):
    defjax.ef21(0.1, defjax.rbgs(4), weight_decay=1e-4).update(
        {'w': jnp.ones(3)},
        defjax.ef21(0.1, defjax.rbgs(4)).init({'w': jnp.ones(3)}),
    )
