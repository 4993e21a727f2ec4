"""Decoded arrays cached in memory and in ``cache_dir()`` as ``.npz``.

Decoding a JPEG folder or a TFDS split takes minutes; the cache makes it once
per machine. A key is a fingerprint of the files the arrays came from, so an
edited or replaced file makes a new key instead of a stale hit.
"""

from __future__ import annotations

import collections
import hashlib
import os
import pathlib
from typing import Callable, Mapping, Sequence

import numpy as np

# Bump when the layout of a cached .npz changes, so stale caches are ignored.
_CACHE_VERSION = 1

# The last few decoded datasets, so that info() then load(train) then
# load(test) decode or read from disk once per process.
_MEMO: collections.OrderedDict[str, dict[str, np.ndarray]] = (
    collections.OrderedDict()
)
_MEMO_SIZE = 4


def cache_dir() -> pathlib.Path:
  """``$DEFJAX_CACHE``, else ``~/.cache/defjax``: decoded arrays, downloads."""
  return pathlib.Path(
      os.environ.get('DEFJAX_CACHE') or '~/.cache/defjax'
  ).expanduser()


def fingerprint(tag: str, paths: Sequence[pathlib.Path]) -> str:
  """A cache key that changes when any of ``paths`` is replaced or edited."""
  digest = hashlib.sha256(f'{_CACHE_VERSION}:{tag}'.encode())
  for path in paths:
    stat = path.stat()
    digest.update(
        f'\0{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}'.encode()
    )
  return f'{tag}-{digest.hexdigest()[:20]}'


def cached(
    key: str, build: Callable[[], dict[str, np.ndarray]], *, disk: bool
) -> dict[str, np.ndarray]:
  """``build()``, memoised in memory and, if ``disk``, in ``cache_dir()``."""
  if key in _MEMO:
    _MEMO.move_to_end(key)
    return _MEMO[key]
  path = cache_dir() / f'{key}.npz'
  arrays = None
  if disk and path.exists():
    try:
      with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError):  # a truncated file: rebuild it
      arrays = None
  if arrays is None:
    arrays = build()
    if disk:
      _write_npz(path, arrays)
  for array in arrays.values():
    array.flags.writeable = False  # shared by every load(): no edits in place
  _MEMO[key] = arrays
  while len(_MEMO) > _MEMO_SIZE:
    _MEMO.popitem(last=False)
  return arrays


def _write_npz(path: pathlib.Path, arrays: Mapping[str, np.ndarray]) -> None:
  # Write then rename, so a concurrent or interrupted run never sees half a
  # file. A read-only cache only costs speed, so it is not an error.
  tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, 'wb') as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except OSError:
    tmp.unlink(missing_ok=True)
