"""Checkpoints that hold everything the next step depends on (orbax).

A checkpoint is the train state (params, batch-norm statistics and every
worker's optimizer state: error, momentum, the shared block-selection key and
step counter) plus a small JSON record: the step, the running train-loss
accumulator, the elapsed wall time and a fingerprint of the config fields
the state's meaning depends on. The input pipeline's position (epoch and
offset in the shuffled order) is a function of the step, so restoring the
step restores it.

orbax writes each checkpoint to a temporary directory and renames it when
complete, so a save killed half-way is never listed and never restored.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

# Config fields whose change makes a saved state meaningless for this run.
FINGERPRINT_KEYS = (
    'dataset', 'model', 'num_workers', 'optim.method', 'optim.ratio',
    'optim.lam', 'optim.per_leaf', 'seed', 'batch_size',
)


class CheckpointMismatch(ValueError):
  """A checkpoint does not fit the config of the run that finds it."""


def fingerprint(config) -> dict[str, Any]:
  out = {}
  for key in FINGERPRINT_KEYS:
    value = config
    for part in key.split('.'):
      value = value[part]
    out[key] = list(value) if isinstance(value, tuple) else value
  return out


def compare(saved: dict, current: dict, *, allow: tuple[str, ...] = ()) -> None:
  """Raises CheckpointMismatch naming every field that differs."""
  diffs = [
      f'{k}: checkpoint {saved.get(k)!r} vs config {current[k]!r}'
      for k in current
      if k not in allow and saved.get(k) != current[k]
  ]
  if diffs:
    raise CheckpointMismatch(
        'the checkpoint in the workdir was written by a different run ('
        + '; '.join(diffs)
        + '); use a new --workdir, or restore the original config'
    )


def manager(directory: str, *, max_to_keep: int) -> ocp.CheckpointManager:
  directory = os.path.abspath(directory)
  return ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
      ),
  )


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
  mngr.save(
      step,
      args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
      ),
      force=True,
  )
  mngr.wait_until_finished()


def latest_meta(mngr: ocp.CheckpointManager) -> Optional[tuple[int, dict]]:
  step = mngr.latest_step()
  if step is None:
    return None
  restored = mngr.restore(
      step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
  )
  return step, restored['meta']


def restore(mngr: ocp.CheckpointManager, step: int, target):
  """Restores the state at ``step`` onto ``target``'s shapes and shardings."""
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target
  )
  restored = mngr.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
  )
  return restored['state']


def restore_raw(mngr: ocp.CheckpointManager, step: int):
  """Restores the state as host numpy arrays, whatever their saved shapes."""
  restored = mngr.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
  )
  return jax.tree.map(np.asarray, restored['state'])
