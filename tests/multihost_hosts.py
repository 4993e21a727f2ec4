"""A few DEF steps on 2 hosts x 4 devices (layouts.hosts), on one process or two.

Run by tests/test_multihost.py, with the device count in XLA_FLAGS (8 for one
process, 4 each for two):

  python tests/multihost_hosts.py OUT.npz [PORT PROCESS_ID NUM_PROCESSES]

With two processes each is one host: its 4 devices average the worker's
gradient among themselves and only the block's slices cross processes.
Process 0 writes x, y = x - mean_k e_k and the loss to OUT.npz.
"""

import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import defjax  # noqa: E402
from defjax import layouts, xla_cpu  # noqa: E402
from defjax.layouts import hosts  # noqa: E402
from helpers import mlp_loss, mlp_params, momentum_sgd  # noqa: E402

STEPS = 3


def _loss(params, model_state, batch):
  return mlp_loss(params, batch), model_state


def main(out, port=None, process_id=0, num_processes=1):
  xla_cpu.tolerate_slow_cpu_devices()
  if num_processes > 1:
    jax.distributed.initialize(
        f'127.0.0.1:{port}', num_processes=num_processes, process_id=process_id
    )
  layout = hosts.make_layout(2, 4)
  tx = defjax.error_feedback(
      momentum_sgd(), defjax.rbgs(8), lam=0.3, axis_name=layout.axis_name
  )
  params = jax.device_put(
      jax.tree.map(np.asarray, mlp_params()), layout.replicated
  )
  state = layout.init_state(tx, params)
  step = layout.train_step(_loss, tx)
  rng = np.random.default_rng(0)
  rows = layout.worker_rows()  # this process loads only its host's row
  assert rows == (
      slice(0, 2) if num_processes == 1 else slice(process_id, process_id + 1)
  )
  for _ in range(STEPS):
    x = rng.normal(size=(2, 8, 12)).astype(np.float32)
    y = rng.integers(0, 3, (2, 8)).astype(np.int32)
    batch = (layout.global_batch(x[rows]), layout.global_batch(y[rows]))
    params, _, state, loss = step(params, {}, state, batch)
  y = layout.averaged_params()(params, state)
  arrays = {
      f'{name}{i}': layouts.host_value(leaf)
      for name, tree in (('x', params), ('y', y))
      for i, leaf in enumerate(jax.tree.leaves(tree))
  }
  arrays['loss'] = layouts.host_value(loss)
  if jax.process_index() == 0:
    np.savez(out, **arrays)


if __name__ == '__main__':
  main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
