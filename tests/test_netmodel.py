"""The cluster step-time model: ring all-reduce formula and speedups."""

import math

import pytest

from bench import netmodel

NET = netmodel.Network(bandwidth_gbps=10, latency_s=5e-6)


def test_one_worker_does_not_communicate():
  assert netmodel.ring_allreduce_s(1e9, 1, NET) == 0.0
  assert netmodel.step_s(0.1, 1e9, 1, NET) == pytest.approx(0.1)
  assert netmodel.speedup(0.1, 10**7, 256, 1, NET) == pytest.approx(1.0)


def test_ring_formula():
  n, k = 4e8, 16
  expected = 2 * 15 * 5e-6 + 2 * 15 / 16 * n / (10e9 / 8)
  assert netmodel.ring_allreduce_s(n, k, NET) == pytest.approx(expected)


def test_bytes_scaling():
  # Without latency the time is linear in the bytes...
  net = netmodel.Network(25)
  t1 = netmodel.ring_allreduce_s(1e6, 8, net)
  assert netmodel.ring_allreduce_s(4e6, 8, net) == pytest.approx(4 * t1)
  # ...and inversely proportional to the bandwidth.
  assert netmodel.ring_allreduce_s(
      1e6, 8, netmodel.Network(50)
  ) == pytest.approx(t1 / 2)
  # Per-worker traffic 2 (K-1)/K n approaches 2n as K grows.
  assert netmodel.ring_allreduce_s(1e6, 1024, net) / netmodel.ring_allreduce_s(
      1e6, 2, net
  ) == pytest.approx(2 * 1023 / 1024)


def test_payload_bytes():
  d = 14_728_266
  assert netmodel.payload_bytes(d, dense=True) == 4 * (d + 1)
  assert netmodel.payload_bytes(d, 256, model_state=8448) == 4 * (
      math.ceil(d / 256) + 8448 + 1
  )
  assert netmodel.payload_bytes(d, 1) == netmodel.payload_bytes(d, dense=True)


def test_speedup_when_communication_dominates():
  d = 14_728_266
  for ratio in (16, 64, 256, 1024):
    s = netmodel.speedup(1e-3, d, ratio, 16, netmodel.Network(1))
    assert s >= 1
  # More compression never slows the step down (no extra overhead here).
  s = [
      netmodel.speedup(1e-3, d, r, 16, netmodel.Network(1))
      for r in (16, 64, 256)
  ]
  assert s == sorted(s)
  # Comm-dominated: the speedup approaches (c + T_sgd) / c.
  assert netmodel.speedup(1e-3, d, 1e9, 16, netmodel.Network(1)) > 100


def test_speedup_bounded_by_overhead_and_steps():
  d = 10**7
  fast = netmodel.Network(400)
  assert netmodel.speedup(1.0, d, 256, 16, fast, overhead_s=0.5) < 1
  assert netmodel.speedup(
      0.01, d, 256, 16, NET, steps_ratio=2
  ) == pytest.approx(netmodel.speedup(0.01, d, 256, 16, NET) / 2)


def test_compute_for_speedup_inverts_speedup():
  d = 14_728_266
  c = netmodel.compute_for_speedup(3.6, d, 64, 16, NET)
  assert c > 0
  assert netmodel.speedup(c, d, 64, 16, NET) == pytest.approx(3.6)
  assert math.isnan(netmodel.compute_for_speedup(1e6, d, 64, 16, NET))


def test_validation():
  with pytest.raises(ValueError):
    netmodel.Network(0)
  with pytest.raises(ValueError):
    netmodel.ring_allreduce_s(1.0, 0, NET)
