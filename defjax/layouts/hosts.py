"""Hosts as workers: dense on the fast links inside a host, only the block across.

A cluster has two kinds of links: fast ones between the devices of a host
(NVLink, ICI, shared memory) and a slower one between hosts. Here each of the
K workers of Algorithm 1 is one host's group of M devices, data-parallel
among themselves, on a ('data', 'replica') mesh of shape (K, M):

* ``params`` x and synced batch-norm statistics: replicated, ``P()``.
* a worker's state (e_k, m_k, the compressor's key and count): stacked on a
  leading worker axis K over 'data', replicated over the host's devices,
  ``P('data')``: one e_k per host, not per device.
* the batch: every leaf is (K, n, ...), worker k's n examples, split over its
  M devices, ``P('data', 'replica')`` (n must divide by M).

One step, on every device of host k (the worker's gradient is the dense mean
over its devices, and error feedback runs per worker)::

  g_k = mean over the host's M devices of their gradients at x - lam e_k
        (an all-reduce over 'replica' of d values: the fast links)
  tx.update(g_k, state_k, x)  with axis_name = SplitAxis('data', 'replica')

``SplitAxis`` makes the transform's one mean over workers (the RBGS block's
b values; all d gradient values for SGD) cross hosts once per host, split M
ways: device j of each host all-reduces slice j, ceil(b / M) values, over
'data' (the slow link), then the host all-gathers its M slices over
'replica'. Synced batch-norm statistics are averaged over the host first,
then split the same way; the mean loss is one scalar all-reduce over all
devices.

Who talks to whom, K = 2 hosts of M = 4 devices (d0-d3 on host 0, d4-d7
on host 1)::

      host 0 (fast links)                      host 1 (fast links)
  d0   d1   d2   d3                        d4   d5   d6   d7
  |____|____|____|  all-reduce of g        |____|____|____|  (d values)
  |    |    |    |  over 'replica'         |    |    |    |
  d0 <------------------- slice 0 of the block ---------> d4
       d1 <-------------- slice 1 -------------------> d5
            d2 <--------- slice 2 --------------> d6       (ceil(b / 4)
                 d3 <---- slice 3 ---------> d7              values each)
  all-gather of the 4 slices over 'replica' on each host (b values)

Payload: each device sends ceil(b / M) values of the block (and ceil(s / M)
of the s synced statistics, and the loss) across hosts per step, so a host
sends M ceil(b / M) ~ b, once: without the split each of its M devices
would all-reduce the same b values across hosts. (The 1-D layout with K M
workers of one device each is another algorithm: K M workers, K M errors.)
``bench/slow_link.py`` counts these bytes on a real link.

Batch norm: each device normalises with its own n / M examples' statistics
(as data-parallel BN does without cross-device sync), and the running
statistics are averaged over all devices. The layout equals the 1-D layout
with K workers of n examples to float rounding on a model without batch norm
and without per-example randomness (augmentation and dropout are keyed per
worker, so the M devices of a host draw the same random numbers for their
own examples).

Out of scope: sharding params inside a host (FSDP), a 3-D mesh with a model
axis, several steps per dispatch, per-worker (unsynced) model state.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from defjax import compress
from defjax import feedback
from defjax import wire
from defjax.layouts import base

WORKER_AXIS = 'data'
# The devices of one host: a name of its own, not 'local' (the 1-D layout's
# vmapped workers of one device) nor 'model' (the sharded layout's shards).
REPLICA_AXIS = 'replica'


@dataclasses.dataclass(frozen=True)
class HostLayout(base.Layout):
  """K workers (hosts) of M data-parallel devices on a ('data', 'replica') mesh."""

  mesh: Mesh
  num_workers: int

  @property
  def devices_per_worker(self) -> int:
    return self.mesh.shape[REPLICA_AXIS]

  @property
  def axis_name(self) -> compress.SplitAxis:
    """What to build defjax transforms for this layout with: means over the
    workers split over each host's devices."""
    return compress.SplitAxis(WORKER_AXIS, REPLICA_AXIS)

  @property
  def per_worker(self) -> NamedSharding:
    """A (K, ...) per-worker array: its row on each of its host's devices."""
    return NamedSharding(self.mesh, P(WORKER_AXIS))

  @property
  def per_example(self) -> NamedSharding:
    """A (K, n, ...) batch leaf: worker k's n examples over its M devices."""
    return NamedSharding(self.mesh, P(WORKER_AXIS, REPLICA_AXIS))

  def worker_rows(self, process_index: Optional[int] = None) -> slice:
    """The workers with a device on a process (a host: its own row)."""
    if process_index is None:
      process_index = jax.process_index()
    rows = [
        k
        for k, row in enumerate(self.mesh.devices)
        if any(d.process_index == process_index for d in row)
    ]
    return slice(rows[0], rows[-1] + 1) if rows else slice(0, 0)

  def global_batch(
      self, local: np.ndarray, *, stacked: bool = False
  ) -> jax.Array:
    """A (K, n, ...) batch leaf from this process's rows; each device gets
    its n / M examples of its worker's row."""
    if stacked:
      raise ValueError('HostLayout runs one step per call: no stacked batches')
    rows = self.worker_rows()

    def fill(index):
      start, stop, _ = index[0].indices(self.num_workers)
      return local[(slice(start - rows.start, stop - rows.start), *index[1:])]

    shape = (self.num_workers, *local.shape[1:])
    return jax.make_array_from_callback(shape, self.per_example, fill)

  def param_shardings(self, params, param_specs=None):
    """Replicated, whatever the specs say (no sharding inside a host)."""
    return jax.tree.map(lambda _: self.replicated, params)

  def state_shardings(self, state, params, param_specs=None):
    return jax.tree.map(lambda _: self.per_worker, state)

  def rbgs(self, ratio, param_specs=None, *, key=0, per_leaf):
    """``defjax.rbgs``: every device holds all of x; the split across hosts
    comes from ``axis_name``."""
    return compress.rbgs(ratio, key=key, per_leaf=per_leaf)

  def check_collectives(self, tx, params, worker_opt_state):
    """As ``Layout.check_collectives``: each collective of ``tx.update``
    reduces over 'data' (all of it, or a slice of the host's share), or
    gathers the slices over 'replica'."""
    env = [
        (WORKER_AXIS, self.num_workers),
        (REPLICA_AXIS, self.devices_per_worker),
    ]
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
    for axes, eqn, _ in found:
      gather = eqn.primitive.name == 'all_gather' and set(axes) == {
          REPLICA_AXIS
      }
      if set(axes) != {WORKER_AXIS} and not gather:
        raise ValueError(
            f"the transform's {eqn.primitive.name} spans {axes!r}, but this layout's"
            f" {self.num_workers} workers span {WORKER_AXIS!r} (each over its host's"
            f' {REPLICA_AXIS!r} devices)' + hint
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
    """As ``Layout.train_step``: one step per call, model state synced."""
    if multi_step:
      raise ValueError('HostLayout runs one step per call (multi_step=False)')
    if not sync_model_state:
      raise ValueError(
          'HostLayout syncs the model state (sync_model_state=True)'
      )
    split = self.axis_name
    first = lambda tree: jax.tree.map(lambda x: x[0], tree)

    def local_step(params, model_state, opt_state, batch):
      state = first(opt_state)
      if check_collectives:  # once per trace
        self.check_collectives(tx, params, state)
      point = feedback.eval_point(params, state)
      (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          point, model_state, first(batch)
      )
      # The worker's gradient: the mean over its host's devices.
      grads = jax.lax.pmean(grads, REPLICA_AXIS)
      updates, state = tx.update(grads, state, params)
      model_state = compress.worker_mean(
          jax.lax.pmean(model_state, REPLICA_AXIS), split
      )
      loss = jax.lax.pmean(loss, (WORKER_AXIS, REPLICA_AXIS))
      new_state = jax.tree.map(lambda x: x[None], state)
      return optax.apply_updates(params, updates), model_state, new_state, loss

    step = jax.shard_map(
        local_step,
        mesh=self.mesh,
        in_specs=(P(), P(), P(WORKER_AXIS), P(WORKER_AXIS, REPLICA_AXIS)),
        out_specs=(P(), P(), P(WORKER_AXIS), P()),
        check_vma=False,
    )
    return jax.jit(step, donate_argnums=(0, 1, 2) if donate else ())

  def averaged_params(self, param_specs=None):
    return base.stacked_averaged_params()

  def dense_payload(self, params, param_specs=None) -> int:
    """d: every value of x (split M ways by ``bytes_per_step``)."""
    return optax.tree.size(params)

  def bytes_per_step(self, payload: int, model_state: int = 0) -> int:
    """Bytes one worker sends across hosts per step: each of its M devices
    sends ceil(payload / M) values of the block, ceil(model_state / M) of
    the synced statistics and the loss."""
    m = self.devices_per_worker
    split = lambda n: m * math.ceil(n / m) if n else 0
    return wire.bytes_per_step(split(payload), split(model_state)) + 4 * (m - 1)

  @classmethod
  def check_config(cls, config) -> None:
    m = config.devices_per_host
    if config.model_axis_size != 1:
      raise ValueError(
          f'devices_per_host={m} and model_axis_size={config.model_axis_size}: hosts of'
          ' data-parallel devices and model-sharded workers do not combine (no 3-D mesh)'
      )
    if config.batch_size % m:
      raise ValueError(
          f"batch_size={config.batch_size} (a worker's batch) does not split over its"
          f' devices_per_host={m} devices'
      )
    if not config.sync_batch_stats:
      raise ValueError('devices_per_host > 1 needs sync_batch_stats=True')
    if config.steps_per_dispatch > 1:
      raise ValueError(
          'devices_per_host > 1 runs one step per dispatch'
          f' (steps_per_dispatch={config.steps_per_dispatch})'
      )
    make_layout(config.num_workers, m)

  @classmethod
  def from_config(cls, config) -> HostLayout:
    return make_layout(config.num_workers, config.devices_per_host)

  @classmethod
  def devices_for(cls, config) -> int:
    return config.num_workers * config.devices_per_host


def make_layout(
    num_workers: int,
    devices_per_host: int,
    devices: Optional[Sequence[jax.Device]] = None,
) -> HostLayout:
  """K hosts of M devices: row k of the (K, M) mesh is the k-th group of M
  devices in process-then-id order, so a process of M devices is one host.

  Raises:
    ValueError: if K or M is not a positive int, or K x M exceeds the devices.
  """
  base.check_positive(
      num_workers=num_workers, devices_per_host=devices_per_host
  )
  devices = base.sorted_devices(devices)
  need = num_workers * devices_per_host
  if need > len(devices):
    raise ValueError(
        f'num_workers={num_workers} hosts x devices_per_host={devices_per_host} need'
        f' {need} devices; there are {len(devices)}'
    )
  grid = np.asarray(devices[:need]).reshape(num_workers, devices_per_host)
  mesh = Mesh(
      grid,
      (WORKER_AXIS, REPLICA_AXIS),
      axis_types=(jax.sharding.AxisType.Auto,) * 2,
  )
  return HostLayout(mesh=mesh, num_workers=num_workers)
