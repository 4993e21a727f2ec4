"""Test setup: 8 CPU devices, so shard_map runs real collectives.

This must run before anything initialises JAX's backends.
"""

import os

_flags = os.environ.get('XLA_FLAGS', '')
if 'xla_force_host_platform_device_count' not in _flags:
  os.environ['XLA_FLAGS'] = (_flags + ' --xla_force_host_platform_device_count=8').strip()

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
