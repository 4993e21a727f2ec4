"""Compressors shared by all workers: RBGS, Random-K, Top-K, scaling, identity.

A compressor ``C`` acts on a pytree of updates. Every compressor here is
described by three pure functions (optax style, bundled in a ``Compressor``):

* ``init(params) -> state``: the compressor's state (the shared block-selection
  key and a step counter for the random ones).
* ``compress(tree, state) -> C(tree)``: the local compressed tree, no
  communication. Used by tests and analysis.
* ``aggregate(tree, state, axis_name) -> (mean_k C(tree_k), tree - C(tree),
  new_state)``: the one collective of a step. ``axis_name=None`` is a single
  worker. For RBGS and Random-K only the selected values cross the wire, in
  one all-reduce for all leaves.

``payload(params)`` is the number of values each worker sends per step.

References:
  Xu & Huang, "Detached Error Feedback for Distributed SGD with Random
  Sparsification", ICML 2022, Section 3 (RBGS) and Appendix (compressors).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax

AxisName = Optional[Union[str, Sequence[str]]]
PyTree = Any
# An int seed, a typed key (jax.random.key) or a raw uint32 key (PRNGKey).
KeyLike = Union[int, jax.Array]


class Compressor(NamedTuple):
  """A compressor C: ``init``, ``compress``, ``aggregate`` and ``payload``."""

  init: Callable[[PyTree], Any]
  compress: Callable[[PyTree, Any], PyTree]
  aggregate: Callable[[PyTree, Any, AxisName], tuple[PyTree, PyTree, Any]]
  payload: Callable[[PyTree], int]


class RandomState(NamedTuple):
  """Shared selection key (raw uint32[2]) and the number of steps taken."""

  key: jax.Array
  count: jax.Array


# ---------------------------------------------------------------- validation


def as_real_scalar(value, name: str, what: str) -> float:
  """``value`` as a float if it is a real number (Python, NumPy or a 0-d
  array); bools, strings and arrays with elements raise ValueError."""
  if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
    return float(value)  # np.bool_ is not an np.number
  dtype = getattr(value, 'dtype', None)
  if (dtype is None or np.ndim(value) != 0
      or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating))):
    raise ValueError(f'{name} must be {what}, got {value!r}')
  try:
    return float(value)
  except Exception:  # a tracer: the value must be known when the transform is built
    raise ValueError(f'{name} must be {what} known when the transform is built,'
                     f' got {value!r}') from None


def check_ratio(ratio) -> float:
  """Returns ``ratio`` as a float, or raises ValueError if it is not >= 1."""
  ratio = as_real_scalar(ratio, 'ratio', 'a number >= 1')
  if not math.isfinite(ratio) or ratio < 1:
    raise ValueError(
        f'ratio must be >= 1 (1 = no compression, 256 = send 1/256 of the'
        f' values), got {ratio!r}'
    )
  return float(ratio)


def check_float_leaves(tree: PyTree) -> None:
  """Raises ValueError naming the first leaf of params that is not floating point."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  if not leaves:
    raise ValueError('params is an empty pytree: nothing to compress')
  for path, leaf in leaves:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
          f'params leaf {jax.tree_util.keystr(path)} has dtype {dtype}; error'
          ' feedback and compression need floating-point leaves (mask integer'
          ' leaves out with optax.masked or keep them outside params)'
      )


def num_workers(axis_name: AxisName):
  """K, the number of workers along ``axis_name`` (1 when it is None)."""
  return 1 if axis_name is None else jax.lax.psum(1, axis_name)


def worker_mean(tree: PyTree, axis_name: AxisName) -> PyTree:
  """mean_k tree_k over ``axis_name`` (identity for a single worker)."""
  if axis_name is None:
    return tree
  return jax.lax.pmean(tree, axis_name)


def block_size(d: int, ratio: float) -> int:
  """b = ceil(d / ratio), the RBGS block length for d values."""
  return max(1, math.ceil(d / ratio))


def _leaf_sizes(tree: PyTree) -> list[int]:
  # np.size, not optax.tree.size's jnp.size: it also sizes ShapeDtypeStruct
  # leaves (jnp.size deprecates them), so payloads work on jax.eval_shape trees.
  return [np.size(x) for x in jax.tree.leaves(tree)]


# -------------------------------------------------------------- shared keys


def check_key(key: KeyLike) -> KeyLike:
  """Returns ``key`` if it is an int seed or a key, else raises ValueError.

  Checks types and shapes only: building a compressor computes nothing, so it
  may come before the program configures JAX's backends. A compressor calls
  it when built and ``as_key`` in its ``init``.
  """
  dtype = getattr(key, 'dtype', None)
  if isinstance(key, jax.Array) and jnp.issubdtype(dtype, jax.dtypes.prng_key):
    impl = jax.random.key_impl(key)
    if key.shape != () or str(impl) != jax.config.jax_default_prng_impl:
      raise ValueError(
          f'key must be a single key of the default PRNG implementation'
          f' ({jax.config.jax_default_prng_impl}), got {key.shape} keys of {impl}')
    return key
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    return key
  if dtype is not None and np.ndim(key) == 0 and np.issubdtype(dtype, np.integer):
    return key  # a 0-d integer array: a seed
  raw = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  if dtype != raw.dtype or np.shape(key) != raw.shape:
    raise ValueError(
        'key must be an int seed, a jax.random.key or a raw jax.random.PRNGKey'
        f' ({raw.dtype}{list(raw.shape)}), got {key!r}')
  return key


def as_key(key: KeyLike) -> jax.Array:
  """``key`` as a raw uint32 key: a seed s gives PRNGKey(s), a typed key its bits.

  What a compressor's state keeps whatever was given: checkpoints store it
  as a plain uint32 array, and PRNGKey(s) is the key the committed runs drew
  their blocks from (a typed jax.random.key(s) holds the same bits). Computes
  (PRNGKey), so call it in ``init``, not when building a compressor.

  Args:
    key: an int seed, a ``jax.random.key`` or a raw ``jax.random.PRNGKey``.

  Returns:
    A uint32 array shaped like ``jax.random.PRNGKey(0)``.

  Raises:
    ValueError: if ``key`` is none of those (see ``check_key``).

  Example:
    >>> import jax, numpy as np
    >>> from defjax import compress
    >>> bool(np.all(compress.as_key(3) == jax.random.PRNGKey(3)))
    True
  """
  key = check_key(key)
  if jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
    return jax.random.key_data(key)
  if np.ndim(key) == 0:
    return jax.random.PRNGKey(key)
  return jnp.asarray(key)


def _step_key(state: RandomState) -> jax.Array:
  return jax.random.fold_in(state.key, state.count)


def _random_init(key: KeyLike):
  def init(params):
    check_float_leaves(params)
    return RandomState(key=as_key(key), count=jnp.zeros([], jnp.int32))

  return init


def _advance(state: RandomState) -> RandomState:
  return RandomState(key=state.key, count=optax.safe_increment(state.count))


# ----------------------------------------------------- flat-vector machinery


def _split_like(flat: jax.Array, tree: PyTree) -> PyTree:
  """Cuts a flat vector into ``tree``'s leaf shapes (dtype kept)."""
  leaves, treedef = jax.tree.flatten(tree)
  sizes = [int(np.prod(jnp.shape(x), dtype=np.int64)) for x in leaves]
  parts = jnp.split(flat, np.cumsum(sizes)[:-1]) if len(sizes) > 1 else [flat]
  return treedef.unflatten([p.reshape(jnp.shape(x)) for p, x in zip(parts, leaves)])


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
    return jax.tree.map(lambda f, x: f.astype(jnp.result_type(x)), _split_like(flat, tree), tree)

  def compress(tree, state):
    idx, values, _ = select(tree, state)
    return place(idx, values, tree)

  def aggregate(tree, state, axis_name=None):
    idx, values, mask = select(tree, state)
    mean_values = worker_mean(values, axis_name)  # the only collective: b values
    mean_c = place(idx, mean_values, tree)
    residual = jax.tree.map(lambda x, m: jnp.where(m, jnp.zeros_like(x), x), tree, mask)
    return mean_c, residual, _advance(state)

  def payload(params):
    return payload_fn(sum(_leaf_sizes(params)))

  return Compressor(_random_init(key), compress, aggregate, payload)


# --------------------------------------------------------------------- RBGS


def rbgs(
    ratio: float,
    *,
    key: KeyLike = 0,
    per_leaf: bool = False,
) -> Compressor:
  """Random block-wise gradient sparsification (RBGS).

  Each step keeps one circular block of b = ceil(d / ratio) consecutive values
  of the flattened update, starting at s_t ~ U[0, d) drawn from a key shared by
  all workers and folded with the step count. Circular blocks make every
  coordinate selected with probability exactly b / d.

  Args:
    ratio: compression ratio d / b, >= 1 (1 keeps everything).
    key: the shared block-selection key, equal on all workers: an int seed s
      (the key jax.random.PRNGKey(s)), a jax.random.key or a raw
      jax.random.PRNGKey.
    per_leaf: if True, as in the authors' PyTorch code, each leaf gets its own
      circular block of max(1, floor(n_leaf / ratio)) values at its own shared
      random start; all leaf blocks still travel in one all-reduce. Use it
      for batch-normalised models: one global block moves all their small
      leaves (BN scales, biases) together about once every ``ratio`` steps,
      and trains far worse in the same steps (README, Block layout).

  Returns:
    A ``Compressor``.

  References:
    Xu & Huang, ICML 2022, Section 3 and Algorithm 1.
  """
  ratio = check_ratio(ratio)
  key = check_key(key)
  if per_leaf:
    return _rbgs_per_leaf(ratio, key)

  def block(tree, state):
    """The shared start s_t and, per leaf, each value's position in the block."""
    sizes = _leaf_sizes(tree)
    d = sum(sizes)
    b = block_size(d, ratio)
    start = jax.random.randint(_step_key(state), (), 0, d, dtype=jnp.int32)
    offsets = np.cumsum([0] + sizes[:-1])
    # Position (j - s) mod d of global index j; the block is where it is < b.
    # Computed from an iota, so masking fuses into the elementwise pass that
    # produces the leaf: no d-length index or mask buffer, no scatter.
    rel = []
    for x, offset, n in zip(jax.tree.leaves(tree), offsets, sizes):
      r = jnp.arange(n, dtype=jnp.int32) + (int(offset) - start)
      rel.append(jnp.where(r < 0, r + d, r).reshape(jnp.shape(x)))
    return start, b, d, rel

  def gather(tree, start, b, d):
    """The b block values in block order, read leaf by leaf through windows.

    A gather from the concatenated tree made XLA write out every leaf of the
    (fused) update first: a d-length pass per step, most of RBGS's cost in a
    DEF step. The circular block is the union of [s, s + b) and
    [s - d, s - d + b); within a leaf of n values each meets at most
    w = min(b, n) consecutive values, so a window of w values at a clamped
    start covers it, and a dynamic slice of a leaf fuses into the leaf's
    producer: O(b) work per leaf. Each window lands at its block position in
    a buffer padded by b on both sides, so that a window starting before the
    block (position > -b) is never clamped into the wrong place.
    """
    leaves = jax.tree.leaves(tree)
    dtype = jnp.result_type(*leaves)
    buf = jnp.zeros((3 * b,), dtype)
    offset = 0
    for x in leaves:
      n = x.size
      w = min(b, n)
      flat = jnp.ravel(x).astype(dtype)
      for s in (start, start - d):
        lo = jnp.clip(s - offset, 0, n - w)
        pos = lo + offset - s  # block position of the window's first value
        r = pos + jnp.arange(w, dtype=jnp.int32)
        at = pos + b
        old = jax.lax.dynamic_slice(buf, (at,), (w,))
        new = jnp.where((r >= 0) & (r < b), jax.lax.dynamic_slice(flat, (lo,), (w,)), old)
        buf = jax.lax.dynamic_update_slice(buf, new, (at,))
      offset += n
    return buf[b:2 * b]

  def place(tree, values, rel, b):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten([place_block(x, values, b, r) for x, r in zip(leaves, rel)])

  def compress(tree, state):
    start, b, d, rel = block(tree, state)
    return place(tree, gather(tree, start, b, d), rel, b)

  def aggregate(tree, state, axis_name=None):
    start, b, d, rel = block(tree, state)
    values = gather(tree, start, b, d)
    mean_values = worker_mean(values, axis_name)  # b values
    zero = _zero_after(values)
    leaves, treedef = jax.tree.flatten(tree)
    residual = treedef.unflatten(
        [jnp.where(r < b, zero.astype(x.dtype), x) for x, r in zip(leaves, rel)])
    return place(tree, mean_values, rel, b), residual, _advance(state)

  def payload(params):
    return block_size(sum(_leaf_sizes(params)), ratio)

  return Compressor(_random_init(key), compress, aggregate, payload)


def _zero_after(values):
  """The residual p - C(p)'s 0 on the block, computed from the gathered block
  ``values`` (min(|v|, 0): exactly +0 for every finite or infinite v).

  Written as a literal 0, nothing orders the pass writing the residual after
  the gather, and when the error buffer is donated (p = e + eta m is read by
  the gather, the residual overwrites e) XLA copies all of e first: a read and
  a write of d values per step. This 0 depends on the gather, which orders
  the two.
  """
  return jnp.minimum(jnp.abs(values[0]), 0)


def per_leaf_block_sizes(params: PyTree, ratio: float) -> list[int]:
  """Block length of each leaf in per-leaf RBGS: max(1, floor(n / ratio))."""
  return [max(1, int(n // ratio)) for n in _leaf_sizes(params)]


def circular_block(start, n: int, b: int, shape):
  """One leaf's circular block of b values at ``start`` in its n flattened
  values: the block's indices in block order, and each value's position
  (i - start) mod n, shaped like the leaf (in the block iff < b)."""
  i = start + jnp.arange(b, dtype=jnp.int32)
  r = jnp.arange(n, dtype=jnp.int32) - start
  return jnp.where(i >= n, i - n, i), jnp.where(r < 0, r + n, r).reshape(shape)


def place_block(x, values, b: int, rel):
  """The leaf that holds ``values`` at its block positions ``rel`` and zeros
  elsewhere: an elementwise select with a b-element lookup, which fuses into
  the pass that uses it (a scatter into a zero leaf is a pass of its own)."""
  lookup = values.at[jnp.minimum(rel, b - 1)].get(mode='promise_in_bounds')
  return jnp.where(rel < b, lookup, 0).astype(x.dtype)


def _rbgs_per_leaf(ratio: float, key: KeyLike) -> Compressor:
  def blocks(state, tree):
    """(b, block indices, positions) of every leaf, as ``circular_block``."""
    sizes = _leaf_sizes(tree)
    starts = jax.random.randint(
        _step_key(state), (len(sizes),), 0, jnp.asarray(sizes, jnp.int32),
        dtype=jnp.int32,
    )
    out = []
    for j, (x, n) in enumerate(zip(jax.tree.leaves(tree), sizes)):
      b = max(1, int(n // ratio))
      out.append((b, *circular_block(starts[j], n, b, jnp.shape(x))))
    return out

  def compress(tree, state):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten([
        place_block(x, jnp.ravel(x)[i], b, rel)
        for x, (b, i, rel) in zip(leaves, blocks(state, tree))])

  def aggregate(tree, state, axis_name=None):
    leaves, treedef = jax.tree.flatten(tree)
    info = blocks(state, tree)
    dtype = jnp.result_type(*leaves)
    gathered = [jnp.ravel(x)[i].astype(dtype) for x, (_, i, _) in zip(leaves, info)]
    # All leaf blocks in one buffer: one all-reduce per step, not one per leaf.
    mean_values = worker_mean(jnp.concatenate(gathered), axis_name)
    parts = jnp.split(mean_values, np.cumsum([b for b, _, _ in info])[:-1])
    mean_c = [place_block(x, v, b, rel) for x, v, (b, _, rel) in zip(leaves, parts, info)]
    # Each leaf's 0 from that leaf's own gathered values: one 0 for all
    # leaves, from the first gathered value, left the copies (_zero_after).
    residual = [jnp.where(rel < b, _zero_after(v).astype(x.dtype), x)
                for x, v, (b, _, rel) in zip(leaves, gathered, info)]
    return treedef.unflatten(mean_c), treedef.unflatten(residual), _advance(state)

  def payload(params):
    return sum(per_leaf_block_sizes(params, ratio))

  return Compressor(_random_init(key), compress, aggregate, payload)


# ------------------------------------------------------ comparison compressors


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
    return jax.random.randint(_step_key(state), (b,), 0, d, dtype=jnp.int32)

  return _indexed_compressor(indices, lambda d: block_size(d, ratio), key)


def topk(ratio: float) -> Compressor:
  """Top-K: each worker keeps its own b = ceil(d / ratio) largest |values|.

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
    mask = jnp.zeros(flat.shape, jnp.bool_).at[idx].set(True, unique_indices=True)
    residual = jax.tree.map(
        lambda x, m: jnp.where(m, jnp.zeros_like(x), x), tree, _split_like(mask, tree))
    if axis_name is None:
      total = jnp.zeros_like(flat).at[idx].set(values)
    else:
      all_values = jax.lax.all_gather(values, axis_name, tiled=True)
      all_idx = jax.lax.all_gather(idx, axis_name, tiled=True)
      total = jnp.zeros(flat.shape, flat.dtype).at[all_idx].add(all_values)
      total = total / num_workers(axis_name)
    return unravel(total), residual, state

  def payload(params):
    return 2 * block_size(sum(_leaf_sizes(params)), ratio)  # values + indices

  return Compressor(init, compress, aggregate, payload)


def scaled(delta: float) -> Compressor:
  """C(A) = delta * A, for 0 < delta <= 1 (dense: sends every value).

  With one worker and lam = 1, error feedback with this C is SGD with
  exponential iterate averaging (paper Lemma C.1).
  """
  if isinstance(delta, bool) or not isinstance(delta, (int, float, np.number)):
    raise ValueError(f'delta must be a number in (0, 1], got {delta!r}')
  if not 0 < delta <= 1:
    raise ValueError(f'delta must be in (0, 1], got {delta!r}')
  delta = float(delta)

  def init(params):
    check_float_leaves(params)
    return optax.EmptyState()

  def compress(tree, state):
    del state
    return jax.tree.map(lambda x: delta * x, tree)

  def aggregate(tree, state, axis_name=None):
    mean = worker_mean(tree, axis_name)
    return (
        jax.tree.map(lambda x: delta * x, mean),
        jax.tree.map(lambda x: (1 - delta) * x, tree),
        state,
    )

  return Compressor(init, compress, aggregate, lambda p: sum(_leaf_sizes(p)))


def identity() -> Compressor:
  """No compression: C(A) = A, a dense all-reduce of every value."""

  def init(params):
    check_float_leaves(params)
    return optax.EmptyState()

  def compress(tree, state):
    del state
    return tree

  def aggregate(tree, state, axis_name=None):
    return (
        worker_mean(tree, axis_name),
        jax.tree.map(jnp.zeros_like, tree),
        state,
    )

  return Compressor(init, compress, aggregate, lambda p: sum(_leaf_sizes(p)))


class WarmupState(NamedTuple):
  """Steps taken, and the state of the compressor used after the warm-up."""

  count: jax.Array
  inner: Any


def dense_warmup(compressor: Compressor, steps: int) -> Compressor:
  """A dense all-reduce (C = identity) for ``steps`` steps, then ``compressor``.

  During the warm-up nothing is left behind (the error stays zero). Both
  collectives are in the compiled program; only one runs per step, chosen by
  the shared step count (under vmap, both run and one is selected).
  """
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
    raise ValueError(f'steps must be a non-negative integer, got {steps!r}')
  dense = identity()

  def init(params):
    return WarmupState(count=jnp.zeros([], jnp.int32), inner=compressor.init(params))

  def compress(tree, state):
    return jax.lax.cond(
        state.count < steps,
        lambda: dense.compress(tree, optax.EmptyState()),
        lambda: compressor.compress(tree, state.inner),
    )

  def aggregate(tree, state, axis_name=None):
    def dense_branch():
      mean_c, residual, _ = dense.aggregate(tree, optax.EmptyState(), axis_name)
      return mean_c, residual, state.inner

    def compressed_branch():
      return compressor.aggregate(tree, state.inner, axis_name)

    mean_c, residual, inner = jax.lax.cond(
        state.count < steps, dense_branch, compressed_branch
    )
    return mean_c, residual, WarmupState(count=optax.safe_increment(state.count), inner=inner)

  return Compressor(init, compress, aggregate, compressor.payload)
