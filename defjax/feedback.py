"""The error-feedback family (EF, DEF, DEF-A, SAEF), PSync and plain SGD.

EF, DEF, DEF-A and SAEF are one algorithm (paper Algorithm 1) with one
coefficient lam: the worker takes its gradient at the detached point
z = x - lam * e_k, then (line numbers of Algorithm 1)

  7:  p_k = eta * m_k + e_k                (inner optimizer's step + error)
  8:  e_k <- p_k - C(p_k)
  9:  C(p) = mean_k C(p_k)                 (all-reduce of the block only)
  10: x <- x - C(p)

lam = 0 is EF, 0 < lam < 1 is DEF / DEF-A (they differ only in the model they
output: y = x - mean_k e_k for DEF, x for DEF-A), lam = 1 is SAEF. PSync is the
same recursion with lam = 1 read differently (see ``psync``).

The transforms here are per worker: under ``jax.vmap``/``jax.pmap``/
``jax.shard_map`` each worker holds its own state (error, momentum) and the
only collective is the compressor's all-reduce over ``axis_name``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from defjax import compress as compress_lib

AxisName = compress_lib.AxisName


class ErrorFeedbackState(NamedTuple):
  """This worker's compression error e_k, its lam, the inner and C states."""

  error: optax.Updates
  lam: jax.Array
  inner_state: optax.OptState
  compressor_state: Any


def check_lam(lam) -> float:
  """Returns lam as a float, or raises ValueError unless 0 <= lam <= 1."""
  lam = compress_lib.as_real_scalar(lam, 'lam', 'a number in [0, 1]')
  if not 0.0 <= lam <= 1.0:
    raise ValueError(
        f'lam must be in [0, 1] (0: EF, 0.3: DEF default, 1: SAEF), got {lam!r}'
    )
  return float(lam)


def _check_transformation(inner):
  if not isinstance(inner, optax.GradientTransformation):
    raise ValueError(
        f'inner must be an optax.GradientTransformation, got {type(inner)}'
    )


def _check_compressor(compressor):
  if not isinstance(compressor, compress_lib.Compressor):
    raise ValueError(
        'compressor must be a defjax compressor (defjax.rbgs(...),'
        f' defjax.identity(), ...), got {type(compressor)}'
    )


def _detach(params, state: ErrorFeedbackState):
  """z = x - lam * e_k, the detached gradient point (Algorithm 1, line 6)."""
  lam = state.lam.astype(jnp.result_type(*jax.tree.leaves(params)))
  return jax.tree.map(lambda x, e: x - (lam * e).astype(x.dtype), params, state.error)


def error_feedback(
    inner: optax.GradientTransformation,
    compressor: compress_lib.Compressor,
    *,
    lam: float = 0.0,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """Error feedback with compression C around any optax optimizer.

  Call ``update`` with the gradient taken at ``defjax.eval_point(params,
  state)`` and with ``params`` = x. The inner optimizer sees the eval point as
  its params (so weight decay is taken where the gradient is, as in the
  authors' code); its update -eta m_k plus the error is compressed, averaged
  over workers, and returned negated: apply it with ``optax.apply_updates``.

  Args:
    inner: the local optimizer, e.g. ``optax.chain(optax.add_decayed_weights(
      5e-4), optax.sgd(0.05, momentum=0.9))``.
    compressor: the shared compressor, e.g. ``defjax.rbgs(256)``.
    lam: detach coefficient in [0, 1]: 0 is EF, 0.3 the paper's DEF default,
      1 is SAEF.
    axis_name: the named axis (or axes) of the workers under vmap, pmap or
      shard_map; None for a single worker (no collective).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; extra args go to ``inner``.

  References:
    Xu & Huang, "Detached Error Feedback for Distributed SGD with Random
    Sparsification", ICML 2022, Algorithm 1.

  Example:
    >>> import jax.numpy as jnp, optax, defjax
    >>> tx = defjax.error_feedback(optax.sgd(0.1), defjax.rbgs(2), lam=0.3)
    >>> params = {'w': jnp.ones(4)}
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.ones(4)}  # gradient at defjax.eval_point(params, state)
    >>> updates, state = tx.update(grads, state, params)
    >>> int((updates['w'] != 0).sum())  # only a block of d / ratio moved
    2
  """
  _check_transformation(inner)
  _check_compressor(compressor)
  lam = check_lam(lam)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    compress_lib.check_float_leaves(params)
    return ErrorFeedbackState(
        error=optax.tree.zeros_like(params),
        lam=jnp.asarray(lam, jnp.float32),
        inner_state=inner.init(params),
        compressor_state=compressor.init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    point = None if params is None else _detach(params, state)
    inner_updates, inner_state = inner.update(
        updates, state.inner_state, point, **extra_args
    )
    # p_k = eta m_k + e_k; optax updates are already negated steps (-eta m_k).
    p = jax.tree.map(lambda e, u: e - u.astype(e.dtype), state.error, inner_updates)
    mean_c, error, compressor_state = compressor.aggregate(
        p, state.compressor_state, axis_name
    )
    new_updates = jax.tree.map(jnp.negative, mean_c)
    return new_updates, ErrorFeedbackState(
        error=error,
        lam=state.lam,
        inner_state=inner_state,
        compressor_state=compressor_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def psync(
    inner: optax.GradientTransformation,
    compressor: compress_lib.Compressor,
    *,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """Partial synchronisation: local models, a random block averaged per step.

  Each worker runs its own model x_k: x_k <- x_k - eta m_k, then on the block
  x_k <- mean_j x_j. Here the shared ``params`` x and the state's error hold
  the workers' models as x_k = x - e_k. Substituting shows that PSync is
  exactly the error-feedback recursion with lam = 1 (the SAEF recursion):
  x_k - eta m_k = x - p_k with p_k = eta m_k + e_k; averaging the block
  gives x' = x - C(mean_k p_k) and x_k' - x' = -(p_k - C(p_k)) = -e_k'.
  What differs from SAEF is the model one reads out: worker k trains
  ``eval_point`` = x_k, and PSync's output mean_k x_k is
  ``averaged_params`` = x - mean_k e_k, whereas SAEF outputs x.

  Args:
    inner: the local optimizer of every worker's model.
    compressor: the shared compressor selecting the averaged block.
    axis_name: the workers' named axis; None for a single worker.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    ``ErrorFeedbackState`` with lam = 1.
  """
  return error_feedback(inner, compressor, lam=1.0, axis_name=axis_name)


class DataParallelState(NamedTuple):
  """State of data_parallel: the inner optimizer's state."""

  inner_state: optax.OptState


def data_parallel(
    inner: optax.GradientTransformation, *, axis_name: AxisName = None
) -> optax.GradientTransformationExtraArgs:
  """Uncompressed data-parallel SGD: pmean the gradients, then ``inner``.

  The baseline of the paper (full all-reduce of every gradient value).

  Args:
    inner: the optimizer applied to the averaged gradient.
    axis_name: the workers' named axis; None for a single worker.
  """
  _check_transformation(inner)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return DataParallelState(inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    updates = compress_lib.worker_mean(updates, axis_name)
    updates, inner_state = inner.update(
        updates, state.inner_state, params, **extra_args
    )
    return updates, DataParallelState(inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------------------------- helpers


def _feedback_states(opt_state) -> list[ErrorFeedbackState]:
  is_ef = lambda x: isinstance(x, ErrorFeedbackState)
  return [
      s for s in jax.tree.leaves(opt_state, is_leaf=is_ef) if is_ef(s)
  ]


def _single_state(opt_state) -> Optional[ErrorFeedbackState]:
  states = _feedback_states(opt_state)
  if len(states) > 1:
    raise ValueError(
        f'opt_state holds {len(states)} error-feedback states; eval_point and'
        ' averaged_params need exactly one (compose one error_feedback per'
        ' optimizer)'
    )
  return states[0] if states else None


def eval_point(params, opt_state):
  """Where this worker takes its gradient.

  x - lam * e_k for the error-feedback family (x for EF, the worker's own
  model x_k for PSync), and x for every other optimizer state.

  Args:
    params: the model x.
    opt_state: the state of a transformation that may contain (in a chain, for
      example) one ``ErrorFeedbackState``.
  """
  state = _single_state(opt_state)
  return params if state is None else _detach(params, state)


def averaged_params(params, opt_state, *, axis_name: AxisName = None):
  """y = x - mean_k e_k: DEF's output model (PSync's mean_k x_k).

  Costs one all-reduce of the full error over ``axis_name``: call it to
  evaluate or export the model, never inside the training step. Returns
  ``params`` unchanged when ``opt_state`` holds no error.
  """
  state = _single_state(opt_state)
  if state is None:
    return params
  mean_error = compress_lib.worker_mean(state.error, axis_name)
  return jax.tree.map(lambda x, e: x - e.astype(x.dtype), params, mean_error)
