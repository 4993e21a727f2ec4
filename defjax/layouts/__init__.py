"""Where the K workers live: one interface, one module per layout.

``base.Layout`` is the interface: the mesh; where x, the per-worker state and
the batch live; ``init_state``, ``train_step``, the output model
(``averaged_params``), the payload and the training config's checks.

* ``data_parallel``: a 1-D mesh, one device (or a share of one) per worker,
  x replicated.
* ``sharded``: a ('data', 'model') mesh, M devices per worker, x sharded over
  'model' by the model's PartitionSpecs, per-shard RBGS.
* ``hosts``: a ('data', 'replica') mesh, a worker is a host of M
  data-parallel devices, x replicated; only the block crosses hosts, split M
  ways.

``for_config(config)`` is the layout a training config asks for; the
training program asks nothing else about where its workers are.
"""

from __future__ import annotations

from defjax.layouts import data_parallel
from defjax.layouts import hosts
from defjax.layouts import sharded
from defjax.layouts.base import Layout
from defjax.layouts.base import host_value
from defjax.layouts.data_parallel import DataParallelLayout
from defjax.layouts.hosts import HostLayout
from defjax.layouts.sharded import ShardedLayout


def layout_class(config) -> type[Layout]:
  """The layout of a training config: ``devices_per_host`` M > 1 is hosts of
  M data-parallel devices, ``model_axis_size`` M > 1 workers of M model
  shards, neither the 1-D layout."""
  if config.get('devices_per_host', 1) > 1:
    return hosts.HostLayout
  return (
      data_parallel.DataParallelLayout
      if config.model_axis_size == 1
      else sharded.ShardedLayout
  )


def check_config(config) -> None:
  """Raises ValueError naming what in ``config`` its layout cannot run."""
  layout_class(config).check_config(config)


def for_config(config) -> Layout:
  """The layout of a training config (after ``check_config``)."""
  return layout_class(config).from_config(config)


def devices_for(config) -> int:
  """The devices a config's workers use: K, or K x M."""
  return layout_class(config).devices_for(config)


__all__ = [
    'DataParallelLayout',
    'HostLayout',
    'Layout',
    'ShardedLayout',
    'check_config',
    'data_parallel',
    'devices_for',
    'for_config',
    'host_value',
    'hosts',
    'layout_class',
    'sharded',
]
