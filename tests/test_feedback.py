"""The error-feedback family: the identities of ALGORITHMS.md on a small MLP."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import defjax
from helpers import K, assert_trees_close, batches, mlp_loss, mlp_params, momentum_sgd, run_workers

STEPS = 25


def _sgd_path(params, xs, ys, opt):
  """Plain single-worker optax path (the reference for identities 1 and 2)."""
  state = opt.init(params)

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(mlp_loss)(params, (x, y))
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  path = []
  for t in range(xs.shape[0]):
    params, state = step(params, state, xs[t], ys[t])
    path.append(params)
  return path


@pytest.mark.parametrize(
    'compressor',
    [
        lambda: defjax.rbgs(16),
        lambda: defjax.rbgs(4, per_leaf=True),
        lambda: defjax.randomk(8),
        lambda: defjax.scaled(0.3),
    ],
)
def test_k1_lam1_y_is_momentum_sgd(compressor):
  """Identity 1 (paper Eq. 8): K = 1, lam = 1, linear C: y_t = x_t - e_t is SGD."""
  params = mlp_params()
  xs, ys = batches(STEPS, workers=1)
  tx = defjax.error_feedback(momentum_sgd(), compressor(), lam=1.0)
  x, states, _ = run_workers(tx, params, xs, ys, axis_name=None)
  y_final = defjax.averaged_params(x, jax.tree.map(lambda s: s[0], states))
  sgd = _sgd_path(params, xs[:, 0], ys[:, 0], momentum_sgd())
  assert_trees_close(y_final, sgd[-1], rtol=2e-5, atol=2e-6)
  # and x really differs from y (the identity is not trivial)
  assert (
      max(
          float(jnp.abs(a - b).max())
          for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(sgd[-1]))
      )
      > 1e-3
  )


def test_k1_lam1_each_step():
  """Identity 1 holds at every step, not just the last."""
  params = mlp_params()
  xs, ys = batches(10, workers=1)
  tx = defjax.error_feedback(momentum_sgd(), defjax.rbgs(8), lam=1.0)
  sgd = _sgd_path(params, xs[:, 0], ys[:, 0], momentum_sgd())
  _, _, path = run_workers(tx, params, xs, ys, axis_name=None, with_states=True)
  for t, (x, states) in enumerate(path):
    y = defjax.averaged_params(x, jax.tree.map(lambda s: s[0], states))
    assert_trees_close(y, sgd[t], rtol=2e-5, atol=2e-6)


def test_sgd_iterate_averaging():
  """Identity 2 (Lemma C.1): K = 1, lam = 1, C = delta*A gives
  x_{t+1} = x_t + delta (y_{t+1} - x_t) with y the SGD path."""
  delta = 0.2
  params = mlp_params()
  xs, ys = batches(STEPS, workers=1)
  tx = defjax.error_feedback(momentum_sgd(), defjax.scaled(delta), lam=1.0)
  _, _, xpath = run_workers(tx, params, xs, ys, axis_name=None)
  ypath = _sgd_path(params, xs[:, 0], ys[:, 0], momentum_sgd())
  x_prev = params
  for x_next, y_next in zip(xpath, ypath):
    expected = jax.tree.map(lambda x, y: x + delta * (y - x), x_prev, y_next)
    assert_trees_close(x_next, expected, rtol=2e-5, atol=2e-6)
    x_prev = x_next


@pytest.mark.parametrize('lam', [0.0, 0.3, 1.0])
@pytest.mark.parametrize(
    'compressor', [lambda: defjax.rbgs(1), defjax.identity]
)
def test_ratio1_equals_data_parallel(lam, compressor):
  """Identity 3: with no compression EF/DEF/SAEF are data-parallel SGD."""
  params = mlp_params()
  xs, ys = batches(STEPS)
  ef = defjax.error_feedback(
      momentum_sgd(), compressor(), lam=lam, axis_name='w'
  )
  dp = defjax.data_parallel(momentum_sgd(), axis_name='w')
  x_ef, s_ef, _ = run_workers(ef, params, xs, ys)
  x_dp, _, _ = run_workers(dp, params, xs, ys)
  assert_trees_close(x_ef, x_dp, rtol=1e-5, atol=1e-6)
  # the error stays exactly zero: nothing is left behind
  assert all(float(jnp.abs(e).max()) == 0 for e in jax.tree.leaves(s_ef.error))


def test_first_step_block_values():
  """Identity 4 on the first step: the update is -C(mean_k eta g_k(x)) on the
  block and zero elsewhere; each worker keeps its own p_k off the block."""
  lr, wd, ratio, seed = 0.1, 5e-4, 10, 4
  params = mlp_params()
  xs, ys = batches(1)
  tx = defjax.error_feedback(
      momentum_sgd(lr, 0.9, wd),
      defjax.rbgs(ratio, key=seed),
      lam=0.3,
      axis_name='w',
  )
  x1, states, _ = run_workers(tx, params, xs, ys)

  flat = lambda t: np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)])
  d = flat(params).size
  b = math.ceil(d / ratio)
  start = int(
      jax.random.randint(
          jax.random.fold_in(jax.random.PRNGKey(seed), 0),
          (),
          0,
          d,
          dtype=jnp.int32,
      )
  )
  block = (start + np.arange(b)) % d
  # e_0 = 0, so the gradient point is x and m_1 = g + wd x: p_k = lr (g_k + wd x).
  p = np.stack(
      [
          lr
          * (
              flat(jax.grad(mlp_loss)(params, (xs[0, k], ys[0, k])))
              + wd * flat(params)
          )
          for k in range(K)
      ]
  )
  step = flat(x1) - flat(params)
  expected = np.zeros(d, np.float32)
  expected[block] = -p.mean(0)[block]
  np.testing.assert_allclose(step, expected, rtol=1e-4, atol=1e-7)
  for k in range(K):
    e_k = flat(jax.tree.map(lambda e: e[k], states.error))
    expected_e = p[k].copy()
    expected_e[block] = 0
    np.testing.assert_allclose(e_k, expected_e, rtol=1e-4, atol=1e-7)


def test_psync_semantics():
  """PSync against its definition: K own models, x_k <- x_k - eta m_k, then
  the block of every x_k replaced by mean_j x_j; output mean_k x_k."""
  lr, ratio, seed = 0.1, 6, 7
  params = mlp_params()
  xs, ys = batches(STEPS)
  tx = defjax.psync(
      momentum_sgd(lr), defjax.rbgs(ratio, key=seed), axis_name='w'
  )
  x, states, _ = run_workers(tx, params, xs, ys)

  # Direct implementation: stacked models, a local optimizer each, block mask.
  local = momentum_sgd(lr)
  models = jax.tree.map(lambda a: jnp.stack([a] * K), params)
  opt_states = jax.vmap(local.init)(models)
  c = defjax.rbgs(ratio, key=seed)
  cstate = c.init(params)
  ones = jax.tree.map(jnp.ones_like, params)

  @jax.jit
  def step(models, opt_states, cstate, x, y):
    def local_step(m, s, x, y):
      g = jax.grad(mlp_loss)(m, (x, y))
      u, s = local.update(g, s, m)
      return optax.apply_updates(m, u), s

    models, opt_states = jax.vmap(local_step)(models, opt_states, x, y)
    mask = c.compress(ones, cstate)
    mean = jax.tree.map(lambda m: m.mean(0), models)
    models = jax.tree.map(
        lambda m, mu, k: jnp.where(k > 0, mu, m), models, mean, mask
    )
    return models, opt_states, cstate._replace(count=cstate.count + 1)

  for t in range(STEPS):
    models, opt_states, cstate = step(models, opt_states, cstate, xs[t], ys[t])

  worker_models = jax.vmap(defjax.eval_point, in_axes=(None, 0))(x, states)
  assert_trees_close(worker_models, models, rtol=1e-4, atol=1e-5)
  output = jax.vmap(
      lambda s: defjax.averaged_params(x, s, axis_name='w'), axis_name='w'
  )(states)
  assert_trees_close(
      jax.tree.map(lambda o: o[0], output),
      jax.tree.map(lambda m: m.mean(0), models),
      rtol=1e-4,
      atol=1e-5,
  )


def test_def_detaches_gradient_point():
  """DEF takes its gradient at x - lam e_k; EF (lam = 0) at x."""
  params = mlp_params()
  xs, ys = batches(3)
  for lam in (0.0, 0.3):
    tx = defjax.error_feedback(
        momentum_sgd(), defjax.rbgs(8), lam=lam, axis_name='w'
    )
    x, states, _ = run_workers(tx, params, xs, ys)
    points = jax.vmap(defjax.eval_point, in_axes=(None, 0))(x, states)
    expected = jax.tree.map(lambda p, e: p[None] - lam * e, x, states.error)
    assert_trees_close(points, expected, rtol=0, atol=0)
    assert float(jnp.abs(states.error['layer0']['w']).max()) > 0


def test_lam_changes_the_trajectory():
  """Sanity of the detach: with lam > 0 the trajectory differs from EF's."""
  params = mlp_params()
  xs, ys = batches(10)
  outs = {}
  for lam in (0.0, 0.5):
    tx = defjax.error_feedback(
        momentum_sgd(), defjax.rbgs(8), lam=lam, axis_name='w'
    )
    outs[lam] = run_workers(tx, params, xs, ys)[0]
  diff = max(
      float(jnp.abs(a - b).max())
      for a, b in zip(jax.tree.leaves(outs[0.0]), jax.tree.leaves(outs[0.5]))
  )
  assert diff > 1e-6


def test_composes_with_optax():
  """Inside optax.chain with any inner (Adam), with ExtraArgs, and with
  eval_point finding the state in the chain."""
  params = mlp_params()
  xs, ys = batches(5, workers=1)
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      defjax.error_feedback(optax.adam(1e-2), defjax.rbgs(4), lam=0.3),
  )
  x, states, _ = run_workers(tx, params, xs, ys, axis_name=None)
  state = jax.tree.map(lambda s: s[0], states)
  ef_state = state[1]
  assert isinstance(ef_state, defjax.ErrorFeedbackState)
  assert_trees_close(
      defjax.eval_point(x, state),
      jax.tree.map(lambda p, e: p - 0.3 * e, x, ef_state.error),
      rtol=0,
      atol=0,
  )
  # extra args are accepted and forwarded to the inner transform
  inner_with_extra = optax.GradientTransformationExtraArgs(
      lambda p: optax.EmptyState(),
      lambda u, s, p=None, *, scale: (jax.tree.map(lambda g: -scale * g, u), s),
  )
  tx2 = defjax.error_feedback(inner_with_extra, defjax.identity())
  s2 = tx2.init(params)
  g = jax.tree.map(jnp.ones_like, params)
  u, _ = tx2.update(g, s2, params, scale=0.5)
  assert_trees_close(u, jax.tree.map(lambda a: -0.5 * a, g), rtol=0, atol=0)


def test_eval_point_and_average_for_plain_optimizers():
  params = mlp_params()
  state = optax.sgd(0.1).init(params)
  assert defjax.eval_point(params, state) is params
  assert defjax.averaged_params(params, state) is params


@pytest.mark.parametrize(
    'make_tx, count',
    [
        (
            lambda: defjax.error_feedback(
                momentum_sgd(), defjax.rbgs(16), lam=0.3
            ),
            lambda state: state.compressor_state.count,
        ),
        # EF21-SGDM in a chain, its schedule counted by its own step count.
        (
            lambda: optax.chain(
                optax.clip_by_global_norm(1.0),
                defjax.ef21(
                    optax.linear_schedule(0.1, 0.0, 10), defjax.rbgs(16)
                ),
            ),
            lambda state: state[1].count,
        ),
    ],
)
def test_state_types_unchanged_and_no_recompilation(make_tx, count):
  params = mlp_params()
  tx = make_tx()
  state = tx.init(params)
  update = jax.jit(tx.update)
  types = jax.tree.map(jax.typeof, state)
  g = jax.tree.map(jnp.ones_like, params)
  for _ in range(4):
    _, state = update(g, state, params)
    assert jax.tree.map(jax.typeof, state) == types
  assert update._cache_size() == 1
  assert int(count(state)) == 4


@pytest.mark.parametrize(
    'lam', [-0.1, 1.01, float('nan'), 'a', '0.3', True, np.array([0.3])]
)
def test_bad_lam(lam):
  with pytest.raises(ValueError, match='lam'):
    defjax.error_feedback(optax.sgd(0.1), defjax.rbgs(4), lam=lam)


def test_bad_transform_arguments():
  with pytest.raises(ValueError, match='inner'):
    defjax.error_feedback(lambda g: g, defjax.rbgs(4))
  with pytest.raises(ValueError, match='compressor'):
    defjax.error_feedback(optax.sgd(0.1), 256)
  with pytest.raises(ValueError, match='inner'):
    defjax.data_parallel('sgd')
  with pytest.raises(ValueError, match='int'):
    defjax.error_feedback(optax.sgd(0.1), defjax.rbgs(4)).init(
        {'w': jnp.zeros(3), 'n': jnp.zeros(2, jnp.int32)}
    )


def test_docstring_examples_run():
  import doctest
  from defjax import feedback

  result = doctest.testmod(feedback)
  assert result.attempted > 0 and result.failed == 0
