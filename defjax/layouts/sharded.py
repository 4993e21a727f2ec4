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

RBGS here is per shard (``defjax.compress.per_shard``): each device keeps a
block of every leaf's local shard, all-reduced over 'data' only; its module
docstring gives the block rule and the payload.

The step. ``train_step`` is a ``jax.shard_map`` that is manual over
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
from typing import Optional, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from defjax import compress
from defjax import feedback
from defjax.compress import per_shard
from defjax.layouts import base

PyTree = base.PyTree
_is_spec = per_shard.is_spec


def _sharding(mesh: Mesh, *entries) -> NamedSharding:
  """A NamedSharding in the form compiled outputs carry (axes of size 1 and
  trailing Nones dropped), so a step's outputs match its inputs and the step
  compiles once."""

  def keep(entry):
    names = tuple(
        n
        for n in (entry if isinstance(entry, tuple) else (entry,))
        if n is not None and mesh.shape[n] > 1
    )
    return names[0] if len(names) == 1 else (names or None)

  entries = [keep(e) for e in entries]
  while entries and entries[-1] is None:
    entries.pop()
  return NamedSharding(mesh, P(*entries))


def _replicated_specs(params: PyTree) -> PyTree:
  return jax.tree.map(lambda _: P(), params)


def _state_specs(state: PyTree, params: PyTree, param_specs: PyTree) -> PyTree:
  """A spec per leaf of ``state`` (without the worker axis): every subtree
  shaped like ``params`` (the error, the momentum) gets the parameters'
  specs, every other leaf (counters, keys, lam) ``P()``."""
  treedef = jax.tree.structure(params)
  shapes = [np.shape(x) for x in jax.tree.leaves(params)]

  def is_params(t):
    if _is_spec(t) or jax.tree.structure(t) != treedef:
      return False
    return [np.shape(x) for x in jax.tree.leaves(t)] == shapes

  return jax.tree.map(
      lambda t: param_specs if is_params(t) else P(), state, is_leaf=is_params
  )


def _constrain(tree, specs):
  """Pins ``tree`` to its model-axis specs inside the data-manual step."""
  return jax.tree.map(
      lambda s, x: jax.lax.with_sharding_constraint(x, s),
      specs,
      tree,
      is_leaf=_is_spec,
  )


@dataclasses.dataclass(frozen=True)
class ShardedLayout(base.Layout):
  """K workers of M devices each on a ('data', 'model') mesh of shape (K, M)."""

  mesh: Mesh
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
  def devices_per_worker(self) -> int:
    return self.model_axis_size

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
    mine = [
        k
        for k, row in enumerate(self.mesh.devices)
        if any(d.process_index == process_index for d in row)
    ]
    return slice(mine[0], mine[-1] + 1) if mine else slice(0, 0)

  def check_param_specs(self, params: PyTree, param_specs: PyTree) -> None:
    """Raises ValueError unless ``param_specs`` fits ``params`` on this mesh:
    PartitionSpecs naming at most the model axis (the data axis holds the
    workers), a sharded dimension divisible by M."""
    per_shard.check_param_specs(params, param_specs, self.mesh, self.model_axis)

  def param_shardings(self, params, param_specs=None):
    """Sharded over 'model' by the specs, replicated over 'data' (after
    ``check_param_specs``)."""
    if param_specs is None:
      param_specs = _replicated_specs(params)
    self.check_param_specs(params, param_specs)
    return jax.tree.map(
        lambda s: _sharding(self.mesh, *s), param_specs, is_leaf=_is_spec
    )

  def state_shardings(self, state, params, param_specs=None):
    """The worker axis, then the parameters' specs for every subtree of
    ``state`` shaped like ``params`` (the error, the momentum); only the
    worker axis for every other leaf (counters, keys, lam)."""
    if param_specs is None:
      param_specs = _replicated_specs(params)
    specs = _state_specs(state, params, param_specs)
    return jax.tree.map(
        lambda s: _sharding(self.mesh, self.data_axis, *s),
        specs,
        is_leaf=_is_spec,
    )

  def rbgs(self, ratio, param_specs=None, *, key=0, per_leaf):
    """Per-shard RBGS (``compress.per_shard_rbgs``): one block per local
    shard of each leaf, so ``per_leaf`` must be True."""
    if not per_leaf:
      raise ValueError(
          'the sharded layout keeps one RBGS block per leaf shard: per_leaf=True'
          ' (one global block would gather the model shards)'
      )
    if param_specs is None:
      raise ValueError(
          "the sharded layout's RBGS needs the params' PartitionSpecs"
      )
    return compress.per_shard_rbgs(
        ratio, param_specs, self.mesh, key=key, model_axis=self.model_axis
    )

  def check_collectives(self, tx, params, worker_opt_state):
    """As ``Layout.check_collectives``, per shard: traces ``tx.update`` under
    the step's data-manual ``shard_map`` and refuses

    * a collective over any axes but ``(data,)``: ``('data', 'model')``
      averages the model shards with each other, another name does not exist
      here, and none at all (K > 1) lets the workers' updates differ while
      the model is kept as one copy;
    * a collective over 'data' of anything but whole parameter-shaped leaves
      (elementwise, so each device reduces its own shard) or scalars, unless
      it runs inside a ``shard_map`` manual over 'model'. Such an operand,
      e.g. the block of a compressor built for the 1-D layout
      (``defjax.rbgs``), read from model-sharded leaves, makes XLA all-gather
      those leaves over 'model' every step. Per-shard RBGS all-reduces inside
      such a ``shard_map``; dense SGD (``defjax.data_parallel``) reduces whole
      leaves.
    """
    data, model = self.data_axis, self.model_axis
    params, worker_opt_state = base.abstract(params), base.abstract(
        worker_opt_state
    )
    update = jax.shard_map(
        lambda p, s: tx.update(p, s, p),
        mesh=self.mesh,
        in_specs=(P(), P()),
        out_specs=(P(), P()),
        axis_names={data},
        check_vma=False,
    )
    hint = (
        f'; build it with axis_name={data!r} (layout.axis_name) and, for RBGS,'
        ' the per-shard compressor layout.rbgs(ratio, param_specs, per_leaf=True)'
    )
    found = base.trace_collectives(
        lambda: jax.make_jaxpr(update)(params, worker_opt_state), hint
    )
    leaf_shapes = {tuple(x.shape) for x in jax.tree.leaves(params)}
    for axes, eqn, manual in found:
      if (
          eqn.primitive.name == 'all_gather'
          and set(axes) == {model}
          and model in manual
      ):
        continue  # the per-shard compressor gathers its split replicated blocks
      if set(axes) != {data}:
        raise ValueError(
            f"the transform reduces over {axes!r}, but this layout's workers span"
            f' {data!r} only ({model!r} holds the shards of one worker)' + hint
        )
      if model in manual or self.model_axis_size == 1:
        continue
      for operand in eqn.invars:
        if operand.aval.shape and tuple(operand.aval.shape) not in leaf_shapes:
          raise ValueError(
              f'the transform all-reduces a {operand.aval.str_short()} array over'
              f' {data!r} outside a shard_map over {model!r}: reading it out of the'
              f' model-sharded parameters (as a compressor built for the 1-D layout,'
              f' e.g. defjax.rbgs, does) all-gathers them over {model!r} every step'
              + hint
          )
    base.require_collectives(found, self.num_workers, hint)

  def train_step(
      self,
      loss_fn,
      tx,
      param_specs=None,
      *,
      sync_model_state=True,
      multi_step=False,
      donate=True,
      check_collectives=True,
  ):
    """As ``Layout.train_step``: ``loss_fn`` is ordinary (GSPMD) code that
    sees the whole parameters, sharded over 'model' by ``param_specs``; one
    step per call (no ``multi_step``) and one copy of the model state
    (``sync_model_state``), averaged over workers. Tracing it raises
    ValueError if ``tx`` reduces over other axes than 'data' or all-reduces
    anything but whole leaves outside a model-manual ``shard_map`` (e.g. a
    transform built with the 1-D ``defjax.rbgs``): see
    ``check_collectives``.
    """
    if multi_step:
      raise ValueError(
          'the sharded layout runs one step per call: no multi_step'
      )
    if not sync_model_state:
      raise ValueError(
          'the sharded layout keeps one copy of the model state:'
          ' sync_model_state=True'
      )
    data = self.data_axis

    def local_step(params, model_state, opt_state, batch):
      specs = _replicated_specs(params) if param_specs is None else param_specs
      self.check_param_specs(params, specs)  # once per trace
      opt_state, batch = jax.tree.map(lambda x: x[0], (opt_state, batch))
      point = _constrain(feedback.eval_point(params, opt_state), specs)
      (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          point, model_state, batch
      )
      grads = _constrain(grads, specs)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = _constrain(optax.apply_updates(params, updates), specs)
      opt_state = _constrain(opt_state, _state_specs(opt_state, params, specs))
      model_state = jax.lax.pmean(model_state, data)
      opt_state = jax.tree.map(lambda x: x[None], opt_state)
      return params, model_state, opt_state, jax.lax.pmean(loss, data)

    step = jax.shard_map(
        local_step,
        mesh=self.mesh,
        in_specs=(P(), P(), P(data), P(data)),
        out_specs=(P(), P(), P(data), P()),
        axis_names={data},
        check_vma=False,
    )

    def checked_step(params, model_state, opt_state, batch):
      # Once per trace: refuse a transform that would reduce or gather over 'model'.
      if check_collectives:
        worker_state = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), opt_state
        )
        self.check_collectives(tx, params, worker_state)
      return step(params, model_state, opt_state, batch)

    return jax.jit(checked_step, donate_argnums=(0, 1, 2) if donate else ())

  def averaged_params(self, param_specs=None):
    """As ``Layout.averaged_params``, sharded like the params: one all-reduce
    over 'data' of each device's shard of the error. Manual over both axes:
    it is elementwise, and XLA's partitioner rejects a data-axis all-reduce
    of a model-sharded operand when the data axis has size 1."""
    data = self.data_axis

    def average(params, opt_state):
      specs = _replicated_specs(params) if param_specs is None else param_specs
      shapes = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), opt_state
      )
      state_specs = jax.tree.map(
          lambda s: P(data, *s),
          _state_specs(shapes, params, specs),
          is_leaf=_is_spec,
      )

      def local(params, opt_state):
        opt_state = jax.tree.map(lambda x: x[0], opt_state)
        return feedback.averaged_params(params, opt_state, axis_name=data)

      return jax.shard_map(
          local,
          mesh=self.mesh,
          in_specs=(specs, state_specs),
          out_specs=specs,
          check_vma=False,
      )(params, opt_state)

    return jax.jit(average)

  def dense_payload(self, params, param_specs=None) -> int:
    """Its shards' values (and the unsharded leaves' whole values)."""
    if param_specs is None:
      param_specs = _replicated_specs(params)
    return sum(
        per_shard.local_block_sizes(
            params, param_specs, 1.0, self.model_axis_size, self.model_axis
        )
    )

  @classmethod
  def check_config(cls, config) -> None:
    """K workers of M = model_axis_size devices each, one step per call."""
    k, m, n = config.num_workers, config.model_axis_size, jax.device_count()
    if n % m:
      raise ValueError(f'model_axis_size={m} must divide the {n} devices')
    if k * m > n:
      raise ValueError(
          f'num_workers={k} x model_axis_size={m} needs {k * m} devices, only {n} are'
          f' available (workers of several devices are not simulated: use num_workers'
          f' <= {n // m})'
      )
    for unsupported, what in (
        (
            config.steps_per_dispatch > 1,
            'steps_per_dispatch > 1 (it runs one step per call)',
        ),
        (
            not config.sync_batch_stats,
            'sync_batch_stats=False (it keeps one copy of the' ' model state)',
        ),
        (
            not config.optim.per_leaf,
            'optim.per_leaf=False (per-shard RBGS keeps one block'
            ' per leaf shard)',
        ),
    ):
      if unsupported:
        raise ValueError(f'model_axis_size > 1 does not support {what}')

  @classmethod
  def from_config(cls, config) -> ShardedLayout:
    return make_layout(config.num_workers, config.model_axis_size)

  @classmethod
  def devices_for(cls, config) -> int:
    return config.num_workers * config.model_axis_size


def make_layout(
    num_workers: int,
    model_axis_size: int = 1,
    devices: Optional[Sequence[jax.Device]] = None,
) -> ShardedLayout:
  """A ('data', 'model') mesh of K x M devices: K workers of M devices each.

  Devices are ordered as in ``data_parallel.make_layout`` (process, then id)
  and filled row by row, so a worker's M devices are consecutive: on a
  multi-host machine the model-axis traffic (every layer's activations)
  stays inside a host and only the blocks cross hosts, over 'data'.

  Raises:
    ValueError: if K or M is not a positive integer or K * M devices are not
      available.
  """
  base.check_positive(num_workers=num_workers, model_axis_size=model_axis_size)
  devices = base.sorted_devices(devices)
  need = num_workers * model_axis_size
  if need > len(devices):
    raise ValueError(
        f'num_workers={num_workers} x model_axis_size={model_axis_size} needs'
        f' {need} devices, only {len(devices)} are available'
    )
  grid = np.asarray(devices[:need]).reshape(num_workers, model_axis_size)
  auto = jax.sharding.AxisType.Auto
  return ShardedLayout(Mesh(grid, ('data', 'model'), axis_types=(auto, auto)))
