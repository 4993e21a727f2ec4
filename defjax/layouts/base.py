"""The layout interface: where the K workers of Algorithm 1 live on the devices.

A layout places, on its mesh,

* x (``params``): ``param_shardings``;
* every worker's optimizer state (e_k, m_k, the compressor's key and count),
  stacked on a leading worker axis of length K: ``state_shardings``,
  ``init_state``;
* the batch, and any other per-worker array (K, ...): ``per_worker``, each
  process filling only its own workers' rows (``worker_rows``,
  ``global_batch``);

and builds what runs there: the RBGS it needs (``rbgs``), the jitted step
(``train_step``, which refuses a transform whose collectives do not reduce
over exactly the workers: ``check_collectives``), DEF's output model
y = x - mean_k e_k (``averaged_params``), and what one worker sends per
step (``dense_payload``, ``bytes_per_step``). For the training program it
says whether a config can run on it (``check_config``), builds itself for
one (``from_config``) and how many CPU devices a CPU-only machine should
create for it (``devices_for``).

Methods that place x take ``param_specs``, the params' PartitionSpecs (a
Flax model's ``nn.with_partitioning`` annotations, ``P()`` for the others);
None means replicated, and a layout that replicates x ignores them.

One module per layout: ``data_parallel`` (a 1-D mesh, x replicated),
``sharded`` (a ('data', 'model') mesh, a worker is M model-sharded devices)
and ``hosts`` (a ('data', 'replica') mesh, a worker is a host of M
data-parallel devices).
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from defjax import compress
from defjax import feedback
from defjax import wire

PyTree = Any
# loss_fn(params, model_state, batch) -> (loss, new_model_state), one worker's.
LossFn = Callable[[Any, Any, Any], tuple[jax.Array, Any]]


class Layout(abc.ABC):
  """Where the K workers live: their mesh, where x, their state and their
  batch are, and the step that runs there (see the module docstring).

  Attributes:
    mesh (jax.sharding.Mesh): the devices the workers run on.
    num_workers: K.
    devices_per_worker: M, the devices one worker spans (its payload is sent
      by each of them).
    axis_name: the axis name(s) to build defjax transforms for this layout
      with (their collectives reduce over exactly the workers).
  """

  mesh: Mesh
  num_workers: int

  @property
  def devices_per_worker(self) -> int:
    return 1

  @property
  @abc.abstractmethod
  def axis_name(self):
    ...

  @property
  def num_devices(self) -> int:
    """The devices of the mesh."""
    return self.mesh.size

  # --------------------------------------------------------- where things are

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  @abc.abstractmethod
  def per_worker(self) -> NamedSharding:
    """A (K, ...) per-worker array such as the batch."""

  @abc.abstractmethod
  def worker_rows(self, process_index: Optional[int] = None) -> slice:
    """The workers (rows of a per-worker array) a process loads."""

  def global_batch(
      self, local: np.ndarray, *, stacked: bool = False
  ) -> jax.Array:
    """A (K, ...) per-worker array from this process's rows ``worker_rows()``.

    Each device gets its workers' rows, and no process reads another's.
    ``stacked`` (n steps' arrays, for a ``multi_step`` step) only where the
    layout's step supports it.
    """
    if stacked:
      raise ValueError(
          f'{type(self).__name__} runs one step per call: no stacked batches'
      )
    return global_from_rows(
        local, self.worker_rows(), self.num_workers, self.per_worker
    )

  @abc.abstractmethod
  def param_shardings(
      self, params: PyTree, param_specs: PyTree = None
  ) -> PyTree:
    """x's NamedShardings, a tree like ``params`` (arrays or abstract, e.g.
    ``jax.eval_shape``'s, to initialise x already in place)."""

  @abc.abstractmethod
  def state_shardings(
      self, state: PyTree, params: PyTree, param_specs: PyTree = None
  ) -> PyTree:
    """NamedShardings of a stacked (K, ...) per-worker optimizer state, a
    tree like ``state`` (one worker's, without the worker axis)."""

  def init_state(
      self,
      tx: optax.GradientTransformation,
      params: PyTree,
      param_specs: PyTree = None,
  ) -> PyTree:
    """``tx.init`` for every worker, stacked on the worker axis and placed."""
    init = jax.vmap(tx.init, in_axes=None, axis_size=self.num_workers)
    shardings = self.state_shardings(
        jax.eval_shape(tx.init, params), params, param_specs
    )
    return jax.jit(init, out_shardings=shardings)(params)

  # ------------------------------------------------------- what runs there

  @abc.abstractmethod
  def rbgs(
      self,
      ratio: float,
      param_specs: PyTree = None,
      *,
      key: compress.KeyLike = 0,
      per_leaf: bool,
  ) -> compress.Compressor:
    """RBGS as this layout's step needs it: blocks a device can cut from what
    it holds (``defjax.rbgs``'s global or per-leaf blocks, or per shard)."""

  @abc.abstractmethod
  def check_collectives(
      self,
      tx: optax.GradientTransformation,
      params: PyTree,
      worker_opt_state: PyTree,
  ) -> None:
    """Raises ValueError unless ``tx.update`` reduces over exactly the workers.

    The step keeps one copy of the update, which is right only if the update
    is the same on every worker; a transform built with another
    ``axis_name`` would silently train on some workers' gradients only.
    Traces ``tx.update`` abstractly (no compute), so it sees through
    ``optax.chain`` and friends. ``worker_opt_state``: one worker's.
    """

  @abc.abstractmethod
  def train_step(
      self,
      loss_fn: LossFn,
      tx: optax.GradientTransformation,
      param_specs: PyTree = None,
      *,
      sync_model_state: bool = True,
      multi_step: bool = False,
      donate: bool = True,
      check_collectives: bool = True,
  ):
    """The jitted step of any defjax (or optax) transform on this layout.

    Args:
      loss_fn: ``loss_fn(params, model_state, batch) -> (loss,
        new_model_state)`` for one worker's batch; ``model_state`` holds
        e.g. batch-norm statistics (``{}`` when there are none).
      tx: the per-worker transform, built with ``axis_name=self.axis_name``.
      param_specs: x's PartitionSpecs (see the module docstring).
      sync_model_state: average the model state over workers after each
        step (the authors sync batch-norm statistics); if False it is per
        worker (leading worker axis), where the layout supports it.
      multi_step: ``batch`` leaves lead with a step axis (n, K, ...) and the
        n steps run in one call, where the layout supports it.
      donate: donate params, model state and optimizer state buffers.
      check_collectives: trace ``tx.update`` first (``check_collectives``).
        Turn off only to time a step without communication on purpose.

    Returns:
      ``step(params, model_state, opt_state, batch) -> (params, model_state,
      opt_state, loss)``: batch leaves lead with the worker axis K, ``loss``
      is the mean over workers (one per step with ``multi_step``).
    """

  @abc.abstractmethod
  def averaged_params(self, param_specs: PyTree = None):
    """``f(params, opt_state) -> y = x - mean_k e_k`` for the stacked state.

    One all-reduce of the error: for evaluation and export, not the step.
    """

  @abc.abstractmethod
  def dense_payload(self, params: PyTree, param_specs: PyTree = None) -> int:
    """Values one device all-reduces across workers per step, uncompressed."""

  def bytes_per_step(self, payload: int, model_state: int = 0) -> int:
    """Bytes one worker sends per step: ``payload`` values from each of its
    devices (a compressor's ``payload``, or ``dense_payload``), the synced
    ``model_state`` values and the loss (``wire.bytes_per_step``)."""
    return self.devices_per_worker * wire.bytes_per_step(payload, model_state)

  # ------------------------------------------------ the program's configs

  @classmethod
  @abc.abstractmethod
  def check_config(cls, config) -> None:
    """Raises ValueError naming what in a training config this layout cannot
    run (before any compute; the device count is read, nothing runs)."""

  @classmethod
  @abc.abstractmethod
  def from_config(cls, config) -> Layout:
    """The layout of a training config (after ``check_config``)."""

  @classmethod
  @abc.abstractmethod
  def devices_for(cls, config) -> int:
    """The devices a config's workers use: what a CPU-only machine creates."""


# --------------------------------------------------------------- helpers


def global_from_rows(
    local: np.ndarray,
    rows: slice,
    num_workers: int,
    sharding: NamedSharding,
    *,
    worker_axis: int = 0,
) -> jax.Array:
  """The global array of all ``num_workers`` workers from this process's ``rows``.

  ``local`` holds the rows ``rows`` along ``worker_axis``; each device gets
  its workers' rows (by ``sharding``), and no process reads another's.
  """

  def fill(index):  # one device's global worker rows -> this process's rows
    start, stop, _ = index[worker_axis].indices(num_workers)
    return local[
        (slice(None),) * worker_axis
        + (slice(start - rows.start, stop - rows.start),)
    ]

  shape = (
      local.shape[:worker_axis]
      + (num_workers,)
      + local.shape[worker_axis + 1 :]
  )
  return jax.make_array_from_callback(shape, sharding, fill)


def sorted_devices(devices=None) -> list:
  """The devices in mesh order: by process, then id. Device ids are not
  contiguous across processes, and each process's devices must hold
  consecutive workers."""
  if devices is None:
    devices = jax.devices()
  return sorted(devices, key=lambda d: (d.process_index, d.id))


def check_positive(**values) -> None:
  """Raises ValueError naming the first value that is not a positive int."""
  for name, value in values.items():
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f'{name} must be a positive integer, got {value!r}')


def abstract(tree: PyTree) -> PyTree:
  """``tree`` as ShapeDtypeStructs (arrays, or already abstract)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree
  )


# Collectives that combine values across workers; their axes must be all of
# the layout's worker axes.
_REDUCTIONS = (
    'psum',
    'pmax',
    'pmin',
    'all_gather',
    'reduce_scatter',
    'psum_scatter',
    'all_to_all',
)


def collective_eqns(jaxpr, manual: frozenset = frozenset()):
  """Every cross-worker collective in ``jaxpr``, recursively.

  Yields ``(axes, eqn, manual)``: the collective's named axes, its equation
  (``eqn.invars`` are the operands) and the mesh axes made manual by the
  ``shard_map``s around it inside ``jaxpr``.
  """
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in _REDUCTIONS:
      axes = eqn.params.get('axes', eqn.params.get('axis_name'))
      axes = axes if isinstance(axes, (tuple, list)) else (axes,)
      yield tuple(a for a in axes if isinstance(a, str)), eqn, manual
    inner = manual | frozenset(eqn.params.get('newly_manual_axes', ()))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, 'eqns'):
          yield from collective_eqns(sub, inner)
        elif hasattr(getattr(sub, 'jaxpr', None), 'eqns'):
          yield from collective_eqns(sub.jaxpr, inner)


def trace_collectives(trace: Callable[[], Any], hint: str) -> list:
  """``collective_eqns`` of the jaxpr ``trace()`` makes; a collective over an
  axis the layout lacks is a ValueError ending in ``hint``."""
  try:
    jaxpr = trace()
  except NameError as e:  # a collective over an axis this layout does not have
    raise ValueError(
        f'the transform uses a collective over an axis this layout lacks ({e})'
        + hint
    ) from None
  return list(collective_eqns(jaxpr.jaxpr))


def require_collectives(found: list, num_workers: int, hint: str) -> None:
  """Raises ValueError when K > 1 workers and the update has no collective."""
  if num_workers > 1 and not found:
    raise ValueError(
        f'the transform has no collective over the {num_workers} workers,'
        ' so their updates would differ while the model is kept as one copy'
        + hint
    )


def stacked_averaged_params():
  """``f(params, opt_state) -> y = x - mean_k e_k`` for a state stacked on a
  leading worker axis, wherever it lives (host arrays too).

  One all-reduce of the error: for evaluation and export, not the step. Needs
  no layout: the stacked state's sharding tells XLA where the workers are.
  """
  average = lambda p, s: feedback.averaged_params(p, s, axis_name='workers')
  return jax.jit(
      jax.vmap(average, in_axes=(None, 0), out_axes=None, axis_name='workers')
  )


def host_value(x) -> np.ndarray:
  """A replicated (or host) array as numpy, also on a multi-process mesh.

  An array replicated over processes but sharded within each (a parameter
  sharded over the 'model' axis of the sharded layout, whose workers'
  devices are on one process) is put together from this process's shards.
  """
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  if x.sharding.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  out, covered = np.empty(x.shape, x.dtype), {}
  for shard in x.addressable_shards:
    key = tuple((s.start, s.stop) for s in shard.index)
    if key not in covered:
      out[shard.index] = np.asarray(shard.data)
      covered[key] = shard.data.size
  if sum(covered.values()) != x.size:
    raise ValueError(
        f'this process holds only part of a {x.shape} array ({x.sharding})'
    )
  return out
