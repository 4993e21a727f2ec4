"""Per-shard RBGS: one block per local shard, for workers sharded over a
'model' mesh axis (``defjax.layouts.sharded``).

Each device compresses only what it holds: for every leaf it reads its local
shard of n_local = n / M values (n for a leaf not sharded over ``'model'``)
and keeps one circular block of b_leaf = max(1, floor(n_local / ratio))
values, the per-leaf rule of ``defjax.rbgs(per_leaf=True)`` applied to each
shard. The start of model row r's block in leaf j is::

  randint(fold_in(fold_in(key, count), r), (L,), 0, n_local)[j]

with r = ``lax.axis_index('model')`` for a sharded leaf and r = 0 for a leaf
that every model device holds whole (so its copies stay equal). The key is
shared by all workers: every device of one model column selects the same
block, so C stays linear and shared, and the mean over workers is one
all-reduce **over the workers' axis only** of each device's block values.
Nothing of the parameters or the error is gathered over ``'model'``.

A leaf not sharded over ``'model'`` has the same block on all M devices of
a worker: its block values are averaged split over them (``SplitAxis``):
device r all-reduces slice r of the concatenated replicated blocks over the
workers and the M slices are all-gathered over ``'model'``, so each value
crosses to the other workers once per worker, not M times.

Payload: each device all-reduces, per step::

  b_device = sum over sharded leaves of max(1, floor(n / M / ratio))
             + ceil(sum over replicated leaves of max(1, floor(n / ratio)) / M)

values over its data group of K devices; a worker (M devices) sends
M * b_device values, the mesh K * M * b_device.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from defjax.compress.core import Compressor
from defjax.compress.core import KeyLike
from defjax.compress.core import PyTree
from defjax.compress.core import SplitAxis
from defjax.compress.core import advance
from defjax.compress.core import check_float_leaves
from defjax.compress.core import check_key
from defjax.compress.core import check_ratio
from defjax.compress.core import random_init
from defjax.compress.core import worker_mean
from defjax.compress.rbgs import circular_block
from defjax.compress.rbgs import place_block


def is_spec(x) -> bool:
  return isinstance(x, P)


def sharded_dim(spec: P, model_axis: str) -> Optional[int]:
  """The dimension ``spec`` shards over ``model_axis``, or None."""
  for dim, entry in enumerate(spec):
    names = entry if isinstance(entry, tuple) else (entry,)
    if model_axis in names:
      return dim
  return None


def check_param_specs(
    params: PyTree, param_specs: PyTree, mesh: Mesh, model_axis: str = 'model'
) -> None:
  """Raises ValueError unless ``param_specs`` fits ``params`` on ``mesh``.

  Each spec must be a PartitionSpec naming at most the model axis (the other
  axes hold the workers), and a sharded dimension must divide by its size.
  """
  model_size = mesh.shape[model_axis]
  workers = ', '.join(repr(a) for a in mesh.axis_names if a != model_axis)
  try:
    pairs = jax.tree.map(
        lambda s, x: (s, x), param_specs, params, is_leaf=is_spec
    )
  except ValueError as e:
    raise ValueError(
        f'param_specs must be a tree of PartitionSpec shaped like params: {e}'
    ) from None
  flat, _ = jax.tree_util.tree_flatten_with_path(
      pairs,
      is_leaf=lambda t: isinstance(t, tuple) and len(t) == 2 and is_spec(t[0]),
  )
  for path, (spec, x) in flat:
    where = jax.tree_util.keystr(path)
    if not is_spec(spec):
      raise ValueError(
          f'param_specs{where} must be a PartitionSpec, got {spec!r}'
      )
    shape = np.shape(x)
    if len(spec) > len(shape):
      raise ValueError(
          f'param_specs{where}={spec} has more entries than the leaf {shape}'
      )
    for dim, entry in enumerate(spec):
      names = entry if isinstance(entry, tuple) else (entry,)
      names = tuple(n for n in names if n is not None)
      if not names:
        continue
      if names != (model_axis,):
        raise ValueError(
            f'param_specs{where}={spec} may only name {model_axis!r}: the'
            f' {workers} axis holds the workers'
        )
      if shape[dim] % model_size:
        raise ValueError(
            f'params{where} dimension {dim} of size {shape[dim]} does not divide'
            f' over {model_size} model shards'
        )


def local_block_sizes(
    params: PyTree,
    param_specs: PyTree,
    ratio: float,
    model_axis_size: int,
    model_axis: str = 'model',
) -> list[int]:
  """Per leaf, the block one device keeps: max(1, floor(n_local / ratio))."""
  sizes = []
  for x, spec in zip(
      jax.tree.leaves(params), jax.tree.leaves(param_specs, is_leaf=is_spec)
  ):
    shards = 1 if sharded_dim(spec, model_axis) is None else model_axis_size
    sizes.append(max(1, int((np.size(x) // shards) // ratio)))
  return sizes


def per_shard_rbgs(
    ratio: float,
    param_specs: PyTree,
    mesh: Mesh,
    *,
    key: KeyLike = 0,
    model_axis: str = 'model',
) -> Compressor:
  """Per-shard RBGS: one circular block per local shard of each leaf.

  Each device keeps, of every leaf, one circular block of
  max(1, floor(n_local / ratio)) values of its own shard, at a start shared by
  all workers (see the module docstring for the key rule). ``aggregate``
  all-reduces over ``axis_name`` (the workers' axis) the device's blocks of
  sharded leaves, and its slice of the replicated leaves' blocks (then
  all-gathered over the model axis). Use it inside a step on ``mesh`` (the sharded
  layout's ``train_step``) or under ``jax.jit`` with the mesh's shardings;
  ``payload`` is per device.

  Args:
    ratio: compression ratio n_local / b per leaf, >= 1.
    param_specs: a PartitionSpec per parameter leaf over ``model_axis``.
    mesh: the workers' mesh, with a ``model_axis``.
    key: the shared block-selection key, as in ``defjax.rbgs``.
    model_axis: the axis a worker's devices span.

  Returns:
    A ``Compressor``.

  References:
    Xu & Huang, ICML 2022, Section 3 (RBGS) and Algorithm 1.
  """
  ratio = check_ratio(ratio)
  key = check_key(key)
  spec_leaves = jax.tree.leaves(param_specs, is_leaf=is_spec)
  sharded = [sharded_dim(s, model_axis) is not None for s in spec_leaves]
  random_state = random_init(key)

  def init(params):
    check_float_leaves(params)
    check_param_specs(params, param_specs, mesh, model_axis)
    return random_state(params)

  def local_blocks(leaves, raw_key, count):
    """Each leaf's (b, block indices, positions) in this device's flattened
    shard, as ``circular_block``."""
    sizes = [x.size for x in leaves]
    step_key = jax.random.fold_in(raw_key, count)
    row = jax.lax.axis_index(model_axis)
    maxval = jnp.asarray(sizes, jnp.int32)
    own = jax.random.randint(
        jax.random.fold_in(step_key, row), (len(sizes),), 0, maxval
    )
    shared = jax.random.randint(
        jax.random.fold_in(step_key, 0), (len(sizes),), 0, maxval
    )
    out = []
    for j, (x, n) in enumerate(zip(leaves, sizes)):
      b = max(1, int(n // ratio))
      start = (own if sharded[j] else shared)[j]
      out.append((b, *circular_block(start, n, b, x.shape)))
    return out

  def on_shards(fn, tree, state):
    """Runs ``fn(local_leaves, key, count)`` manual over the model axis."""
    # Inside the step the context mesh (manual over 'data') must be used as is.
    ctx = jax.sharding.get_abstract_mesh()
    context = None if model_axis in getattr(ctx, 'axis_names', ()) else mesh
    leaves, treedef = jax.tree.flatten(tree)
    return (
        jax.shard_map(
            fn,
            mesh=context,
            in_specs=(spec_leaves, P(), P()),
            out_specs=(spec_leaves, spec_leaves),
            axis_names={model_axis},
            check_vma=False,
        )(leaves, state.key, state.count),
        treedef,
    )

  def blocks(axis_name):
    def fn(leaves, raw_key, count):
      info = local_blocks(leaves, raw_key, count)
      dtype = jnp.result_type(*leaves)
      gathered = [
          jnp.ravel(x)[i].astype(dtype) for x, (_, i, _) in zip(leaves, info)
      ]
      parts = (
          gathered
          if axis_name is None
          else mean_over_workers(gathered, axis_name)
      )
      kept = [
          place_block(x, v, b, rel)
          for x, v, (b, _, rel) in zip(leaves, parts, info)
      ]
      residual = [
          jnp.where(rel < b, jnp.zeros_like(x), x)
          for x, (b, _, rel) in zip(leaves, info)
      ]
      return kept, residual

    return fn

  def mean_over_workers(gathered, axis_name):
    """Each leaf's block values averaged over the workers: the sharded
    leaves' blocks in one all-reduce, and the blocks of the leaves every
    model device holds whole (equal on all of them) split over the model
    devices (``SplitAxis``), so each crosses to the other workers once per
    worker rather than once per device."""
    out = list(gathered)
    for group, axis in (
        (sharded, axis_name),
        ([not s for s in sharded], SplitAxis(axis_name, model_axis)),
    ):
      members = [j for j, g in enumerate(group) if g]
      if members:
        mean = worker_mean(
            jnp.concatenate([gathered[j] for j in members]), axis
        )
        for j, v in zip(
            members,
            jnp.split(
                mean, np.cumsum([gathered[j].size for j in members])[:-1]
            ),
        ):
          out[j] = v
    return out

  def compress(tree, state):
    (kept, _), treedef = on_shards(blocks(None), tree, state)
    return treedef.unflatten(kept)

  def aggregate(tree, state, axis_name=None):
    (mean_c, residual), treedef = on_shards(blocks(axis_name), tree, state)
    return (
        treedef.unflatten(mean_c),
        treedef.unflatten(residual),
        advance(state),
    )

  def payload(params):
    m = mesh.shape[model_axis]
    sizes = local_block_sizes(params, param_specs, ratio, m, model_axis)
    replicated = sum(b for b, s in zip(sizes, sharded) if not s)
    return sum(b for b, s in zip(sizes, sharded) if s) + -(-replicated // m)

  return Compressor(init, compress, aggregate, payload)
