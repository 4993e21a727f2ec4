"""RBGS: one circular block of the flattened update, or one per leaf.

Both keep a block at a start drawn from the key every worker shares, so C is
linear and shared, and the mean over workers is one all-reduce of the block
values (paper Section 3; ``ALGORITHMS.md``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from defjax.compress.core import Compressor
from defjax.compress.core import KeyLike
from defjax.compress.core import PyTree
from defjax.compress.core import advance
from defjax.compress.core import block_size
from defjax.compress.core import check_key
from defjax.compress.core import check_ratio
from defjax.compress.core import leaf_sizes
from defjax.compress.core import random_init
from defjax.compress.core import step_key
from defjax.compress.core import worker_mean


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
      and trains far worse in the same steps (docs/guides/algorithm.md, RBGS).

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
    sizes = leaf_sizes(tree)
    d = sum(sizes)
    b = block_size(d, ratio)
    start = jax.random.randint(step_key(state), (), 0, d, dtype=jnp.int32)
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
        new = jnp.where(
            (r >= 0) & (r < b), jax.lax.dynamic_slice(flat, (lo,), (w,)), old
        )
        buf = jax.lax.dynamic_update_slice(buf, new, (at,))
      offset += n
    return buf[b : 2 * b]

  def place(tree, values, rel, b):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten(
        [place_block(x, values, b, r) for x, r in zip(leaves, rel)]
    )

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
        [jnp.where(r < b, zero.astype(x.dtype), x) for x, r in zip(leaves, rel)]
    )
    return place(tree, mean_values, rel, b), residual, advance(state)

  def payload(params):
    return block_size(sum(leaf_sizes(params)), ratio)

  return Compressor(random_init(key), compress, aggregate, payload)


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
  return [max(1, int(n // ratio)) for n in leaf_sizes(params)]


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
    sizes = leaf_sizes(tree)
    starts = jax.random.randint(
        step_key(state),
        (len(sizes),),
        0,
        jnp.asarray(sizes, jnp.int32),
        dtype=jnp.int32,
    )
    out = []
    for j, (x, n) in enumerate(zip(jax.tree.leaves(tree), sizes)):
      b = max(1, int(n // ratio))
      out.append((b, *circular_block(starts[j], n, b, jnp.shape(x))))
    return out

  def compress(tree, state):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten(
        [
            place_block(x, jnp.ravel(x)[i], b, rel)
            for x, (b, i, rel) in zip(leaves, blocks(state, tree))
        ]
    )

  def aggregate(tree, state, axis_name=None):
    leaves, treedef = jax.tree.flatten(tree)
    info = blocks(state, tree)
    dtype = jnp.result_type(*leaves)
    gathered = [
        jnp.ravel(x)[i].astype(dtype) for x, (_, i, _) in zip(leaves, info)
    ]
    # All leaf blocks in one buffer: one all-reduce per step, not one per leaf.
    mean_values = worker_mean(jnp.concatenate(gathered), axis_name)
    parts = jnp.split(mean_values, np.cumsum([b for b, _, _ in info])[:-1])
    mean_c = [
        place_block(x, v, b, rel)
        for x, v, (b, _, rel) in zip(leaves, parts, info)
    ]
    # Each leaf's 0 from that leaf's own gathered values: one 0 for all
    # leaves, from the first gathered value, left the copies (_zero_after).
    residual = [
        jnp.where(rel < b, _zero_after(v).astype(x.dtype), x)
        for x, v, (b, _, rel) in zip(leaves, gathered, info)
    ]
    return (
        treedef.unflatten(mean_c),
        treedef.unflatten(residual),
        advance(state),
    )

  def payload(params):
    return sum(per_leaf_block_sizes(params, ratio))

  return Compressor(random_init(key), compress, aggregate, payload)
