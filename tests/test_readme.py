"""The README's library example runs as written (given a model and a batch)."""

import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')


def test_readme_example_runs():
  with open(README) as f:
    text = f.read()
  block = re.search(r'## The library\n\n```python\n(.*?)```', text, re.S).group(1)
  model = nn.Dense(3)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))['params']
  rng = np.random.default_rng(0)
  batch_host = (rng.normal(size=(8, 4, 5)).astype(np.float32),
                rng.integers(0, 3, (8, 4)).astype(np.int32))
  namespace = {'model': model, 'params': params}
  prelude, rest = block.split('params, model_state, opt_state, loss = step(', 1)
  exec(prelude, namespace)
  namespace['batch'] = jax.device_put(batch_host, namespace['layout'].per_worker)
  exec('params, model_state, opt_state, loss = step(' + rest, namespace)
  assert np.isfinite(float(namespace['loss']))
  y, x = namespace['y'], namespace['params']
  assert jax.tree.structure(y) == jax.tree.structure(x)
