"""What every compressor shares: the ``Compressor`` bundle, its checks, the
shared key, and the mean over workers (``defjax.compress`` describes the
three functions a compressor is).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
# An int seed, a typed key (jax.random.key) or a raw uint32 key (PRNGKey).
KeyLike = Union[int, jax.Array]


class Compressor(NamedTuple):
  """A compressor C: ``init``, ``compress``, ``aggregate`` and ``payload``."""

  init: Callable[[PyTree], Any]
  compress: Callable[[PyTree, Any], PyTree]
  aggregate: Callable[[PyTree, Any, AxisName], tuple[PyTree, PyTree, Any]]
  payload: Callable[[PyTree], int]


class RandomState(NamedTuple):
  """Shared selection key (raw uint32[2]) and the number of steps taken."""

  key: jax.Array
  count: jax.Array


# -------------------------------------------------------------------- checks


def as_real_scalar(value, name: str, what: str) -> float:
  """``value`` as a float if it is a real number (Python, NumPy or a 0-d
  array); bools, strings and arrays with elements raise ValueError."""
  if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
    return float(value)  # np.bool_ is not an np.number
  dtype = getattr(value, 'dtype', None)
  if (
      dtype is None
      or np.ndim(value) != 0
      or not (
          np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)
      )
  ):
    raise ValueError(f'{name} must be {what}, got {value!r}')
  try:
    return float(value)
  except (
      Exception
  ):  # a tracer: the value must be known when the transform is built
    raise ValueError(
        f'{name} must be {what} known when the transform is built,'
        f' got {value!r}'
    ) from None


def check_ratio(ratio) -> float:
  """Returns ``ratio`` as a float, or raises ValueError if it is not >= 1."""
  ratio = as_real_scalar(ratio, 'ratio', 'a number >= 1')
  if not math.isfinite(ratio) or ratio < 1:
    raise ValueError(
        f'ratio must be >= 1 (1 = no compression, 256 = send 1/256 of the'
        f' values), got {ratio!r}'
    )
  return float(ratio)


def check_float_leaves(tree: PyTree) -> None:
  """Raises ValueError naming the first leaf of params that is not floating point."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  if not leaves:
    raise ValueError('params is an empty pytree: nothing to compress')
  for path, leaf in leaves:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
          f'params leaf {jax.tree_util.keystr(path)} has dtype {dtype}; error'
          ' feedback and compression need floating-point leaves (mask integer'
          ' leaves out with optax.masked or keep them outside params)'
      )


@dataclasses.dataclass(frozen=True)
class SplitAxis:
  """Workers along ``workers`` that each span the devices along ``within``
  and hold the same values on all of them (a host's data-parallel devices).

  Given as a transform's ``axis_name``, it makes every mean over workers
  (``worker_mean``) cross the workers' links once per worker instead of once
  per device: the values are flattened into one vector and cut into M =
  the size of ``within`` slices; the device at position j along ``within`` all-reduces
  slice j over ``workers`` (ceil(n / M) values), and the M reduced slices
  are all-gathered along ``within`` (the fast links inside a worker). The
  result is the plain mean's on every device, to float rounding (each slice
  is reduced on its own). ``defjax.layouts.hosts`` builds its transforms
  with one.

  Not a tuple on purpose: passed to a ``jax.lax`` collective directly, it
  raises instead of reducing over both axes.
  """

  workers: Union[str, tuple[str, ...]]
  within: str


AxisName = Optional[Union[str, Sequence[str], SplitAxis]]


def worker_axes(axis_name: AxisName):
  """The named axes the workers span: ``axis_name`` itself, or a
  ``SplitAxis``'s ``workers`` (for collectives that are not means)."""
  return axis_name.workers if isinstance(axis_name, SplitAxis) else axis_name


def num_workers(axis_name: AxisName):
  """K, the number of workers along ``axis_name`` (1 when it is None)."""
  return 1 if axis_name is None else jax.lax.psum(1, worker_axes(axis_name))


def worker_mean(tree: PyTree, axis_name: AxisName) -> PyTree:
  """mean_k tree_k over ``axis_name`` (identity for a single worker); split
  over the devices of each worker for a ``SplitAxis``."""
  if axis_name is None:
    return tree
  if isinstance(axis_name, SplitAxis):
    return split_mean(tree, axis_name.workers, axis_name.within)
  return jax.lax.pmean(tree, axis_name)


def split_mean(tree: PyTree, workers, within: str) -> PyTree:
  """mean_k tree_k over ``workers``, each device of a worker reducing one
  slice of the flattened tree (``SplitAxis``). ``tree`` must be equal on the
  devices along ``within``."""
  leaves, treedef = jax.tree.flatten(tree)
  if not leaves:
    return tree
  dtype = jnp.result_type(*leaves)
  flat = jnp.concatenate([jnp.ravel(x).astype(dtype) for x in leaves])
  m = jax.lax.axis_size(within)
  size = -(-flat.size // m)
  padded = jnp.pad(flat, (0, size * m - flat.size))
  mine = jax.lax.dynamic_slice(
      padded, (jax.lax.axis_index(within) * size,), (size,)
  )
  reduced = jax.lax.pmean(mine, workers)
  full = jax.lax.all_gather(reduced, within, tiled=True)[: flat.size]
  parts = jnp.split(full, np.cumsum([x.size for x in leaves])[:-1])
  return treedef.unflatten(
      [
          p.reshape(jnp.shape(x)).astype(jnp.result_type(x))
          for p, x in zip(parts, leaves)
      ]
  )


def block_size(d: int, ratio: float) -> int:
  """b = ceil(d / ratio), the RBGS block length for d values."""
  return max(1, math.ceil(d / ratio))


def leaf_sizes(tree: PyTree) -> list[int]:
  """The number of values of each leaf."""
  # np.size, not optax.tree.size's jnp.size: it also sizes ShapeDtypeStruct
  # leaves (jnp.size deprecates them), so payloads work on jax.eval_shape trees.
  return [np.size(x) for x in jax.tree.leaves(tree)]


# -------------------------------------------------------------- shared keys


def check_key(key: KeyLike) -> KeyLike:
  """Returns ``key`` if it is an int seed or a key, else raises ValueError.

  Checks types and shapes only: building a compressor computes nothing, so it
  may come before the program configures JAX's backends. A compressor calls
  it when built and ``as_key`` in its ``init``.
  """
  dtype = getattr(key, 'dtype', None)
  if isinstance(key, jax.Array) and jnp.issubdtype(dtype, jax.dtypes.prng_key):
    impl = jax.random.key_impl(key)
    if key.shape != () or str(impl) != jax.config.jax_default_prng_impl:
      raise ValueError(
          f'key must be a single key of the default PRNG implementation'
          f' ({jax.config.jax_default_prng_impl}), got {key.shape} keys of {impl}'
      )
    return key
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    return key
  if (
      dtype is not None
      and np.ndim(key) == 0
      and np.issubdtype(dtype, np.integer)
  ):
    return key  # a 0-d integer array: a seed
  raw = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  if dtype != raw.dtype or np.shape(key) != raw.shape:
    raise ValueError(
        'key must be an int seed, a jax.random.key or a raw jax.random.PRNGKey'
        f' ({raw.dtype}{list(raw.shape)}), got {key!r}'
    )
  return key


def as_key(key: KeyLike) -> jax.Array:
  """``key`` as a raw uint32 key: a seed s gives PRNGKey(s), a typed key its bits.

  What a compressor's state keeps whatever was given: checkpoints store it
  as a plain uint32 array, and PRNGKey(s) is the key the committed runs drew
  their blocks from (a typed jax.random.key(s) holds the same bits). Computes
  (PRNGKey), so call it in ``init``, not when building a compressor.

  Args:
    key: an int seed, a ``jax.random.key`` or a raw ``jax.random.PRNGKey``.

  Returns:
    A uint32 array shaped like ``jax.random.PRNGKey(0)``.

  Raises:
    ValueError: if ``key`` is none of those (see ``check_key``).

  Example:
    >>> import jax, numpy as np
    >>> from defjax import compress
    >>> bool(np.all(compress.as_key(3) == jax.random.PRNGKey(3)))
    True
  """
  key = check_key(key)
  if jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
    return jax.random.key_data(key)
  if np.ndim(key) == 0:
    return jax.random.PRNGKey(key)
  return jnp.asarray(key)


def step_key(state: RandomState) -> jax.Array:
  """This step's key: the shared key folded with the step count."""
  return jax.random.fold_in(state.key, state.count)


def random_init(key: KeyLike):
  """``init(params)`` of a random compressor: the shared key, count 0."""

  def init(params):
    check_float_leaves(params)
    return RandomState(key=as_key(key), count=jnp.zeros([], jnp.int32))

  return init


def advance(state: RandomState) -> RandomState:
  """The state of the next step."""
  return RandomState(key=state.key, count=optax.safe_increment(state.count))
