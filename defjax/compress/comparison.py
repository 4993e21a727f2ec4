"""Comparison compressors (benchmarks): Random-K and Top-K.

Random-K is all-reduce compatible but scattered in memory; Top-K is not
all-reduce compatible (values and indices are all-gathered).
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax

from defjax.compress.core import Compressor
from defjax.compress.core import KeyLike
from defjax.compress.core import PyTree
from defjax.compress.core import RandomState
from defjax.compress.core import advance
from defjax.compress.core import block_size
from defjax.compress.core import check_float_leaves
from defjax.compress.core import check_key
from defjax.compress.core import check_ratio
from defjax.compress.core import leaf_sizes
from defjax.compress.core import num_workers
from defjax.compress.core import random_init
from defjax.compress.core import step_key
from defjax.compress.core import worker_axes
from defjax.compress.core import worker_mean


def _split_like(flat: jax.Array, tree: PyTree) -> PyTree:
  """Cuts a flat vector into ``tree``'s leaf shapes (dtype kept)."""
  leaves, treedef = jax.tree.flatten(tree)
  sizes = [int(np.prod(jnp.shape(x), dtype=np.int64)) for x in leaves]
  parts = jnp.split(flat, np.cumsum(sizes)[:-1]) if len(sizes) > 1 else [flat]
  return treedef.unflatten(
      [p.reshape(jnp.shape(x)) for p, x in zip(parts, leaves)]
  )


def _indexed_compressor(
    indices_fn: Callable[[RandomState, int], jax.Array],
    payload_fn: Callable[[int], int],
    key: KeyLike,
) -> Compressor:
  """A compressor that keeps a shared set of flat indices (Random-K).

  ``indices_fn(state, d)`` returns the selected indices into the flattened
  tree; they depend only on the shared key and the step count, so every
  worker on every host selects the same ones and ``C`` is linear and shared:
  mean_k C(p_k) = C(mean_k p_k) is one all-reduce of the selected values.
  Indices may repeat (Random-K draws with replacement), so no scatter or
  gather here promises unique indices.
  """

  def select(tree, state):
    flat, _ = ravel_pytree(tree)
    d = flat.shape[0]
    idx = indices_fn(state, d)
    values = flat.at[idx].get(mode='promise_in_bounds')
    # Scatter only into fresh zero buffers: XLA:CPU fuses a scatter into its
    # operand, and a scatter into the concatenated tree recomputed it per
    # index (17 ms instead of 1 ms per step on a 0.4M-value CNN).
    mask = jnp.zeros(d, jnp.bool_).at[idx].set(True)
    return idx, values, _split_like(mask, tree)

  def place(idx, values, tree):
    # values are in the raveled tree's dtype (the leaves' promoted dtype).
    flat = jnp.zeros(optax.tree.size(tree), values.dtype).at[idx].set(values)
    return jax.tree.map(
        lambda f, x: f.astype(jnp.result_type(x)), _split_like(flat, tree), tree
    )

  def compress(tree, state):
    idx, values, _ = select(tree, state)
    return place(idx, values, tree)

  def aggregate(tree, state, axis_name=None):
    idx, values, mask = select(tree, state)
    mean_values = worker_mean(
        values, axis_name
    )  # the only collective: b values
    mean_c = place(idx, mean_values, tree)
    residual = jax.tree.map(
        lambda x, m: jnp.where(m, jnp.zeros_like(x), x), tree, mask
    )
    return mean_c, residual, advance(state)

  def payload(params):
    return payload_fn(sum(leaf_sizes(params)))

  return Compressor(random_init(key), compress, aggregate, payload)


def randomk(ratio: float, *, key: KeyLike = 0) -> Compressor:
  """Random-K: b = ceil(d / ratio) random coordinates from a shared key.

  Coordinates are drawn with replacement (a permutation of d values per step
  would cost O(d log d)); duplicates carry the same value, so C stays a linear
  projection shared by all workers, onto slightly fewer than b coordinates.
  All-reduce compatible but scattered in memory; for comparison with RBGS.

  Args:
    ratio: compression ratio d / b, >= 1.
    key: the shared selection key, as in ``rbgs``.
  """
  ratio = check_ratio(ratio)
  key = check_key(key)

  def indices(state, d):
    b = block_size(d, ratio)
    return jax.random.randint(step_key(state), (b,), 0, d, dtype=jnp.int32)

  return _indexed_compressor(indices, lambda d: block_size(d, ratio), key)


def topk(ratio: float) -> Compressor:
  """Top-K: each worker keeps its own b = ceil(d / ratio) largest magnitudes.

  Not all-reduce compatible: each worker's values and int32 indices are
  all-gathered and scatter-added. Each worker's residual is its own
  p_k - C_k(p_k). For comparison with RBGS (cost: a top-k over d per step).
  """
  ratio = check_ratio(ratio)

  def select(flat):
    _, idx = jax.lax.top_k(jnp.abs(flat), block_size(flat.shape[0], ratio))
    return idx

  def init(params):
    check_float_leaves(params)
    return optax.EmptyState()

  def compress(tree, state):
    del state
    flat, unravel = ravel_pytree(tree)
    idx = select(flat)
    return unravel(jnp.zeros_like(flat).at[idx].set(flat[idx]))

  def aggregate(tree, state, axis_name=None):
    flat, unravel = ravel_pytree(tree)
    idx = select(flat)
    values = flat[idx]
    mask = (
        jnp.zeros(flat.shape, jnp.bool_).at[idx].set(True, unique_indices=True)
    )
    residual = jax.tree.map(
        lambda x, m: jnp.where(m, jnp.zeros_like(x), x),
        tree,
        _split_like(mask, tree),
    )
    if axis_name is None:
      total = jnp.zeros_like(flat).at[idx].set(values)
    else:
      # Every device of a SplitAxis worker gathers all of them: Top-K's
      # values differ per worker and cannot be split like a mean's.
      axes = worker_axes(axis_name)
      all_values = jax.lax.all_gather(values, axes, tiled=True)
      all_idx = jax.lax.all_gather(idx, axes, tiled=True)
      total = jnp.zeros(flat.shape, flat.dtype).at[all_idx].add(all_values)
      total = total / num_workers(axis_name)
    return unravel(total), residual, state

  def payload(params):
    return 2 * block_size(sum(leaf_sizes(params)), ratio)  # values + indices

  return Compressor(init, compress, aggregate, payload)
