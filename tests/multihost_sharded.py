"""A few DEF steps on a 2 x 4 ('data', 'model') mesh, on one process or two.

Run by tests/test_multihost.py, with the device count in XLA_FLAGS (8 for one
process, 4 each for two):

  python tests/multihost_sharded.py OUT.npz [PORT PROCESS_ID NUM_PROCESSES]

Each worker is one process's row of 4 model devices, fed by that process
alone; the block all-reduce crosses processes (over 'data'). Process 0 writes x and y = x - mean_k e_k
to OUT.npz.
"""

import os
import sys

import jax
from jax.sharding import PartitionSpec as P
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import defjax  # noqa: E402
from defjax import layouts, xla_cpu  # noqa: E402
from defjax.layouts import sharded  # noqa: E402
from helpers import batches, mlp_loss, mlp_params, momentum_sgd, shard_params  # noqa: E402

STEPS = 3
SIZES = (12, 64, 3)  # the model of tests/test_sharded.py, Megatron-style
SPECS = {
    'layer0': {'w': P(None, 'model'), 'b': P('model')},
    'layer1': {'w': P('model', None), 'b': P()},
}


def _loss(params, model_state, batch):
  return mlp_loss(params, batch), model_state


def main(out, port=None, process_id=0, num_processes=1):
  xla_cpu.tolerate_slow_cpu_devices()
  if num_processes > 1:
    jax.distributed.initialize(
        f'127.0.0.1:{port}', num_processes=num_processes, process_id=process_id
    )
  layout = sharded.make_layout(2, 4)
  tx = defjax.error_feedback(
      momentum_sgd(),
      layout.rbgs(4, SPECS, per_leaf=True),
      lam=0.3,
      axis_name=layout.axis_name,
  )
  params = shard_params(
      jax.tree.map(np.asarray, mlp_params(sizes=SIZES)), layout, SPECS
  )
  state = layout.init_state(tx, params, SPECS)
  step = layout.train_step(_loss, tx, SPECS)
  xs, ys = (np.asarray(a) for a in batches(STEPS, workers=layout.num_workers))
  rows = layout.worker_rows()  # this process loads only its workers' rows
  assert rows == (
      slice(0, 2) if num_processes == 1 else slice(process_id, process_id + 1)
  )
  for t in range(STEPS):
    batch = (layout.global_batch(xs[t][rows]), layout.global_batch(ys[t][rows]))
    params, _, state, loss = step(params, {}, state, batch)
  y = layout.averaged_params(SPECS)(params, state)
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
