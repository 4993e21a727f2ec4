"""Where the K workers run: the one place the program tells layouts apart.

``config.model_axis_size`` M = 1: ``parallel``'s 1-D mesh, x replicated, a
device's several workers (K > devices) with their gradients vmapped or
unrolled (``local_gradients``). M > 1: ``sharded``'s (K, M) mesh.
"""

from __future__ import annotations

import functools

import jax
import optax

from defjax import methods
from defjax import optimizer
from defjax import parallel
from defjax import sharded
from defjax import task

# How a device computes the gradients of its several workers when
# config.local_gradients is 'auto' (parallel.make_train_step's
# local_gradients). On CPU, DEF's K = 8 on 2 devices steps at 1.39x (CNN) and
# 1.08x (slim VGG-16) the time of 8 devices unrolled, 2.42x and 1.53x vmapped
# (vmap turns the convolutions at the per-worker points x - lam e_k into
# grouped ones; bench/local_workers.py). GPUs and TPUs are not measured yet
# (bench/gpu.py times both), so vmap there, the smaller program.
AUTO_LOCAL_GRADIENTS = {'cpu': 'unroll'}


def local_gradients(config) -> str:
  """How a device computes its workers' gradients: the config's, or the
  platform's measured best."""
  if config.local_gradients != 'auto':
    return config.local_gradients
  return AUTO_LOCAL_GRADIENTS.get(jax.devices()[0].platform, 'vmap')


class Workers:
  """Where the K workers run: the one place the trainer tells layouts apart.

  ``config.model_axis_size`` M = 1: ``parallel``'s 1-D mesh, x replicated.
  M > 1: ``sharded``'s (K, M) mesh, a worker is M devices, x sharded over
  'model' by the model's ``nn.with_partitioning`` specs, per-shard RBGS, one
  step per call and one copy of the model state (``validation`` checks).
  """

  def __init__(self, config):
    self.config = config
    self.devices_per_worker = m = config.model_axis_size  # M
    if m == 1:
      self.layout = parallel.make_layout(config.num_workers)
    else:
      self.layout = sharded.make_layout(config.num_workers, m)
    self.specs = None  # the params' PartitionSpecs, from init_variables

  def init_variables(self, model, config, image_shape):
    """x on the layout (sharded over 'model' by its specs) and the model state."""
    shardings = None
    if self.devices_per_worker > 1:
      shardings = functools.partial(sharded.param_shardings, layout=self.layout)
    params, batch_stats, self.specs = task.init_variables(
        model, config, image_shape, self.layout, shardings)
    return params, batch_stats

  @property
  def rbgs(self) -> optimizer.RBGS | None:
    """RBGS for ``optimizer.build``: its default, or one block per local shard."""
    if self.devices_per_worker == 1:
      return None
    return lambda ratio, key: sharded.rbgs(ratio, self.specs, self.layout, key=key)

  def init_state(self, tx, params):
    if self.devices_per_worker == 1:
      return parallel.init_worker_state(tx, params, self.layout)
    return sharded.init_worker_state(tx, params, self.layout, self.specs)

  def train_step(self, loss_fn, tx, *, sync_model_state: bool, multi_step: bool):
    if self.devices_per_worker == 1:
      return parallel.make_train_step(loss_fn, tx, self.layout, multi_step=multi_step,
                                      sync_model_state=sync_model_state,
                                      local_gradients=local_gradients(self.config))
    # validation refuses multi_step and unsynced model state for M > 1.
    return sharded.make_train_step(loss_fn, tx, self.layout, self.specs)

  def output_fn(self, method: str):
    """The reported model: y = x - mean_k e_k (DEF, PSync) or x."""
    if not methods.get(method).averaged_output:
      return lambda params, opt_state: params
    if self.devices_per_worker == 1:
      return parallel.make_averaged_params()
    return sharded.make_averaged_params(self.layout, self.specs)

  def dense_payload(self, params) -> int:
    """Values one device all-reduces per step without compression: d, or
    its shards' (and the unsharded leaves') values on the 2-D mesh."""
    if self.devices_per_worker == 1:
      return optax.tree.size(params)
    return sum(sharded.local_block_sizes(params, self.specs, 1.0, self.devices_per_worker))
