"""Workers on devices: the mesh, the per-worker state layout and the train step.

Layout (the convention every defjax program uses):

* ``params`` x (and synced batch-norm statistics) are replicated: ``P()``.
* Everything that belongs to one worker (its error e_k, momentum m_k, batch)
  is stacked on a leading worker axis of length K and sharded over the mesh
  axis: ``P('data')``. Each device holds K / n_devices consecutive workers.
* The per-worker transform runs under ``jax.vmap`` over the device's workers
  inside the shard_map (also over one). With several per device its
  collectives reduce over both axes, ``('data', 'local')``: build the
  optimizer with ``axis_name=layout.axis_name`` for that reason.

The step is ``shard_map``'d with ``check_vma=False``: gradients are taken
locally by construction (no implicit all-reduce of the full gradient), and
the replicated outputs are bitwise equal on all devices because each comes
from the same all-reduced block values and the same shared block indices.
``wire.collectives`` reads the compiled HLO to check that claim.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from defjax import feedback

LOCAL_AXIS = 'local'

# XLA:CPU runs each device's program on its own thread; at a collective the
# threads meet in a rendezvous that LOG(FATAL)s (SIGABRT, the whole process)
# when one participant is more than 40 s late (XLA's default for
# xla_cpu_collective_call_terminate_timeout_seconds). Eight CPU devices on two
# busy cores miss that easily, so a loaded machine killed correct runs. A late
# thread is not a hang: wait for it, up to XLA's own limit for cross-process
# collectives (30 minutes), so that a real deadlock still ends in an error.
# (jax.distributed's heartbeat still ends a run whose peer died.)
#
# The other way to reach that timeout is a real deadlock: two multi-device
# programs that do not depend on each other, both in flight (e.g. a mean of
# every leaf of a per-worker tree, dispatched leaf by leaf), can interleave
# their participants across the device threads so that neither rendezvous
# completes (bench/cpu_collective_deadlock.py reproduces it). Programs that
# consume each other's outputs are ordered, so the training program runs its
# collectives as one program at a time (``run_alone``).
CPU_COLLECTIVE_FLAGS = {
    'xla_cpu_collective_call_terminate_timeout_seconds': 1800,
    'xla_cpu_collective_call_warn_stuck_timeout_seconds': 300,
}


def tolerate_slow_cpu_devices() -> None:
  """Lets XLA:CPU collectives wait up to 30 minutes for late device threads.

  Adds ``CPU_COLLECTIVE_FLAGS`` to ``XLA_FLAGS`` (a flag already set there
  wins). XLA reads the flags when the first backend starts, so call this
  before the first computation; ``train.py`` and the tests do.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  for name, value in CPU_COLLECTIVE_FLAGS.items():
    if f'--{name}=' not in flags:
      flags += f' --{name}={value}'
  os.environ['XLA_FLAGS'] = flags.strip()


@dataclasses.dataclass(frozen=True)
class MeshLayout:
  """What every layout of workers has: its mesh. ``WorkerLayout`` (1-D) and
  ``sharded.ShardedLayout`` (2-D) add where the workers are on it."""

  mesh: Mesh

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())


@dataclasses.dataclass(frozen=True)
class WorkerLayout(MeshLayout):
  """K workers on a 1-D mesh: ``workers_per_device`` of them on each device."""

  num_workers: int
  axis: str = 'data'

  @property
  def num_devices(self) -> int:
    return self.mesh.shape[self.axis]

  @property
  def workers_per_device(self) -> int:
    return self.num_workers // self.num_devices

  @property
  def axis_name(self):
    """The axis name(s) to give defjax transforms built for this layout."""
    if self.workers_per_device == 1:
      return self.axis
    return (self.axis, LOCAL_AXIS)

  @property
  def per_worker(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(self.axis))

  @property
  def per_step_and_worker(self) -> NamedSharding:
    """A (n, K, ...) stack of n steps' per-worker arrays (``multi_step``)."""
    return NamedSharding(self.mesh, P(None, self.axis))

  def worker_rows(self, process_index: Optional[int] = None) -> slice:
    """The workers (rows of a per-worker array) whose devices live on a process.

    Each process loads only these rows of the per-worker batch.
    """
    if process_index is None:
      process_index = jax.process_index()
    devices = list(self.mesh.devices.flat)
    mine = [i for i, d in enumerate(devices) if d.process_index == process_index]
    if not mine:
      return slice(0, 0)
    w = self.workers_per_device
    return slice(mine[0] * w, (mine[-1] + 1) * w)

  def global_batch(self, local: np.ndarray, *, stacked: bool = False) -> jax.Array:
    """A per-worker array of all K workers from this process's rows of it.

    ``local`` holds the rows ``worker_rows()`` of a (K, ...) array, or of a
    (n, K, ...) stack of n steps' arrays with ``stacked``; each device gets
    its workers' rows, and no process reads another's.
    """
    sharding = self.per_step_and_worker if stacked else self.per_worker
    return global_from_rows(local, self.worker_rows(), self.num_workers, sharding,
                            worker_axis=1 if stacked else 0)


def global_from_rows(local: np.ndarray, rows: slice, num_workers: int,
                     sharding: NamedSharding, *, worker_axis: int = 0) -> jax.Array:
  """The global array of all ``num_workers`` workers from this process's ``rows``.

  ``local`` holds the rows ``rows`` along ``worker_axis``; each device gets
  its workers' rows (by ``sharding``), and no process reads another's.
  """

  def fill(index):  # one device's global worker rows -> this process's rows
    start, stop, _ = index[worker_axis].indices(num_workers)
    return local[(slice(None),) * worker_axis + (slice(start - rows.start, stop - rows.start),)]

  shape = local.shape[:worker_axis] + (num_workers,) + local.shape[worker_axis + 1:]
  return jax.make_array_from_callback(shape, sharding, fill)


def make_layout(
    num_workers: int,
    devices: Optional[Sequence[jax.Device]] = None,
    axis: str = 'data',
) -> WorkerLayout:
  """Places K workers on the devices.

  K <= n_devices uses the first K devices (one worker each); K > n_devices
  simulates K / n_devices workers per device and needs K divisible by n.

  Raises:
    ValueError: if K < 1 or K > n_devices is not a multiple of n_devices.
  """
  if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
    raise ValueError(f'num_workers must be a positive integer, got {num_workers!r}')
  if devices is None:
    devices = jax.devices()
  # Mesh position, not device id, orders workers: ids are not contiguous across
  # processes, and each process's devices must hold consecutive workers.
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  n = len(devices)
  if num_workers <= n:
    used = devices[:num_workers]
  elif num_workers % n == 0:
    used = devices
  else:
    raise ValueError(
        f'num_workers={num_workers} is not divisible by the {n} available'
        f' devices; use a multiple of {n} (or at most {n})'
    )
  mesh = Mesh(np.asarray(used), (axis,), axis_types=(jax.sharding.AxisType.Auto,))
  return WorkerLayout(mesh=mesh, num_workers=num_workers, axis=axis)


def init_worker_state(tx: optax.GradientTransformation, params, layout: WorkerLayout):
  """``tx.init`` for every worker, stacked on the worker axis and sharded."""
  init = jax.vmap(tx.init, in_axes=None, axis_size=layout.num_workers)
  return jax.jit(init, out_shardings=layout.per_worker)(params)


def _map_workers(fn, layout: WorkerLayout, in_axes, out_axes):
  """Runs a per-worker ``fn`` vmapped over this device's workers, with the
  local axis name so that collectives reduce over it too.

  Also with one worker per device: XLA:CPU then compiles the optimizer's
  elementwise passes over the (1, ...) state with fewer re-reads and copies
  than over squeezed shapes (VGG-16 step at batch 16: ~15% fewer bytes
  accessed for SGD and DEF, ``bench/opt_bytes.py``). The results agree with
  the squeezed program's to float rounding (a few state leaves differ in
  the last bit; the quick start's params did not over 30 steps).
  """
  # Values reduced over the workers are equal on all of them, but vmap still
  # sees them as mapped (they depend on per-worker state such as the shared
  # key's copies), so map them and keep the first worker's copy.
  vmapped = jax.vmap(fn, in_axes=in_axes, axis_name=LOCAL_AXIS)

  def run(*args):
    outs = vmapped(*args)
    return tuple(
        jax.tree.map(lambda x: x[0], o) if ax is None else o
        for o, ax in zip(outs, out_axes)
    )

  return run


LossFn = Callable[[Any, Any, Any], tuple[jax.Array, Any]]

# Collectives that combine values across workers; their axes must be all of
# the layout's worker axes.
_REDUCTIONS = ('psum', 'pmax', 'pmin', 'all_gather', 'reduce_scatter', 'psum_scatter',
               'all_to_all')


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


def check_worker_collectives(tx, params, worker_opt_state, layout: WorkerLayout) -> None:
  """Raises ValueError unless ``tx.update`` reduces over exactly the workers.

  The step keeps one copy of the update, which is right only if the update is
  the same on every worker; a transform built with another ``axis_name``
  (``'data'`` where the layout needs ``('data', 'local')``, or None) would
  silently train on some workers' gradients only. Traces ``tx.update``
  abstractly (no compute), so it sees through ``optax.chain`` and friends.
  """
  axes = layout.axis_name
  axes = tuple(axes) if isinstance(axes, tuple) else (axes,)
  env = [(layout.axis, layout.num_devices)]
  if layout.workers_per_device > 1:
    env.append((LOCAL_AXIS, layout.workers_per_device))
  shape = lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
  params = jax.tree.map(shape, params)
  worker_opt_state = jax.tree.map(shape, worker_opt_state)
  try:
    jaxpr = jax.make_jaxpr(tx.update, axis_env=env)(params, worker_opt_state, params)
  except NameError as e:  # a collective over an axis this layout does not have
    raise ValueError(
        f'the transform uses a collective over an axis this layout lacks ({e});'
        f' build it with axis_name={layout.axis_name!r} (layout.axis_name)'
    ) from None
  found = [axes for axes, _, _ in collective_eqns(jaxpr.jaxpr)]
  wrong = sorted({a for a in found if set(a) != set(axes)})
  hint = f'; build the transform with axis_name={layout.axis_name!r} (layout.axis_name)'
  if wrong:
    raise ValueError(
        f'the transform reduces over {wrong[0]!r} but this layout\'s {layout.num_workers}'
        f' workers span {axes!r}, so some workers\' gradients would be dropped' + hint)
  if layout.num_workers > 1 and not found:
    raise ValueError(
        f'the transform has no collective over the {layout.num_workers} workers,'
        ' so their updates would differ while the model is kept as one copy' + hint)


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    layout: WorkerLayout,
    *,
    sync_model_state: bool = True,
    donate: bool = True,
    multi_step: bool = False,
    unroll: int | bool = 1,
    local_gradients: str = 'vmap',
    check_collectives: bool = True,
):
  """Builds the jitted data-parallel step of any defjax (or optax) transform.

  Args:
    loss_fn: ``loss_fn(params, model_state, batch) -> (loss, new_model_state)``
      for one worker's batch; ``model_state`` holds e.g. batch-norm statistics
      (use ``{}`` when there are none).
    tx: the per-worker transform, built with ``axis_name=layout.axis_name``.
    layout: from ``make_layout``.
    sync_model_state: average the model state over workers after each step
      (the authors sync batch-norm statistics; they are small). If False the
      model state is per worker (leading worker axis).
    donate: donate params, model state and optimizer state buffers.
    multi_step: run n steps in one call: ``batch`` leaves have a leading step
      axis, (n, K, ...), the steps run in a ``lax.scan`` on the devices and
      ``loss`` is the (n,) vector of per-step losses. One dispatch and one
      host sync per n steps instead of per step. Each distinct n compiles
      once; every n gives the same bits (the loop body is compiled alike),
      which agree with n single steps to float rounding, not bitwise, on
      convolutional models (XLA fuses a lone step differently). On XLA:CPU a
      rolled loop of a CNN step ran ~6x slower per step than the single
      step (bench/dispatch.py): there use it for its host-sync savings only
      where compute is small.
    unroll: ``lax.scan``'s unroll (with ``multi_step``).
    local_gradients: with several workers per device, how their gradients
      are computed: 'vmap' (one batched program; where the workers' eval
      points x - lam e_k differ, as in DEF, every convolution becomes a
      grouped one) or 'unroll' (one copy of the model per local worker, each
      an ordinary convolution, at the cost of a longer compile). The
      optimizer runs vmapped over the local workers either way.
    check_collectives: trace ``tx.update`` first and raise ``ValueError``
      unless its collectives reduce over exactly the workers'
      (``check_worker_collectives``). Turn off only to time a step without
      communication on purpose (``bench/overhead.py``'s 'local').

  Returns:
    ``step(params, model_state, opt_state, batch) -> (params, model_state,
    opt_state, loss)`` where ``batch`` leaves have a leading worker axis K and
    ``loss`` is the mean over workers.
  """
  if local_gradients not in ('vmap', 'unroll'):
    raise ValueError(f"local_gradients must be 'vmap' or 'unroll', got {local_gradients!r}")
  axis_name = layout.axis_name
  ms_axis = None if sync_model_state else 0

  def gradient(params, model_state, opt_state, batch):
    """Algorithm 1, line 6: the gradient at this worker's eval point."""
    point = feedback.eval_point(params, opt_state)
    return jax.value_and_grad(loss_fn, has_aux=True)(point, model_state, batch)

  def update(params, model_state, opt_state, loss, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    if sync_model_state:
      model_state = jax.lax.pmean(model_state, axis_name)
    return updates, model_state, opt_state, jax.lax.pmean(loss, axis_name)

  def worker(params, model_state, opt_state, batch):
    (loss, model_state), grads = gradient(params, model_state, opt_state, batch)
    return update(params, model_state, opt_state, loss, grads)

  out_axes = (None, ms_axis, 0, None)
  # One worker per device takes the unrolled path too: its gradient with the
  # model's own shapes (vmapped, DEF's per-worker eval point would make every
  # convolution a grouped one), its optimizer vmapped (_map_workers).
  if layout.workers_per_device == 1 or local_gradients == 'unroll':
    vmapped_update = _map_workers(update, layout, in_axes=(None, 0, 0, 0, 0), out_axes=out_axes)

    def mapped(params, model_state, opt_state, batch):
      at = lambda tree, k: jax.tree.map(lambda x: x[k], tree)
      results = [gradient(params, model_state if ms_axis is None else at(model_state, k),
                          at(opt_state, k), at(batch, k))
                 for k in range(layout.workers_per_device)]
      (loss, new_model_state), grads = jax.tree.map(lambda *xs: jnp.stack(xs), *results)
      return vmapped_update(params, new_model_state, opt_state, loss, grads)
  else:
    mapped = _map_workers(worker, layout, in_axes=(None, ms_axis, 0, 0), out_axes=out_axes)

  def one_step(state, batch):
    params, model_state, opt_state = state
    updates, model_state, opt_state, loss = mapped(params, model_state, opt_state, batch)
    return (optax.apply_updates(params, updates), model_state, opt_state), loss

  def local_step(params, model_state, opt_state, batch):
    # Runs once per trace, not per step.
    if check_collectives:
      check_worker_collectives(
          tx, params, jax.tree.map(lambda x: x[0], opt_state), layout)
    state = (params, model_state, opt_state)
    if multi_step:
      state, loss = jax.lax.scan(one_step, state, batch, unroll=unroll)
    else:
      state, loss = one_step(state, batch)
    return (*state, loss)

  ms_spec = P() if sync_model_state else P(layout.axis)
  batch_spec = P(None, layout.axis) if multi_step else P(layout.axis)
  step = jax.shard_map(
      local_step,
      mesh=layout.mesh,
      in_specs=(P(), ms_spec, P(layout.axis), batch_spec),
      out_specs=(P(), ms_spec, P(layout.axis), P()),
      check_vma=False,
  )
  return jax.jit(step, donate_argnums=(0, 1, 2) if donate else ())


def make_averaged_params():
  """``f(params, opt_state) -> y = x - mean_k e_k`` for stacked worker state.

  One all-reduce of the error: for evaluation and export, not the step. Needs
  no layout: the stacked state's sharding tells XLA where the workers are.
  """
  average = lambda p, s: feedback.averaged_params(p, s, axis_name='workers')
  return jax.jit(jax.vmap(average, in_axes=(None, 0), out_axes=None, axis_name='workers'))


def host_value(x) -> np.ndarray:
  """A replicated (or host) array as numpy, also on a multi-process mesh.

  An array replicated over processes but sharded within each (a parameter
  sharded over the 'model' axis of ``sharded``'s mesh, whose workers' devices
  are on one process) is put together from this process's shards.
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
    raise ValueError(f'this process holds only part of a {x.shape} array ({x.sharding})')
  return out


def all_finite(tree) -> bool:
  """Whether every value of ``tree`` is finite, reduced on the devices.

  Copying every worker's state to the host would move K times the model.
  """
  return bool(host_value(_all_finite(tree)))


@jax.jit
def _all_finite(tree):
  # One program for the whole tree: leaf by leaf, each per-worker leaf's
  # reduction would be a separate collective program (see run_alone).
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)] or
                           [jnp.bool_(True)]))


def run_alone(tree):
  """Waits until ``tree`` is computed: no other program runs beside it.

  Call it on the outputs of a multi-device program that nothing dispatched
  next depends on (an evaluation's model, averaged statistics): XLA:CPU can
  deadlock when two independent programs with collectives are in flight at
  once (see ``CPU_COLLECTIVE_FLAGS``).
  """
  return jax.block_until_ready(tree)
