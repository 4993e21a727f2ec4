"""Compressors that send every value: scaling, identity, and a dense warm-up
in front of any compressor."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from defjax.compress.core import Compressor
from defjax.compress.core import check_float_leaves
from defjax.compress.core import leaf_sizes
from defjax.compress.core import worker_mean


def scaled(delta: float) -> Compressor:
  """C(A) = delta * A, for 0 < delta <= 1 (dense: sends every value).

  With one worker and lam = 1, error feedback with this C is SGD with
  exponential iterate averaging (paper Lemma C.1).
  """
  if isinstance(delta, bool) or not isinstance(delta, (int, float, np.number)):
    raise ValueError(f'delta must be a number in (0, 1], got {delta!r}')
  if not 0 < delta <= 1:
    raise ValueError(f'delta must be in (0, 1], got {delta!r}')
  delta = float(delta)

  def init(params):
    check_float_leaves(params)
    return optax.EmptyState()

  def compress(tree, state):
    del state
    return jax.tree.map(lambda x: delta * x, tree)

  def aggregate(tree, state, axis_name=None):
    mean = worker_mean(tree, axis_name)
    return (
        jax.tree.map(lambda x: delta * x, mean),
        jax.tree.map(lambda x: (1 - delta) * x, tree),
        state,
    )

  return Compressor(init, compress, aggregate, lambda p: sum(leaf_sizes(p)))


def identity() -> Compressor:
  """No compression: C(A) = A, a dense all-reduce of every value."""

  def init(params):
    check_float_leaves(params)
    return optax.EmptyState()

  def compress(tree, state):
    del state
    return tree

  def aggregate(tree, state, axis_name=None):
    return (
        worker_mean(tree, axis_name),
        jax.tree.map(jnp.zeros_like, tree),
        state,
    )

  return Compressor(init, compress, aggregate, lambda p: sum(leaf_sizes(p)))


class WarmupState(NamedTuple):
  """Steps taken, and the state of the compressor used after the warm-up."""

  count: jax.Array
  inner: Any


def dense_warmup(compressor: Compressor, steps: int) -> Compressor:
  """A dense all-reduce (C = identity) for ``steps`` steps, then ``compressor``.

  During the warm-up nothing is left behind (the error stays zero). Both
  collectives are in the compiled program; only one runs per step, chosen by
  the shared step count (under vmap, both run and one is selected).
  """
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
    raise ValueError(f'steps must be a non-negative integer, got {steps!r}')
  dense = identity()

  def init(params):
    return WarmupState(
        count=jnp.zeros([], jnp.int32), inner=compressor.init(params)
    )

  def compress(tree, state):
    return jax.lax.cond(
        state.count < steps,
        lambda: dense.compress(tree, optax.EmptyState()),
        lambda: compressor.compress(tree, state.inner),
    )

  def aggregate(tree, state, axis_name=None):
    def dense_branch():
      mean_c, residual, _ = dense.aggregate(tree, optax.EmptyState(), axis_name)
      return mean_c, residual, state.inner

    def compressed_branch():
      return compressor.aggregate(tree, state.inner, axis_name)

    mean_c, residual, inner = jax.lax.cond(
        state.count < steps, dense_branch, compressed_branch
    )
    return (
        mean_c,
        residual,
        WarmupState(count=optax.safe_increment(state.count), inner=inner),
    )

  return Compressor(init, compress, aggregate, compressor.payload)
