"""The README's library example and the layouts guide's sharded example run as
written, and do what they say."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')
LAYOUTS_GUIDE = os.path.join(ROOT, 'docs', 'guides', 'layouts.md')


def test_readme_example_runs():
  """The example is self-contained: it runs as written on the 8 test devices."""
  with open(README) as f:
    text = f.read()
  block = re.search(
      r'## The library\n\n(?:<!--[^\n]*-->\n)?```python\n(.*?)```', text, re.S
  ).group(1)
  namespace = {}
  exec(block, namespace)
  assert np.isfinite(float(namespace['loss']))
  y, x = namespace['y'], namespace['params']
  assert jax.tree.structure(y) == jax.tree.structure(x)
  # One step of DEF at ratio 256 moved only the block: b of d values changed.
  d = sum(leaf.size for leaf in jax.tree.leaves(x))
  moved = sum(
      int(np.sum(np.asarray(a) != np.asarray(b)))
      for a, b in zip(
          jax.tree.leaves(x),
          jax.tree.leaves(
              namespace['model'].init(
                  jax.random.PRNGKey(0), jnp.zeros((1, 784))
              )['params']
          ),
      )
  )
  assert 0 < moved <= -(-d // 256)


def test_layouts_guide_sharded_example_runs():
  """The layouts guide's sharded workers' example runs as written: a 4 x 2
  mesh, one step."""
  with open(LAYOUTS_GUIDE) as f:
    text = f.read()
  block = next(
      b
      for b in re.findall(r'```python\n(.*?)```', text, re.S)
      if 'sharded.make_layout' in b
  )
  namespace = {}
  exec(block, namespace)
  assert np.isfinite(float(namespace['loss']))
  layout, params, specs = (
      namespace['layout'],
      namespace['params'],
      namespace['specs'],
  )
  assert layout.mesh.shape == {'data': 4, 'model': 2}
  for x, want in zip(
      jax.tree.leaves(params),
      jax.tree.leaves(layout.param_shardings(params, specs)),
  ):
    assert x.sharding.is_equivalent_to(want, x.ndim)
  assert jax.tree.structure(namespace['y']) == jax.tree.structure(params)
