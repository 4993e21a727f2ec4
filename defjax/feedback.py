"""The error-feedback family (EF, DEF, DEF-A, SAEF), PSync, EF21 and plain SGD.

EF, DEF, DEF-A and SAEF are one algorithm (paper Algorithm 1) with one
coefficient lam: the worker takes its gradient at the detached point
z = x - lam * e_k, then (line numbers of Algorithm 1)::

  7:  p_k = eta * m_k + e_k                (inner optimizer's step + error)
  8:  e_k <- p_k - C(p_k)
  9:  C(p) = mean_k C(p_k)                 (all-reduce of the block only)
  10: x <- x - C(p)

lam = 0 is EF, 0 < lam < 1 is DEF / DEF-A (they differ only in the model they
output: y = x - mean_k e_k for DEF, x for DEF-A), lam = 1 is SAEF. PSync is the
same recursion with lam = 1 read differently (see ``psync``). EF21 (the
paper tried it with RBGS: "it does not converge") and its momentum version
EF21-SGDM are ``ef21``: it compresses the change of each worker's momentum
instead of carrying an error.

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
  return jax.tree.map(
      lambda x, e: x - (lam * e).astype(x.dtype), params, state.error
  )


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
    p = jax.tree.map(
        lambda e, u: e - u.astype(e.dtype), state.error, inner_updates
    )
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


class EF21State(NamedTuple):
  """Worker k's momentum v_k and estimate h_k, the shared estimate h, the
  step count (the learning-rate schedule's argument) and C's state."""

  momentum: Any  # v_k; optax.EmptyState() when momentum = 0 (plain EF21)
  estimate: optax.Updates  # h_k
  shared_estimate: optax.Updates  # h, bitwise equal on every worker
  count: jax.Array
  compressor_state: Any


def check_momentum(momentum) -> float:
  """Returns momentum as a float, or raises ValueError unless 0 <= it < 1."""
  momentum = compress_lib.as_real_scalar(
      momentum, 'momentum', 'a number in [0, 1)'
  )
  if not 0.0 <= momentum < 1.0:
    raise ValueError(
        f'momentum must be in [0, 1) (0: plain EF21), got {momentum!r}'
    )
  return float(momentum)


def ef21(
    learning_rate: optax.ScalarOrSchedule,
    compressor: compress_lib.Compressor,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """EF21-SGDM: error feedback on the change of each worker's momentum.

  Worker k keeps its heavy-ball momentum v_k and an estimate h_k of it; only
  the compressed difference C(v_k - h_k) is all-reduced, and the model moves
  along h, the shared estimate of mean_k v_k. With mu = ``momentum``, wd =
  ``weight_decay``, eta_t = ``learning_rate`` at step t and all state zero at
  the start, one step is

    v_k <- mu v_k + g_k + wd x        (g_k: worker k's gradient at x)
    c_k  = C(v_k - h_k)               (the shared block of the difference)
    h_k <- h_k + c_k
    h   <- h + mean_k c_k             (one all-reduce of the block)
    x   <- x - eta_t h

  Since h and every h_k start at 0, h = mean_k h_k at every step (up to
  float rounding). mu = 0 is plain EF21 (Richtarik et al. 2021) started from
  zero estimates. The paper's EF21-SGDM averages v_k <- (1 - a) v_k + a g_k;
  heavy-ball momentum as in ``optax.sgd`` is that recursion times 1 / a with
  a = 1 - mu, and since C is linear, so are v_k, h_k and h: eta_t here is the
  paper's step size times a. With C = identity, h = mean_k v_k and this is
  momentum SGD on the mean gradient.

  Call ``update`` with the gradient at ``params`` = x (``eval_point`` is x)
  and apply the returned -eta_t h with ``optax.apply_updates``.

  Args:
    learning_rate: eta_t, a float or an optax schedule of the step count.
    compressor: the compressor C, e.g. ``defjax.rbgs(256)``; any defjax
      compressor works (with Top-K each worker's c_k is its own).
    momentum: mu in [0, 1); 0 is plain EF21 (no momentum is stored).
    weight_decay: wd, added to the gradient at x before the momentum.
    axis_name: the workers' named axis (or axes) under vmap, pmap or
      shard_map; None for a single worker.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    ``EF21State``.

  References:
    Fatkhullin, Tyurin & Richtarik, "Momentum Provably Improves Error
    Feedback!", NeurIPS 2023, Algorithm 1 (EF21-SGDM); Richtarik, Sokolov &
    Fatkhullin, "EF21: A New, Simpler, Theoretically Better, and Practically
    Faster Error Feedback", NeurIPS 2021.

  Example:
    >>> import jax.numpy as jnp, defjax
    >>> tx = defjax.ef21(0.1, defjax.rbgs(2), momentum=0.9)
    >>> params = {'w': jnp.ones(4)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones(4)}, state, params)
    >>> int((updates['w'] != 0).sum())  # h holds one block of d / ratio so far
    2
  """
  _check_compressor(compressor)
  mu = check_momentum(momentum)
  wd = compress_lib.as_real_scalar(
      weight_decay, 'weight_decay', 'a number >= 0'
  )
  if not wd >= 0:
    raise ValueError(f'weight_decay must be >= 0, got {weight_decay!r}')

  # h is kept per worker, like everything in a transform's state: the
  # program stacks each worker's state on a leading K axis, and a transform
  # has no other place for state. The K copies stay bitwise equal (each adds
  # the same all-reduced block values), as the K copies of x do; keeping one
  # copy would make part of the optimizer state replicated, a layout of its
  # own for one method, to save one d-vector per worker (the size of v_k).
  # Not keeping h at all (h = mean_k h_k) would cost a full all-reduce.
  def init_fn(params):
    compress_lib.check_float_leaves(params)
    zeros = optax.tree.zeros_like(params)
    return EF21State(
        momentum=zeros if mu else optax.EmptyState(),
        estimate=zeros,
        shared_estimate=zeros,
        count=jnp.zeros([], jnp.int32),
        compressor_state=compressor.init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # accepted, as in optax.chain, and unused
    if wd and params is None:
      raise ValueError(
          'ef21 with weight_decay needs params (x): call'
          ' update(grads, state, params)'
      )
    # In optax's order (add_decayed_weights, then trace), so that with C =
    # identity the momentum is computed as optax.sgd's.
    v = (
        jax.tree.map(lambda g, x: g + wd * x, updates, params)
        if wd
        else updates
    )
    if mu:
      v = jax.tree.map(lambda g, t: g + mu * t, v, state.momentum)
    diff = optax.tree.sub(v, state.estimate)
    mean_c, residual, compressor_state = compressor.aggregate(
        diff, state.compressor_state, axis_name
    )
    # C(diff) = diff - (diff - C(diff)): exact for a projection (RBGS,
    # Random-K, Top-K, identity), whose residual is diff or 0 per value.
    c = optax.tree.sub(diff, residual)
    shared = optax.tree.add(state.shared_estimate, mean_c)
    eta = (
        learning_rate(state.count) if callable(learning_rate) else learning_rate
    )
    new_updates = jax.tree.map(lambda h: jnp.asarray(-eta, h.dtype) * h, shared)
    return new_updates, EF21State(
        momentum=v if mu else state.momentum,
        estimate=optax.tree.add(state.estimate, c),
        shared_estimate=shared,
        count=optax.safe_increment(state.count),
        compressor_state=compressor_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
  return [s for s in jax.tree.leaves(opt_state, is_leaf=is_ef) if is_ef(s)]


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
