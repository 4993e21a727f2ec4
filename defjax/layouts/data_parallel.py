"""The 1-D layout: K workers on a 1-D mesh, x replicated.

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
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from defjax import compress
from defjax import feedback
from defjax.layouts import base

LOCAL_AXIS = 'local'
LOCAL_GRADIENTS = ('vmap', 'unroll')

# How a device computes the gradients of its several workers when
# config.local_gradients is 'auto', by platform: unrolled on CPU, where
# bench/local_workers.py measured it far faster than vmap (docs/benchmarks.md,
# local_workers); vmap elsewhere (not measured yet; bench/gpu.py times both),
# the smaller program.
AUTO_LOCAL_GRADIENTS = {'cpu': 'unroll'}


@dataclasses.dataclass(frozen=True)
class DataParallelLayout(base.Layout):
  """K workers on a 1-D mesh: ``workers_per_device`` of them on each device.

  ``local_gradients``: with several workers per device, how their gradients
  are computed: 'vmap' (one batched program; where the workers' eval points
  x - lam e_k differ, as in DEF, every convolution becomes a grouped one) or
  'unroll' (one copy of the model per local worker, each an ordinary
  convolution, at the cost of a longer compile). The optimizer runs vmapped
  over the local workers either way.
  """

  mesh: Mesh
  num_workers: int
  axis: str = 'data'
  local_gradients: str = 'vmap'

  def __post_init__(self):
    if self.local_gradients not in LOCAL_GRADIENTS:
      raise ValueError(
          f"local_gradients must be 'vmap' or 'unroll', got {self.local_gradients!r}"
      )

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
    mine = [
        i for i, d in enumerate(devices) if d.process_index == process_index
    ]
    if not mine:
      return slice(0, 0)
    w = self.workers_per_device
    return slice(mine[0] * w, (mine[-1] + 1) * w)

  def global_batch(
      self, local: np.ndarray, *, stacked: bool = False
  ) -> jax.Array:
    """As ``Layout.global_batch``; ``stacked``: ``local`` is a (n, rows, ...)
    stack of n steps' rows, for a ``multi_step`` step."""
    if not stacked:
      return super().global_batch(local)
    return base.global_from_rows(
        local,
        self.worker_rows(),
        self.num_workers,
        self.per_step_and_worker,
        worker_axis=1,
    )

  def param_shardings(self, params, param_specs=None):
    """Replicated, whatever the specs say."""
    return jax.tree.map(lambda _: self.replicated, params)

  def state_shardings(self, state, params, param_specs=None):
    return jax.tree.map(lambda _: self.per_worker, state)

  def rbgs(self, ratio, param_specs=None, *, key=0, per_leaf):
    """``defjax.rbgs``: every device holds all of x."""
    return compress.rbgs(ratio, key=key, per_leaf=per_leaf)

  def map_workers(self, fn, in_axes, out_axes):
    """Runs a per-worker ``fn`` vmapped over this device's workers, with the
    local axis name so that collectives reduce over it too.

    Also with one worker per device: XLA:CPU then compiles the optimizer's
    elementwise passes over the (1, ...) state with fewer re-reads and copies
    than over squeezed shapes (``bench/opt_bytes.py``,
    ``bench/ab_squeezed_optimizer.py``). The results agree with the squeezed
    program's to float rounding.
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

  def check_collectives(self, tx, params, worker_opt_state):
    """As ``Layout.check_collectives``: every collective of ``tx.update``
    reduces over ``axis_name``, ``('data', 'local')`` with several workers
    per device."""
    axes = self.axis_name
    axes = tuple(axes) if isinstance(axes, tuple) else (axes,)
    env = [(self.axis, self.num_devices)]
    if self.workers_per_device > 1:
      env.append((LOCAL_AXIS, self.workers_per_device))
    params, worker_opt_state = base.abstract(params), base.abstract(
        worker_opt_state
    )
    hint = f'; build it with axis_name={self.axis_name!r} (layout.axis_name)'
    found = base.trace_collectives(
        lambda: jax.make_jaxpr(tx.update, axis_env=env)(
            params, worker_opt_state, params
        ),
        hint,
    )
    wrong = sorted({a for a, _, _ in found if set(a) != set(axes)})
    if wrong:
      raise ValueError(
          f"the transform reduces over {wrong[0]!r} but this layout's {self.num_workers}"
          f" workers span {axes!r}, so some workers' gradients would be dropped"
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
      unroll: int | bool = 1,
  ):
    """As ``Layout.train_step``, with both options: an unsynced model state
    is per worker, and ``multi_step`` runs the n steps in a ``lax.scan`` on
    the devices (``unroll``: its unroll), ``loss`` the (n,) per-step losses.

    ``multi_step``: one dispatch and one host sync per n steps instead of per
    step. Each distinct n compiles once; every n gives the same bits (the
    loop body is compiled alike), which agree with n single steps to float
    rounding, not bitwise, on convolutional models (XLA fuses a lone step
    differently). On XLA:CPU a rolled loop of a CNN step runs several times
    slower per step than the single step (``bench/dispatch.py``): there use
    it for its host-sync savings only where compute is small.
    """
    axis_name = self.axis_name
    ms_axis = None if sync_model_state else 0

    def gradient(params, model_state, opt_state, batch):
      """Algorithm 1, line 6: the gradient at this worker's eval point."""
      point = feedback.eval_point(params, opt_state)
      return jax.value_and_grad(loss_fn, has_aux=True)(
          point, model_state, batch
      )

    def update(params, model_state, opt_state, loss, grads):
      updates, opt_state = tx.update(grads, opt_state, params)
      if sync_model_state:
        model_state = jax.lax.pmean(model_state, axis_name)
      return updates, model_state, opt_state, jax.lax.pmean(loss, axis_name)

    def worker(params, model_state, opt_state, batch):
      (loss, model_state), grads = gradient(
          params, model_state, opt_state, batch
      )
      return update(params, model_state, opt_state, loss, grads)

    out_axes = (None, ms_axis, 0, None)
    # One worker per device takes the unrolled path too: its gradient with the
    # model's own shapes (vmapped, DEF's per-worker eval point would make every
    # convolution a grouped one), its optimizer vmapped (map_workers).
    if self.workers_per_device == 1 or self.local_gradients == 'unroll':
      vmapped_update = self.map_workers(
          update, in_axes=(None, 0, 0, 0, 0), out_axes=out_axes
      )

      def mapped(params, model_state, opt_state, batch):
        at = lambda tree, k: jax.tree.map(lambda x: x[k], tree)
        results = [
            gradient(
                params,
                model_state if ms_axis is None else at(model_state, k),
                at(opt_state, k),
                at(batch, k),
            )
            for k in range(self.workers_per_device)
        ]
        (loss, new_model_state), grads = jax.tree.map(
            lambda *xs: jnp.stack(xs), *results
        )
        return vmapped_update(params, new_model_state, opt_state, loss, grads)

    else:
      mapped = self.map_workers(
          worker, in_axes=(None, ms_axis, 0, 0), out_axes=out_axes
      )

    def one_step(state, batch):
      params, model_state, opt_state = state
      updates, model_state, opt_state, loss = mapped(
          params, model_state, opt_state, batch
      )
      return (
          optax.apply_updates(params, updates),
          model_state,
          opt_state,
      ), loss

    def local_step(params, model_state, opt_state, batch):
      # Runs once per trace, not per step.
      if check_collectives:
        self.check_collectives(
            tx, params, jax.tree.map(lambda x: x[0], opt_state)
        )
      state = (params, model_state, opt_state)
      if multi_step:
        state, loss = jax.lax.scan(one_step, state, batch, unroll=unroll)
      else:
        state, loss = one_step(state, batch)
      return (*state, loss)

    ms_spec = P() if sync_model_state else P(self.axis)
    batch_spec = P(None, self.axis) if multi_step else P(self.axis)
    step = jax.shard_map(
        local_step,
        mesh=self.mesh,
        in_specs=(P(), ms_spec, P(self.axis), batch_spec),
        out_specs=(P(), ms_spec, P(self.axis), P()),
        check_vma=False,
    )
    return jax.jit(step, donate_argnums=(0, 1, 2) if donate else ())

  def averaged_params(self, param_specs=None):
    return base.stacked_averaged_params()

  def dense_payload(self, params, param_specs=None) -> int:
    """d: every value of x."""
    return optax.tree.size(params)

  @classmethod
  def check_config(cls, config) -> None:
    make_layout(config.num_workers)

  @classmethod
  def from_config(cls, config) -> DataParallelLayout:
    local = config.local_gradients
    if local == 'auto':
      local = AUTO_LOCAL_GRADIENTS.get(jax.devices()[0].platform, 'vmap')
    return make_layout(config.num_workers, local_gradients=local)

  @classmethod
  def devices_for(cls, config) -> int:
    return config.num_workers


def make_layout(
    num_workers: int,
    devices: Optional[Sequence[jax.Device]] = None,
    axis: str = 'data',
    *,
    local_gradients: str = 'vmap',
) -> DataParallelLayout:
  """Places K workers on the devices.

  K <= n_devices uses the first K devices (one worker each); K > n_devices
  simulates K / n_devices workers per device and needs K divisible by n.

  Raises:
    ValueError: if K < 1 or K > n_devices is not a multiple of n_devices.
  """
  base.check_positive(num_workers=num_workers)
  devices = base.sorted_devices(devices)
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
  mesh = Mesh(
      np.asarray(used), (axis,), axis_types=(jax.sharding.AxisType.Auto,)
  )
  return DataParallelLayout(
      mesh=mesh,
      num_workers=num_workers,
      axis=axis,
      local_gradients=local_gradients,
  )
