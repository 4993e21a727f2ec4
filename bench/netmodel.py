"""A small model of step time on a cluster: compute + ring all-reduce.

Ring all-reduce of n bytes over K workers (reduce-scatter then all-gather,
each of K - 1 rounds moving n / K bytes per link), the alpha-beta model:

  t_comm(n, K) = 2 (K - 1) * latency + 2 (K - 1) / K * n / bandwidth

A step is ``compute + overhead + t_comm(payload)``, with no overlap of
communication and computation (a conservative model: frameworks that overlap
the dense all-reduce with the backward pass make SGD faster than this).
``payload_bytes`` is what defjax's compiled step sends: the RBGS block of
ceil(d / ratio) values (d for SGD), the synced batch-norm statistics and the
4-byte loss (``bench/wire_bytes.py`` checks this against the HLO).

The time-to-accuracy speedup of a method over SGD is the step-time ratio
times the ratio of steps each needs to reach the accuracy (1 when the method
reaches it in as many epochs, as DEF does in the paper's Figure 1).
"""

from __future__ import annotations

import dataclasses
import math

from defjax import wire


@dataclasses.dataclass(frozen=True)
class Network:
  """A link of ``bandwidth_gbps`` Gbit/s with ``latency_s`` per message hop."""

  bandwidth_gbps: float
  latency_s: float = 0.0

  def __post_init__(self):
    if not self.bandwidth_gbps > 0:
      raise ValueError(
          f'bandwidth_gbps must be > 0, got {self.bandwidth_gbps!r}'
      )
    if self.latency_s < 0:
      raise ValueError(f'latency_s must be >= 0, got {self.latency_s!r}')

  @property
  def bytes_per_s(self) -> float:
    return self.bandwidth_gbps * 1e9 / 8


def ring_allreduce_s(nbytes: float, num_workers: int, net: Network) -> float:
  """Seconds for a ring all-reduce of ``nbytes`` over ``num_workers``."""
  k = num_workers
  if k < 1:
    raise ValueError(f'num_workers must be >= 1, got {k!r}')
  if k == 1 or nbytes <= 0:
    return 0.0
  return (
      2 * (k - 1) * net.latency_s + 2 * (k - 1) / k * nbytes / net.bytes_per_s
  )


def payload_bytes(
    d: int,
    ratio: float = 1,
    *,
    model_state: int = 0,
    dense: bool = False,
    bytes_per_value: int = 4,
) -> int:
  """Bytes one worker all-reduces per step.

  Args:
    d: number of parameters.
    ratio: RBGS compression ratio (block of ceil(d / ratio) values).
    model_state: values of synced model state (batch-norm statistics).
    dense: True for SGD (all d values, whatever ``ratio``).
    bytes_per_value: 4 for float32.
  """
  sent = d if dense or ratio <= 1 else max(1, math.ceil(d / ratio))
  return wire.bytes_per_step(sent, model_state, bytes_per_value=bytes_per_value)


def step_s(
    compute_s: float,
    nbytes: float,
    num_workers: int,
    net: Network,
    overhead_s: float = 0.0,
) -> float:
  """One step: compute, the method's extra local work, then the all-reduce."""
  return compute_s + overhead_s + ring_allreduce_s(nbytes, num_workers, net)


def speedup(
    compute_s: float,
    d: int,
    ratio: float,
    num_workers: int,
    net: Network,
    *,
    model_state: int = 0,
    overhead_s: float = 0.0,
    steps_ratio: float = 1.0,
) -> float:
  """Time-to-accuracy speedup of RBGS at ``ratio`` over dense SGD.

  Args:
    compute_s: forward + backward (+ optimizer) seconds per step on a worker.
    d: number of parameters.
    ratio: compression ratio.
    num_workers: K.
    net: the network.
    model_state: synced model-state values (both methods send them).
    overhead_s: the compressed method's extra local seconds per step.
    steps_ratio: steps the method needs / steps SGD needs for the accuracy.
  """
  sgd = step_s(
      compute_s,
      payload_bytes(d, model_state=model_state, dense=True),
      num_workers,
      net,
  )
  comp = step_s(
      compute_s,
      payload_bytes(d, ratio, model_state=model_state),
      num_workers,
      net,
      overhead_s,
  )
  return sgd / (comp * steps_ratio)


def compute_for_speedup(
    target: float,
    d: int,
    ratio: float,
    num_workers: int,
    net: Network,
    *,
    model_state: int = 0,
    overhead_s: float = 0.0,
) -> float:
  """The compute seconds per step at which ``speedup`` equals ``target``.

  Solves (c + T_sgd) / (c + o + T_ratio) = S for c. Returns NaN when no
  c >= 0 gives the target (the network is too fast for that speedup).
  """
  if target <= 1:
    raise ValueError(f'target speedup must be > 1, got {target!r}')
  t_sgd = ring_allreduce_s(
      payload_bytes(d, model_state=model_state, dense=True), num_workers, net
  )
  t_c = ring_allreduce_s(
      payload_bytes(d, ratio, model_state=model_state), num_workers, net
  )
  c = (t_sgd - target * (overhead_s + t_c)) / (target - 1)
  return c if c >= 0 else float('nan')
