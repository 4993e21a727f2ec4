"""Shared test fixtures: a small MLP and simulated workers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

K = 8  # simulated workers


def mlp_params(key=0, sizes=(12, 16, 3)):
  keys = jax.random.split(jax.random.PRNGKey(key), len(sizes) - 1)
  return {
      f'layer{i}': {
          'w': jax.random.normal(k, (a, b)) / np.sqrt(a),
          'b': 0.1 * jax.random.normal(jax.random.fold_in(k, 1), (b,)),
      }
      for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
  }


def mlp_loss(params, batch):
  x, y = batch
  h = x
  n = len(params)
  for i in range(n):
    h = h @ params[f'layer{i}']['w'] + params[f'layer{i}']['b']
    if i < n - 1:
      h = jnp.tanh(h)
  return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def batches(steps, workers=K, batch=4, dim=12, classes=3, seed=0):
  """Per-step, per-worker batches: x (steps, K, B, dim), y (steps, K, B)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(steps, workers, batch, dim)).astype(np.float32)
  y = rng.integers(0, classes, size=(steps, workers, batch)).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(y)


def momentum_sgd(lr=0.1, momentum=0.9, wd=5e-4):
  return optax.chain(
      optax.add_decayed_weights(wd), optax.sgd(lr, momentum=momentum)
  )


def run_workers(
    tx, params, xs, ys, axis_name='w', loss=mlp_loss, with_states=False
):
  """Runs tx for len(xs) steps with K workers simulated by vmap.

  Returns the final params, the stacked per-worker states, and the params
  after each step (with ``with_states``, (params, states) after each step).
  """
  from defjax import feedback

  workers = xs.shape[1]

  def worker_step(params, state, x, y):
    grads = jax.grad(loss)(feedback.eval_point(params, state), (x, y))
    updates, state = tx.update(grads, state, params)
    return updates, state

  vstep = jax.vmap(worker_step, in_axes=(None, 0, 0, 0), axis_name=axis_name)

  @jax.jit
  def step(params, states, x, y):
    updates, states = vstep(params, states, x, y)
    # Reduced updates are equal on all workers; keep worker 0's copy.
    updates = jax.tree.map(lambda u: u[0], updates)
    return optax.apply_updates(params, updates), states

  states = jax.vmap(tx.init, in_axes=None, axis_size=workers)(params)
  history = []
  for t in range(xs.shape[0]):
    params, states = step(params, states, xs[t], ys[t])
    history.append((params, states) if with_states else params)
  return params, states, history


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(
      lambda x, y: np.testing.assert_allclose(
          np.asarray(x), np.asarray(y), rtol=rtol, atol=atol
      ),
      a,
      b,
  )


def shard_params(params, layout, param_specs):
  """``params`` placed on a sharded layout: sharded over 'model' by their specs."""
  return jax.device_put(params, layout.param_shardings(params, param_specs))


def all_reduce_elements(compiled, *, min_elements: int = 1) -> list[int]:
  """Sizes (in elements) of a compiled program's all-reduces of at least
  ``min_elements`` values."""
  from defjax import wire

  return sorted(
      c.elements
      for c in wire.collectives(compiled)
      if c.op == 'all-reduce' and c.elements >= min_elements
  )
