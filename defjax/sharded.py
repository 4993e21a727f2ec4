"""Workers that are themselves sharded: DEF on a ('data', 'model') mesh.

A model too large for one device is sharded over a ``'model'`` axis (tensor
parallelism) while data parallelism runs across the ``'data'`` axis. Each of
the K data-parallel workers of the paper is then a group of M devices (one
row of the mesh) that together hold x, e_k and m_k:

* ``params`` x: the user's PartitionSpec over ``'model'`` (e.g. Megatron's
  ``P(None, 'model')`` for a column-parallel weight), replicated over
  ``'data'``.
* per-worker state (e_k, m_k) and the batch: a leading worker axis K over
  ``'data'``, then the parameter's own spec: ``P('data', *spec)``.

A Flax model annotated with ``nn.with_partitioning(init, (None, 'model'))``
gives its spec tree as ``nn.get_partition_spec(variables)['params']`` and its
plain params as ``nn.unbox(variables)['params']``.

Per-shard RBGS (``rbgs`` here). Each device compresses only what it holds:
for every leaf it reads its local shard of n_local = n / M values (n for a
leaf not sharded over ``'model'``) and keeps one circular block of
b_leaf = max(1, floor(n_local / ratio)) values, the per-leaf rule of
``defjax.rbgs(per_leaf=True)`` applied to each shard. The start of model row
r's block in leaf j is

  randint(fold_in(fold_in(key, count), r), (L,), 0, n_local)[j]

with r = ``lax.axis_index('model')`` for a sharded leaf and r = 0 for a leaf
that every model device holds whole (so its copies stay equal). The key is
shared by all workers: every device of one model column selects the same
block, so C stays linear and shared, and the mean over workers is one
all-reduce **over 'data' only** of each device's block values. Nothing of the
parameters or the error is gathered over ``'model'``.

Payload: each device all-reduces, per step,

  b_device = sum over leaves of max(1, floor(n_local / ratio))

values over its data group of K devices; a worker (M devices) sends
M * b_device values, the mesh K * M * b_device. (A leaf not sharded over
``'model'`` is sent by each of the M devices of a worker: keep such leaves
small, as biases and norms are.)

The step. ``make_train_step`` is a ``jax.shard_map`` that is manual over
``'data'`` only (``axis_names={'data'}``): inside, one worker's loss and
gradient are ordinary GSPMD code over ``'model'``, so a user's usual
tensor-parallel model (Flax ``nn.with_partitioning`` or any jit-sharded
function) runs unchanged, with the model-axis collectives XLA derives from
the parameter shardings. The compressor alone goes fully manual: a nested
``shard_map`` over ``'model'`` hands each device its local shards, so the
block gather and scatter are local by construction rather than left to
GSPMD's gather partitioning. The transform is ``feedback.error_feedback``
unchanged, built with ``axis_name='data'``; the detached point, the update
and the error keep the parameters' model sharding (constrained in the step,
and checked from the compiled HLO with ``wire.transfers`` in
tests/test_sharded.py).

Why not manual over both axes: the user's loss would have to be written for
local shards with explicit model-axis psums (Megatron by hand); partial-manual
keeps the model code ordinary and confines manual code to the compressor.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from defjax import compress as compress_lib
from defjax import feedback
from defjax import parallel

PyTree = Any


def _is_spec(x) -> bool:
  return isinstance(x, P)


def _sharding(mesh: Mesh, *entries) -> NamedSharding:
  """A NamedSharding in the form compiled outputs carry (axes of size 1 and
  trailing Nones dropped), so a step's outputs match its inputs and the step
  compiles once."""
  def keep(entry):
    names = tuple(n for n in (entry if isinstance(entry, tuple) else (entry,))
                  if n is not None and mesh.shape[n] > 1)
    return names[0] if len(names) == 1 else (names or None)

  entries = [keep(e) for e in entries]
  while entries and entries[-1] is None:
    entries.pop()
  return NamedSharding(mesh, P(*entries))


# --------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class ShardedLayout(parallel.MeshLayout):
  """K workers of M devices each on a ('data', 'model') mesh of shape (K, M)."""

  data_axis: str = 'data'
  model_axis: str = 'model'

  @property
  def axis_name(self) -> str:
    """The axis name to give defjax transforms built for this layout."""
    return self.data_axis

  @property
  def num_workers(self) -> int:
    return self.mesh.shape[self.data_axis]

  @property
  def model_axis_size(self) -> int:
    return self.mesh.shape[self.model_axis]

  @property
  def num_devices(self) -> int:
    """K * M, all the devices of the mesh."""
    return self.mesh.size

  @property
  def per_worker(self) -> NamedSharding:
    """A (K, ...) per-worker array such as the batch, replicated over 'model'."""
    return NamedSharding(self.mesh, P(self.data_axis))

  def worker_rows(self, process_index: Optional[int] = None) -> slice:
    """The workers (rows of a per-worker array) with a device on a process.

    Each process loads only these rows of the per-worker batch; a worker
    whose M devices span two processes is loaded by both.
    """
    if process_index is None:
      process_index = jax.process_index()
    mine = [k for k, row in enumerate(self.mesh.devices)
            if any(d.process_index == process_index for d in row)]
    return slice(mine[0], mine[-1] + 1) if mine else slice(0, 0)

  def global_batch(self, local: np.ndarray, *, stacked: bool = False) -> jax.Array:
    """A (K, ...) per-worker array from this process's rows ``worker_rows()`` of it.

    As ``parallel.WorkerLayout.global_batch``; the step runs one step per
    call, so ``stacked`` (n steps' arrays) is not supported.
    """
    if stacked:
      raise ValueError('the sharded step runs one step per call: no stacked batches')
    return parallel.global_from_rows(local, self.worker_rows(), self.num_workers,
                                     self.per_worker)

  def param_shardings(self, param_specs: PyTree) -> PyTree:
    """NamedShardings of the params (replicated over 'data')."""
    return jax.tree.map(lambda s: _sharding(self.mesh, *s), param_specs, is_leaf=_is_spec)

  def state_shardings(self, state: PyTree, params: PyTree, param_specs: PyTree) -> PyTree:
    """NamedShardings of a stacked (K, ...) per-worker optimizer state.

    Every subtree of ``state`` shaped like ``params`` (the error, the
    momentum) gets the worker axis then the parameters' specs; every other
    leaf (counters, keys, lam) only the worker axis.
    """
    specs = _state_specs(state, params, param_specs)
    return jax.tree.map(
        lambda s: _sharding(self.mesh, self.data_axis, *s), specs, is_leaf=_is_spec)


def make_layout(
    num_workers: int,
    model_axis_size: int = 1,
    devices: Optional[Sequence[jax.Device]] = None,
) -> ShardedLayout:
  """A ('data', 'model') mesh of K x M devices: K workers of M devices each.

  Devices are ordered as in ``parallel.make_layout`` (process, then id) and
  filled row by row, so a worker's M devices are consecutive: on a multi-host
  machine the model-axis traffic (every layer's activations) stays inside a
  host and only the blocks cross hosts, over 'data'.

  Raises:
    ValueError: if K or M is not a positive integer or K * M devices are not
      available.
  """
  for name, value in (('num_workers', num_workers), ('model_axis_size', model_axis_size)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f'{name} must be a positive integer, got {value!r}')
  if devices is None:
    devices = jax.devices()
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  need = num_workers * model_axis_size
  if need > len(devices):
    raise ValueError(
        f'num_workers={num_workers} x model_axis_size={model_axis_size} needs'
        f' {need} devices, only {len(devices)} are available')
  grid = np.asarray(devices[:need]).reshape(num_workers, model_axis_size)
  auto = jax.sharding.AxisType.Auto
  return ShardedLayout(Mesh(grid, ('data', 'model'), axis_types=(auto, auto)))


def check_param_specs(params: PyTree, param_specs: PyTree, layout: ShardedLayout) -> None:
  """Raises ValueError unless ``param_specs`` fits ``params`` on ``layout``.

  Each spec must be a PartitionSpec naming at most the model axis (the data
  axis is the workers'), and a sharded dimension must divide by M.
  """
  try:
    pairs = jax.tree.map(lambda s, x: (s, x), param_specs, params, is_leaf=_is_spec)
  except ValueError as e:
    raise ValueError(f'param_specs must be a tree of PartitionSpec shaped like params: {e}'
                     ) from None
  flat, _ = jax.tree_util.tree_flatten_with_path(
      pairs, is_leaf=lambda t: isinstance(t, tuple) and len(t) == 2 and _is_spec(t[0]))
  for path, (spec, x) in flat:
    where = jax.tree_util.keystr(path)
    if not _is_spec(spec):
      raise ValueError(f'param_specs{where} must be a PartitionSpec, got {spec!r}')
    shape = np.shape(x)
    if len(spec) > len(shape):
      raise ValueError(f'param_specs{where}={spec} has more entries than the leaf {shape}')
    for dim, entry in enumerate(spec):
      names = entry if isinstance(entry, tuple) else (entry,)
      names = tuple(n for n in names if n is not None)
      if not names:
        continue
      if names != (layout.model_axis,):
        raise ValueError(
            f'param_specs{where}={spec} may only name {layout.model_axis!r}: the'
            f' {layout.data_axis!r} axis holds the workers')
      if shape[dim] % layout.model_axis_size:
        raise ValueError(
            f'params{where} dimension {dim} of size {shape[dim]} does not divide'
            f' over {layout.model_axis_size} model shards')


def _sharded_dim(spec: P, model_axis: str) -> Optional[int]:
  for dim, entry in enumerate(spec):
    names = entry if isinstance(entry, tuple) else (entry,)
    if model_axis in names:
      return dim
  return None


def _state_specs(state: PyTree, params: PyTree, param_specs: PyTree) -> PyTree:
  """A spec per leaf of ``state`` (without the worker axis); see state_shardings."""
  treedef = jax.tree.structure(params)
  shapes = [np.shape(x) for x in jax.tree.leaves(params)]

  def is_params(t):
    if _is_spec(t) or jax.tree.structure(t) != treedef:
      return False
    return [np.shape(x) for x in jax.tree.leaves(t)] == shapes

  return jax.tree.map(lambda t: param_specs if is_params(t) else P(), state, is_leaf=is_params)


def param_shardings(param_specs: PyTree, params: PyTree, layout: ShardedLayout) -> PyTree:
  """The params' NamedShardings on the layout (sharded over 'model' by their
  specs, replicated over 'data'), after ``check_param_specs``; ``params`` may
  be abstract (``jax.eval_shape``), e.g. to initialise x already sharded."""
  check_param_specs(params, param_specs, layout)
  return layout.param_shardings(param_specs)


def shard_params(params: PyTree, layout: ShardedLayout, param_specs: PyTree) -> PyTree:
  """``params`` placed on the layout: sharded over 'model' by their specs."""
  return jax.device_put(params, param_shardings(param_specs, params, layout))


def init_worker_state(tx: optax.GradientTransformation, params: PyTree,
                      layout: ShardedLayout, param_specs: PyTree) -> PyTree:
  """``tx.init`` for every worker, stacked on the worker axis and sharded."""
  init = jax.vmap(tx.init, in_axes=None, axis_size=layout.num_workers)
  shardings = layout.state_shardings(jax.eval_shape(tx.init, params), params, param_specs)
  return jax.jit(init, out_shardings=shardings)(params)


# ----------------------------------------------------------- per-shard RBGS


def local_block_sizes(params: PyTree, param_specs: PyTree, ratio: float,
                      model_axis_size: int, model_axis: str = 'model') -> list[int]:
  """Per leaf, the block one device keeps: max(1, floor(n_local / ratio))."""
  sizes = []
  for x, spec in zip(jax.tree.leaves(params), jax.tree.leaves(param_specs, is_leaf=_is_spec)):
    shards = 1 if _sharded_dim(spec, model_axis) is None else model_axis_size
    sizes.append(max(1, int((np.size(x) // shards) // ratio)))
  return sizes


def rbgs(
    ratio: float,
    param_specs: PyTree,
    layout: ShardedLayout,
    *,
    key: compress_lib.KeyLike = 0,
) -> compress_lib.Compressor:
  """Per-shard RBGS: one circular block per local shard of each leaf.

  Each device keeps, of every leaf, one circular block of
  max(1, floor(n_local / ratio)) values of its own shard, at a start shared by
  all workers (see the module docstring for the key rule). ``aggregate``'s
  only collective is one all-reduce over ``axis_name`` (the data axis) of the
  device's block values. Use it inside ``make_train_step``'s step (or any
  code under the layout's mesh); ``payload`` is per device.

  Args:
    ratio: compression ratio n_local / b per leaf, >= 1.
    param_specs: a PartitionSpec per parameter leaf over the model axis.
    layout: from ``make_layout``.
    key: the shared block-selection key, as in ``defjax.rbgs``.

  Returns:
    A ``Compressor``.

  References:
    Xu & Huang, ICML 2022, Section 3 (RBGS) and Algorithm 1.
  """
  ratio = compress_lib.check_ratio(ratio)
  key = compress_lib.check_key(key)
  model_axis = layout.model_axis
  spec_leaves = jax.tree.leaves(param_specs, is_leaf=_is_spec)
  sharded = [_sharded_dim(s, model_axis) is not None for s in spec_leaves]

  def init(params):
    compress_lib.check_float_leaves(params)
    check_param_specs(params, param_specs, layout)
    return compress_lib.RandomState(
        key=compress_lib.as_key(key), count=jnp.zeros([], jnp.int32))

  def local_blocks(leaves, raw_key, count):
    """Each leaf's (b, block indices, positions) in this device's flattened
    shard, as ``compress.circular_block``."""
    sizes = [x.size for x in leaves]
    step_key = jax.random.fold_in(raw_key, count)
    row = jax.lax.axis_index(model_axis)
    maxval = jnp.asarray(sizes, jnp.int32)
    own = jax.random.randint(jax.random.fold_in(step_key, row), (len(sizes),), 0, maxval)
    shared = jax.random.randint(jax.random.fold_in(step_key, 0), (len(sizes),), 0, maxval)
    out = []
    for j, (x, n) in enumerate(zip(leaves, sizes)):
      b = max(1, int(n // ratio))
      start = (own if sharded[j] else shared)[j]
      out.append((b, *compress_lib.circular_block(start, n, b, x.shape)))
    return out

  def on_shards(fn, tree, state):
    """Runs ``fn(local_leaves, key, count)`` manual over the model axis."""
    # Inside the step the context mesh (manual over 'data') must be used as is.
    ctx = jax.sharding.get_abstract_mesh()
    mesh = None if model_axis in getattr(ctx, 'axis_names', ()) else layout.mesh
    leaves, treedef = jax.tree.flatten(tree)
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(spec_leaves, P(), P()),
        out_specs=(spec_leaves, spec_leaves),
        axis_names={model_axis},
        check_vma=False,
    )(leaves, state.key, state.count), treedef

  def blocks(axis_name):
    def fn(leaves, raw_key, count):
      info = local_blocks(leaves, raw_key, count)
      dtype = jnp.result_type(*leaves)
      values = jnp.concatenate([jnp.ravel(x)[i].astype(dtype) for x, (_, i, _) in zip(leaves, info)])
      if axis_name is not None:
        values = compress_lib.worker_mean(values, axis_name)  # b_device values
      parts = jnp.split(values, np.cumsum([b for b, _, _ in info])[:-1])
      kept = [compress_lib.place_block(x, v, b, rel)
              for x, v, (b, _, rel) in zip(leaves, parts, info)]
      residual = [jnp.where(rel < b, jnp.zeros_like(x), x) for x, (b, _, rel) in zip(leaves, info)]
      return kept, residual
    return fn

  def compress(tree, state):
    (kept, _), treedef = on_shards(blocks(None), tree, state)
    return treedef.unflatten(kept)

  def aggregate(tree, state, axis_name=None):
    (mean_c, residual), treedef = on_shards(blocks(axis_name), tree, state)
    return (treedef.unflatten(mean_c), treedef.unflatten(residual),
            compress_lib.RandomState(key=state.key, count=optax.safe_increment(state.count)))

  def payload(params):
    return sum(local_block_sizes(params, param_specs, ratio, layout.model_axis_size, model_axis))

  return compress_lib.Compressor(init, compress, aggregate, payload)


# ------------------------------------------------------------------- the step


def check_worker_collectives(tx: optax.GradientTransformation, params: PyTree,
                             worker_opt_state: PyTree, layout: ShardedLayout) -> None:
  """Raises ValueError unless ``tx.update`` reduces over the data axis only, per shard.

  The sharded counterpart of ``parallel.check_worker_collectives``. Traces
  ``tx.update`` abstractly (no compute) under the step's data-manual
  ``shard_map`` and refuses:

  * a collective over any axes but ``(data,)``: ``('data', 'model')``
    averages the model shards with each other, another name does not exist
    here, and none at all (K > 1) lets the workers' updates differ while the
    model is kept as one copy;
  * a collective over 'data' of anything but whole parameter-shaped leaves
    (elementwise, so each device reduces its own shard) or scalars, unless it
    runs inside a ``shard_map`` manual over 'model'. Such an operand, e.g.
    the block of a compressor built for the 1-D layout (``defjax.rbgs``),
    read from model-sharded leaves, makes XLA all-gather those leaves over
    'model' every step. Per-shard ``rbgs`` all-reduces inside such a
    ``shard_map``; dense SGD (``defjax.data_parallel``) reduces whole leaves.

  Args:
    tx: the per-worker transform.
    params: the params (arrays or ShapeDtypeStructs).
    worker_opt_state: one worker's optimizer state (no worker axis).
    layout: from ``make_layout``.
  """
  data, model = layout.data_axis, layout.model_axis
  shape = lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
  params = jax.tree.map(shape, params)
  worker_opt_state = jax.tree.map(shape, worker_opt_state)
  update = jax.shard_map(lambda p, s: tx.update(p, s, p), mesh=layout.mesh,
                         in_specs=(P(), P()), out_specs=(P(), P()), axis_names={data},
                         check_vma=False)
  hint = (f'; build it with axis_name={data!r} (layout.axis_name) and, for RBGS,'
          ' the per-shard compressor sharded.rbgs(ratio, param_specs, layout)')
  try:
    jaxpr = jax.make_jaxpr(update)(params, worker_opt_state)
  except NameError as e:  # a collective over an axis this layout lacks
    raise ValueError(f'the transform uses a collective over an axis this layout lacks'
                     f' ({e})' + hint) from None
  found = list(parallel.collective_eqns(jaxpr.jaxpr))
  leaf_shapes = {tuple(x.shape) for x in jax.tree.leaves(params)}
  for axes, eqn, manual in found:
    if set(axes) != {data}:
      raise ValueError(
          f'the transform reduces over {axes!r}, but this layout\'s workers span'
          f' {data!r} only ({model!r} holds the shards of one worker)' + hint)
    if model in manual or layout.model_axis_size == 1:
      continue
    for operand in eqn.invars:
      if operand.aval.shape and tuple(operand.aval.shape) not in leaf_shapes:
        raise ValueError(
            f'the transform all-reduces a {operand.aval.str_short()} array over'
            f' {data!r} outside a shard_map over {model!r}: reading it out of the'
            f' model-sharded parameters (as a compressor built for the 1-D layout,'
            f' e.g. defjax.rbgs, does) all-gathers them over {model!r} every step'
            + hint)
  if layout.num_workers > 1 and not found:
    raise ValueError(
        f'the transform has no collective over the {layout.num_workers} workers,'
        ' so their updates would differ while the model is kept as one copy' + hint)


def _constrain(tree, specs):
  """Pins ``tree`` to its model-axis specs inside the data-manual step."""
  return jax.tree.map(lambda s, x: jax.lax.with_sharding_constraint(x, s), specs, tree,
                      is_leaf=_is_spec)


def make_train_step(
    loss_fn: Callable[[Any, Any, Any], tuple[jax.Array, Any]],
    tx: optax.GradientTransformation,
    layout: ShardedLayout,
    param_specs: PyTree,
    *,
    donate: bool = True,
):
  """The jitted step of K tensor-parallel workers on a ('data', 'model') mesh.

  Args:
    loss_fn: ``loss_fn(params, model_state, batch) -> (loss, new_model_state)``
      for one worker's batch, written as ordinary (GSPMD) code: it sees the
      whole parameters, sharded over 'model' by ``param_specs``.
    tx: the per-worker transform built with ``axis_name=layout.axis_name``,
      e.g. ``error_feedback(inner, sharded.rbgs(ratio, param_specs, layout),
      lam=0.3, axis_name='data')``.
    layout: from ``make_layout``.
    param_specs: the params' PartitionSpecs over the model axis.
    donate: donate params, model state and optimizer state buffers.

  Returns:
    ``step(params, model_state, opt_state, batch) -> (params, model_state,
    opt_state, loss)``: batch leaves have a leading worker axis K; the model
    state (replicated, e.g. no state at all: ``{}``) is averaged over
    workers; ``loss`` is the mean over workers. Tracing it raises ValueError
    if ``tx`` reduces over other axes than 'data' or all-reduces anything
    but whole leaves outside a model-manual ``shard_map`` (e.g. a transform
    built with the 1-D ``defjax.rbgs``): see ``check_worker_collectives``.
  """
  data = layout.data_axis

  def local_step(params, model_state, opt_state, batch):
    check_param_specs(params, param_specs, layout)  # once per trace
    opt_state, batch = jax.tree.map(lambda x: x[0], (opt_state, batch))
    point = _constrain(feedback.eval_point(params, opt_state), param_specs)
    (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        point, model_state, batch)
    grads = _constrain(grads, param_specs)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = _constrain(optax.apply_updates(params, updates), param_specs)
    opt_state = _constrain(opt_state, _state_specs(opt_state, params, param_specs))
    model_state = jax.lax.pmean(model_state, data)
    opt_state = jax.tree.map(lambda x: x[None], opt_state)
    return params, model_state, opt_state, jax.lax.pmean(loss, data)

  step = jax.shard_map(
      local_step, mesh=layout.mesh,
      in_specs=(P(), P(), P(data), P(data)),
      out_specs=(P(), P(), P(data), P()),
      axis_names={data}, check_vma=False)

  def checked_step(params, model_state, opt_state, batch):
    # Once per trace: refuse a transform that would reduce or gather over 'model'.
    worker_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), opt_state)
    check_worker_collectives(tx, params, worker_state, layout)
    return step(params, model_state, opt_state, batch)

  return jax.jit(checked_step, donate_argnums=(0, 1, 2) if donate else ())


def make_averaged_params(layout: ShardedLayout, param_specs: PyTree):
  """``f(params, opt_state) -> y = x - mean_k e_k``, sharded like the params.

  One all-reduce over 'data' of each device's shard of the error: for
  evaluation and export, not the step. Manual over both axes: it is
  elementwise, and XLA's partitioner rejects a data-axis all-reduce of a
  model-sharded operand when the data axis has size 1.
  """
  data = layout.data_axis

  def average(params, opt_state):
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), opt_state)
    state_specs = jax.tree.map(lambda s: P(data, *s), _state_specs(shapes, params, param_specs),
                               is_leaf=_is_spec)

    def local(params, opt_state):
      opt_state = jax.tree.map(lambda x: x[0], opt_state)
      return feedback.averaged_params(params, opt_state, axis_name=data)

    return jax.shard_map(local, mesh=layout.mesh, in_specs=(param_specs, state_specs),
                         out_specs=param_specs, check_vma=False)(params, opt_state)

  return jax.jit(average)
