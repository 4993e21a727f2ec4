"""Checkpoints that hold everything the next step depends on (orbax).

A checkpoint is the train state (params, batch-norm statistics and every
worker's optimizer state: error, momentum, the shared block-selection key and
step counter) plus a small JSON record: the step, the running train-loss
accumulator, the elapsed wall time and a fingerprint of the config fields
the state's meaning depends on, and the input pipeline's iterator state
(grain's; the order is a function of the step, so it also follows from the
step, which a resume checks).

``resume`` is what a training program calls at start-up: it restores the
newest checkpoint that fits the config, or maps another worker count's
state onto this one (``config.resume_reshard``).

orbax writes each checkpoint to a temporary directory and renames it when
complete, so a save killed half-way is never listed and never restored.
"""

from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from defjax.layouts import base as layouts_base
from defjax.training import runfiles


class CheckpointMismatch(ValueError):
  """A checkpoint does not fit the config of the run that finds it."""


class CheckpointError(RuntimeError):
  """A checkpoint cannot be read or written; the message says what to do."""


def fingerprint(config) -> dict[str, Any]:
  """The config's values of a run's identity (``runfiles.IDENTITY``): config
  fields whose change makes a saved state meaningless for this run, or makes
  the resumed run a mix of two runs."""
  out = {}
  for key in runfiles.IDENTITY:
    value = runfiles.config_value(config, key)
    out[key] = list(value) if isinstance(value, tuple) else value
  return out


def compare(saved: dict, current: dict, *, allow: tuple[str, ...] = ()) -> None:
  """Raises CheckpointMismatch naming every field that differs.

  A field the saved fingerprint lacks is not compared: checkpoints written
  before it joined ``runfiles.IDENTITY`` stay resumable.
  """
  diffs = [
      f'{k}: checkpoint {saved[k]!r} vs config {current[k]!r}'
      for k in current
      if k not in allow and k in saved and saved[k] != current[k]
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
  try:
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
        ),
        force=True,
    )
    mngr.wait_until_finished()
  except OSError as e:
    raise CheckpointError(
        f'cannot write the checkpoint at step {step} to {mngr.directory}:'
        f' {e.strerror or e}; free space or fix permissions and rerun to'
        ' resume from the previous checkpoint'
    ) from None


def _unreadable(mngr, step, error) -> CheckpointError:
  path = os.path.join(str(mngr.directory), str(step))
  return CheckpointError(
      f'the checkpoint {path} is unreadable ({type(error).__name__}:'
      f' {str(error).splitlines()[0] if str(error) else ""}); delete that'
      ' directory to resume from the previous checkpoint, or use a new --workdir'
  )


def latest_meta(mngr: ocp.CheckpointManager) -> Optional[tuple[int, dict]]:
  """The newest complete checkpoint's step and JSON record, or None."""
  step = mngr.latest_step()
  if step is None:
    return None
  try:
    restored = mngr.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
    )
    meta = restored['meta']
    if not isinstance(meta, dict) or 'fingerprint' not in meta:
      raise ValueError('no run record in it')
  except Exception as e:  # orbax raises many types for damaged files
    raise _unreadable(mngr, step, e) from None
  return step, meta


def restore(mngr: ocp.CheckpointManager, step: int, target):
  """Restores the state at ``step`` onto ``target``'s shapes and shardings."""
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      target,
  )
  try:
    restored = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    )
  except Exception as e:
    raise _unreadable(mngr, step, e) from None
  return restored['state']


def restore_host(mngr: ocp.CheckpointManager, step: int, target):
  """Restores the state as host numpy arrays shaped like ``target``'s leaves."""
  target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), target)
  try:
    restored = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
    )
  except Exception as e:
    raise _unreadable(mngr, step, e) from None
  return jax.tree.map(np.asarray, restored['state'])


def reshard_workers(tree, old: int, new: int):
  """Maps per-worker leaves (leading axis ``old``) onto ``new`` workers.

  The mean over workers is preserved, so DEF's output y = x - mean_k e_k is
  unchanged: K = g K' averages groups of g consecutive workers; K' = g K
  repeats each worker g times; otherwise every new worker gets the mean.
  Every leaf of ``tree`` must be per worker (e.g. the optimizer state).
  """

  def one(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] != old:
      raise ValueError(
          f'expected a leading worker axis of {old}, got shape {x.shape}'
      )
    if old % new == 0:
      return x.reshape(new, old // new, *x.shape[1:]).mean(1).astype(x.dtype)
    if new % old == 0:
      return np.repeat(x, new // old, axis=0)
    mean = x.mean(0).astype(x.dtype)
    return np.broadcast_to(mean, (new, *x.shape[1:])).copy()

  return jax.tree.map(one, tree)


class Resumed(NamedTuple):
  """Where a run starts: its state, step and the saved JSON record."""

  state: Any
  step: int
  meta: dict  # {} for a fresh start
  reshard_info: dict  # resharded_from_workers, reshard_output_change (if so)


def resume(
    mngr: ocp.CheckpointManager,
    config,
    state,
    *,
    per_worker: tuple[str, ...],
    log: Callable[[str], Any] = print,
) -> Resumed:
  """Restores the newest checkpoint onto ``state`` (a dict), or starts fresh.

  A checkpoint of another ``num_workers`` is mapped onto this run's workers
  when ``config.resume_reshard`` is set (``reshard_workers`` on the entries
  named in ``per_worker``: their leaves lead with the worker axis), so that
  DEF's output model is preserved; otherwise any fingerprint difference
  raises CheckpointMismatch.
  """
  found = latest_meta(mngr)
  if found is None:
    return Resumed(state, 0, {}, {})
  step, meta = found
  saved_k = meta['fingerprint'].get('num_workers')
  k = config.num_workers
  if not (config.resume_reshard and saved_k != k):
    compare(meta['fingerprint'], fingerprint(config))
    log(f'resuming from the checkpoint at step {step}')
    return Resumed(restore(mngr, step, state), step, meta, {})
  compare(meta['fingerprint'], fingerprint(config), allow=('num_workers',))
  saved_shapes = {
      key: (
          jax.tree.map(
              lambda x: jax.ShapeDtypeStruct((saved_k, *x.shape[1:]), x.dtype),
              v,
          )
          if key in per_worker
          else v
      )
      for key, v in state.items()
  }
  raw = restore_host(mngr, step, saved_shapes)
  output = (
      layouts_base.stacked_averaged_params()
  )  # y = x - mean_k e_k, host arrays in
  y_before = output(raw['params'], raw['opt_state'])
  for key in per_worker:
    raw[key] = reshard_workers(raw[key], saved_k, k)
  y_after = output(raw['params'], raw['opt_state'])
  change = max(
      (
          float(np.abs(np.asarray(a) - np.asarray(b)).max())
          for a, b in zip(jax.tree.leaves(y_before), jax.tree.leaves(y_after))
      ),
      default=0.0,
  )
  state = jax.tree.map(
      lambda x, t: jax.device_put(x.astype(t.dtype), t.sharding), raw, state
  )
  log(
      f'resharded the checkpoint from {saved_k} to {k} workers: the output'
      f' model y = x - mean_k e_k moved by at most {change:.2g}'
  )
  log(f'resuming from the checkpoint at step {step}')
  return Resumed(
      state,
      step,
      meta,
      {'resharded_from_workers': saved_k, 'reshard_output_change': change},
  )
