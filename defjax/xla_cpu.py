"""Workarounds for XLA:CPU's collectives, where each device is a host thread.

XLA:CPU runs each device's program on its own thread; at a collective the
threads meet in a rendezvous that LOG(FATAL)s (SIGABRT, the whole process)
when one participant is more than 40 s late (XLA's default for
xla_cpu_collective_call_terminate_timeout_seconds). Two things reach it:

* Slowness: eight CPU devices on two busy cores miss that easily, so a loaded
  machine killed correct runs. A late thread is not a hang:
  ``tolerate_slow_cpu_devices`` waits for it, up to XLA's own limit for
  cross-process collectives (30 minutes), so that a real deadlock still ends
  in an error. (jax.distributed's heartbeat still ends a run whose peer died.)
* A real deadlock: two multi-device programs that do not depend on each
  other, both in flight (e.g. a mean of every leaf of a per-worker tree,
  dispatched leaf by leaf), can interleave their participants across the
  device threads so that neither rendezvous completes
  (bench/cpu_collective_deadlock.py reproduces it). Programs that consume
  each other's outputs are ordered, so the training program runs its
  collectives as one program at a time (``run_alone``), and jits a tree
  operation whole rather than leaf by leaf.
"""

from __future__ import annotations

import os

import jax

CPU_COLLECTIVE_FLAGS = {
    'xla_cpu_collective_call_terminate_timeout_seconds': 1800,
    'xla_cpu_collective_call_warn_stuck_timeout_seconds': 300,
}


def tolerate_slow_cpu_devices() -> None:
  """Lets XLA:CPU collectives wait up to 30 minutes for late device threads.

  Adds ``CPU_COLLECTIVE_FLAGS`` to ``XLA_FLAGS`` (a flag already set there
  wins). XLA reads the flags when the first backend starts, so call this
  before the first computation; ``train.py`` and the tests do.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  for name, value in CPU_COLLECTIVE_FLAGS.items():
    if f'--{name}=' not in flags:
      flags += f' --{name}={value}'
  os.environ['XLA_FLAGS'] = flags.strip()


def run_alone(tree):
  """Waits until ``tree`` is computed: no other program runs beside it.

  Call it on the outputs of a multi-device program that nothing dispatched
  next depends on (an evaluation's model, averaged statistics): XLA:CPU can
  deadlock when two independent programs with collectives are in flight at
  once (see the module docstring).
  """
  return jax.block_until_ready(tree)
