"""DEF on a ('data', 'model') mesh of 8 CPU devices: workers that are sharded.

The reference is a direct, unsharded implementation of K workers with the
per-shard block rule written out (each leaf split into its M model shards by
hand), not the library's compressor.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import defjax
from defjax import layouts, wire
from defjax.layouts import sharded
from defjax.training import checkpoint
from helpers import batches, mlp_loss, mlp_params, momentum_sgd, shard_params

LR, MU, WD = 0.1, 0.9, 5e-4
SIZES = (12, 64, 3)  # hidden 64: sharded over up to 8 model devices
# Megatron-style tensor parallelism: column-parallel then row-parallel.
SPECS = {
    'layer0': {'w': P(None, 'model'), 'b': P('model')},
    'layer1': {'w': P('model', None), 'b': P()},
}


def _loss(params, model_state, batch):
  return mlp_loss(params, batch), model_state


def _setup(num_workers, model_axis_size, *, ratio=4, lam=0.3):
  layout = sharded.make_layout(num_workers, model_axis_size)
  compressor = layout.rbgs(ratio, SPECS, per_leaf=True)
  tx = defjax.error_feedback(
      momentum_sgd(LR, MU, WD), compressor, lam=lam, axis_name=layout.axis_name
  )
  params = shard_params(mlp_params(sizes=SIZES), layout, SPECS)
  state = layout.init_state(tx, params, SPECS)
  step = layout.train_step(_loss, tx, SPECS, donate=False)
  return layout, compressor, params, state, step


def _block_mask(shape, spec, j, n_leaves, step, model_size, ratio, key=0):
  """The per-shard RBGS mask of leaf j at ``step``, written out directly."""
  dims = [d for d, s in enumerate(spec) if s == 'model']
  index = np.arange(int(np.prod(shape))).reshape(shape)
  shards = np.split(index, model_size, axis=dims[0]) if dims else [index]
  n_local = shards[0].size
  b = max(1, int(n_local // ratio))
  step_key = jax.random.fold_in(jax.random.PRNGKey(key), step)
  mask = np.zeros(index.size, bool)
  for r, shard in enumerate(shards):
    # Row r draws one start per leaf, each below that leaf's n_local; a leaf
    # every model device holds whole has one row, r = 0.
    bounds = np.asarray(n_leaves, np.int32)
    start = int(
        jax.random.randint(
            jax.random.fold_in(step_key, r), (len(bounds),), 0, bounds
        )[j]
    )
    mask[shard.ravel()[(start + np.arange(b)) % n_local]] = True
  return mask.reshape(shape)


def _reference(params, xs, ys, *, model_size, ratio, lam):
  """K workers of DEF (paper Algorithm 1) with per-shard blocks, in numpy."""
  leaves, treedef = jax.tree.flatten(jax.tree.map(np.asarray, params))
  specs = jax.tree.leaves(SPECS, is_leaf=lambda s: isinstance(s, P))
  n_local = [
      x.size // (model_size if 'model' in s else 1)
      for x, s in zip(leaves, specs)
  ]
  grad = jax.jit(jax.grad(mlp_loss))
  k_workers = xs.shape[1]
  error = [[np.zeros_like(x) for x in leaves] for _ in range(k_workers)]
  mom = [[np.zeros_like(x) for x in leaves] for _ in range(k_workers)]
  for t in range(xs.shape[0]):
    masks = [
        _block_mask(x.shape, s, j, n_local, t, model_size, ratio)
        for j, (x, s) in enumerate(zip(leaves, specs))
    ]
    total = [np.zeros_like(x) for x in leaves]
    for k in range(k_workers):
      z = [x - lam * e for x, e in zip(leaves, error[k])]
      g = jax.tree.leaves(grad(treedef.unflatten(z), (xs[t, k], ys[t, k])))
      mom[k] = [
          MU * m + np.asarray(gi) + WD * zi for m, gi, zi in zip(mom[k], g, z)
      ]
      p = [LR * m + e for m, e in zip(mom[k], error[k])]
      error[k] = [np.where(mask, 0, pi) for pi, mask in zip(p, masks)]
      total = [
          s + np.where(mask, pi, 0) for s, pi, mask in zip(total, p, masks)
      ]
    leaves = [x - s / k_workers for x, s in zip(leaves, total)]
  return treedef.unflatten(leaves), [treedef.unflatten(e) for e in error]


def _close(a, b, rtol=1e-5, atol=2e-6):
  jax.tree.map(
      lambda x, y: np.testing.assert_allclose(
          np.asarray(x), np.asarray(y), rtol=rtol, atol=atol
      ),
      a,
      b,
  )


@pytest.mark.parametrize(
    'mesh,lam',
    [((8, 1), 0.3), ((4, 2), 0.3), ((2, 4), 0.3), ((2, 4), 0.0)],
    ids=['8x1', '4x2', '2x4', '2x4-ef'],
)
def test_sharded_def_equals_direct_per_shard_blocks(mesh, lam):
  """8x1, 4x2 and 2x4 meshes train exactly the direct per-shard recursion."""
  num_workers, model_size = mesh
  layout, _, params, state, step = _setup(num_workers, model_size, lam=lam)
  types = jax.tree.map(jax.typeof, state)
  shardings = jax.tree.map(lambda a: a.sharding, state)
  xs, ys = batches(3, workers=num_workers)
  for t in range(xs.shape[0]):
    params, _, state, loss = step(
        params, {}, state, jax.device_put((xs[t], ys[t]), layout.per_worker)
    )
  assert np.isfinite(float(loss))
  assert step._cache_size() == 1  # no recompilation from step to step
  assert jax.tree.map(jax.typeof, state) == types
  for a, want in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
    assert a.sharding.is_equivalent_to(want, a.ndim)
  x_ref, errors_ref = _reference(
      mlp_params(sizes=SIZES), xs, ys, model_size=model_size, ratio=4, lam=lam
  )
  _close(params, x_ref)
  for k in range(num_workers):
    _close(jax.tree.map(lambda e: np.asarray(e)[k], state.error), errors_ref[k])
  # x, e_k and m_k kept their model sharding.
  for got, want in zip(
      jax.tree.leaves(params),
      jax.tree.leaves(layout.param_shardings(params, SPECS)),
  ):
    assert got.sharding.is_equivalent_to(want, got.ndim)


def test_one_worker_lam_one_is_momentum_sgd():
  """Identity 1 on a 1x2 mesh: y = x - e follows momentum SGD exactly."""
  layout, _, params, state, step = _setup(1, 2, lam=1.0)
  average = layout.averaged_params(SPECS)
  xs, ys = batches(4, workers=1)
  sgd = momentum_sgd(LR, MU, WD)
  y_ref = mlp_params(sizes=SIZES)
  sgd_state = sgd.init(y_ref)
  for t in range(xs.shape[0]):
    params, _, state, _ = step(
        params, {}, state, jax.device_put((xs[t], ys[t]), layout.per_worker)
    )
    g = jax.grad(mlp_loss)(y_ref, (xs[t, 0], ys[t, 0]))
    u, sgd_state = sgd.update(g, sgd_state, y_ref)
    y_ref = optax.apply_updates(y_ref, u)
    _close(average(params, state), y_ref)


def _replicated_blocks(layout, ratio=4):
  """The values of the blocks of the leaves every model device holds whole."""
  return sum(
      max(1, x.size // ratio)
      for x, s in zip(
          jax.tree.leaves(mlp_params(sizes=SIZES)),
          jax.tree.leaves(SPECS, is_leaf=lambda s: isinstance(s, P)),
      )
      if 'model' not in s
  )


def _check_wire(compiled, layout, payload):
  """What crosses the wire in a compiled step on ``layout``.

  Across workers ('data'): only all-reduces whose groups stay inside one model
  column, of exactly ``payload`` values per device (plus scalars: the loss).
  Nothing else is gathered, permuted or scattered: the one all-gather, over
  'model' only, puts together the M slices of the replicated leaves' blocks
  (each device averages one slice over the workers); the other model-axis
  traffic is the loss's own (activation all-reduces, smaller than any
  sharded leaf).
  """
  found = wire.transfers(compiled, layout.mesh)
  crossing = [t for t in found if t.spans('data')]
  assert crossing, 'no collective across workers'
  for t in crossing:
    assert not t.spans(
        'model'
    ), f'a collective across workers spans the model axis: {t}'
    assert t.collective.op == 'all-reduce', t
  block = sum(
      int(np.prod(s))
      for t in crossing
      for _, s in t.collective.shapes
      if s != ()
  )
  assert block == payload, (block, payload)
  m = layout.model_axis_size
  split = [] if m == 1 else [m * -(-_replicated_blocks(layout) // m)]
  gathers = [
      t.collective.elements for t in found if t.collective.op == 'all-gather'
  ]
  others = {t.collective.op for t in found} - {'all-reduce', 'all-gather'}
  assert (
      gathers == split and not others
  ), f'only all-reduces and the split blocks: {found}'
  smallest = min(
      x.size // layout.model_axis_size
      for x, s in zip(
          jax.tree.leaves(mlp_params(sizes=SIZES)),
          jax.tree.leaves(SPECS, is_leaf=lambda s: isinstance(s, P)),
      )
      if 'model' in s
  )
  for t in found:
    if t.spans('model') and t.collective.op == 'all-reduce':
      assert (
          t.collective.elements < smallest
      ), f'a large model-axis collective: {t}'


def test_transfers_read_both_replica_group_forms():
  """wire.transfers names the mesh axes a collective's groups span, from the
  explicit and the iota (also transposed) forms of HLO's replica_groups."""
  mesh = sharded.make_layout(2, 4).mesh
  op = 'x = f32[3]{0} all-reduce(f32[3]{0} y), replica_groups='
  for groups, axes in [
      ('{{0,1,2,3},{4,5,6,7}}', ('model',)),
      ('{{0,4},{1,5},{2,6},{3,7}}', ('data',)),
      ('[2,4]<=[8]', ('model',)),
      ('[4,2]<=[2,4]T(1,0)', ('data',)),
      ('{}', ('data', 'model')),
  ]:
    (t,) = wire.transfers(op + groups + ', to_apply=add', mesh)
    assert t.axes == axes, groups
    assert t.collective.op == 'all-reduce' and t.collective.elements == 3
  assert wire.replica_groups(op + '[4,2]<=[2,4]T(1,0)', 8) == [
      [0, 4],
      [1, 5],
      [2, 6],
      [3, 7],
  ]


def _compiled(layout, params, state, step):
  xs, ys = batches(1, workers=layout.num_workers)
  return step.lower(
      params, {}, state, jax.device_put((xs[0], ys[0]), layout.per_worker)
  ).compile()


@pytest.mark.parametrize('mesh', [(2, 4), (4, 2)], ids=['2x4', '4x2'])
def test_only_the_per_shard_blocks_cross_the_data_axis(mesh):
  layout, compressor, params, state, step = _setup(*mesh)
  payload = compressor.payload(params)
  # The formula, independently: max(1, floor(n_local / ratio)) per sharded
  # leaf, and the replicated leaves' blocks split over the M model devices
  # (each sent once per worker, not by each of its M devices).
  m = layout.model_axis_size
  sharded_blocks = sum(
      max(1, (x.size // m) // 4)
      for x, s in zip(
          jax.tree.leaves(params),
          jax.tree.leaves(SPECS, is_leaf=lambda s: isinstance(s, P)),
      )
      if 'model' in s
  )
  assert payload == sharded_blocks + -(-_replicated_blocks(layout) // m)
  _check_wire(_compiled(layout, params, state, step), layout, payload)


def _broken(broken, layout):
  """A transform that compresses or reduces across the model axis."""
  if broken == 'global_block':
    compressor, axis_name = defjax.rbgs(4, per_leaf=True), 'data'
  else:
    compressor, axis_name = layout.rbgs(4, SPECS, per_leaf=True), (
        'data',
        'model',
    )
  tx = defjax.error_feedback(
      momentum_sgd(), compressor, lam=0.3, axis_name=axis_name
  )
  return compressor, tx


@pytest.mark.parametrize('broken', ['global_block', 'reduce_over_model'])
def test_wire_check_fails_when_compression_touches_the_model_axis(broken):
  """The HLO check is not vacuous (with the step's trace-time check off). A
  global block (the 1-D per-leaf RBGS on model-sharded leaves, with its own
  payload) all-gathers a weight over 'model'; per-shard blocks averaged over
  ('data', 'model') all-reduce across the model axis."""
  layout = sharded.make_layout(2, 4)
  params = shard_params(mlp_params(sizes=SIZES), layout, SPECS)
  compressor, tx = _broken(broken, layout)
  match = (
      'only all-reduces' if broken == 'global_block' else 'spans the model axis'
  )
  state = layout.init_state(tx, params, SPECS)
  step = layout.train_step(
      _loss, tx, SPECS, donate=False, check_collectives=False
  )
  with pytest.raises(AssertionError, match=match):
    _check_wire(
        _compiled(layout, params, state, step),
        layout,
        compressor.payload(params),
    )


@pytest.mark.parametrize(
    'broken, match',
    [
        (
            'global_block',
            r"all-reduces a float32\[257\] array over 'data' outside a shard_map",
        ),
        ('reduce_over_model', r"reduces over \('data', 'model'\)"),
        ('no_axis', 'no collective over the 2 workers'),
        ('unknown_axis', 'an axis this layout lacks'),
    ],
)
def test_step_refuses_transforms_that_reduce_over_the_model_axis(broken, match):
  """Tracing the step refuses, before any compile, a transform built for the
  1-D layout (defjax.rbgs: its block is gathered out of model-sharded
  leaves) or with the wrong axis_name, naming the fix."""
  layout = sharded.make_layout(2, 4)
  params = shard_params(mlp_params(sizes=SIZES), layout, SPECS)
  if broken in ('global_block', 'reduce_over_model'):
    _, tx = _broken(broken, layout)
  else:
    axis_name = None if broken == 'no_axis' else 'workers'
    tx = defjax.error_feedback(
        momentum_sgd(),
        layout.rbgs(4, SPECS, per_leaf=True),
        lam=0.3,
        axis_name=axis_name,
    )
  state = layout.init_state(tx, params, SPECS)
  step = layout.train_step(_loss, tx, SPECS, donate=False)
  xs, ys = batches(1, workers=2)
  with pytest.raises(ValueError, match=match) as e:
    step.trace(
        params, {}, state, jax.device_put((xs[0], ys[0]), layout.per_worker)
    )
  assert 'layout.rbgs(ratio, param_specs, per_leaf=True)' in str(e.value)


@pytest.mark.parametrize('name', ['def', 'dense_warmup', 'sgd'])
def test_step_accepts_per_shard_and_whole_leaf_reductions(name):
  """Per-shard RBGS (also behind a dense warm-up) and dense SGD, whose
  all-reduce takes whole leaves, pass the check."""
  layout = sharded.make_layout(2, 4)
  params = shard_params(mlp_params(sizes=SIZES), layout, SPECS)
  compressor = layout.rbgs(4, SPECS, per_leaf=True)
  tx = {
      'def': lambda: defjax.error_feedback(
          momentum_sgd(), compressor, lam=0.3, axis_name='data'
      ),
      'dense_warmup': lambda: defjax.error_feedback(
          momentum_sgd(),
          defjax.dense_warmup(compressor, 2),
          lam=0.3,
          axis_name='data',
      ),
      'sgd': lambda: defjax.data_parallel(momentum_sgd(), axis_name='data'),
  }[name]()
  state = jax.eval_shape(tx.init, params)
  layout.check_collectives(tx, params, state)


def test_checkpoint_resume_of_sharded_state_is_bit_exact(tmp_path):
  layout, _, params, state, step = _setup(2, 4)
  xs, ys = batches(3, workers=2)
  batch = lambda t: jax.device_put((xs[t], ys[t]), layout.per_worker)
  params, _, state, _ = step(params, {}, state, batch(0))
  mngr = checkpoint.manager(str(tmp_path), max_to_keep=1)
  checkpoint.save(mngr, 1, {'params': params, 'opt_state': state}, {'step': 1})
  restored = checkpoint.restore(mngr, 1, {'params': params, 'opt_state': state})
  saved = {'params': params, 'opt_state': state}
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
  for t in (1, 2):
    params, _, state, _ = step(params, {}, state, batch(t))
    restored['params'], _, restored['opt_state'], _ = step(
        restored['params'], {}, restored['opt_state'], batch(t)
    )
  resumed = {'params': params, 'opt_state': state}
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_compress_keeps_one_block_per_shard():
  """C(p) outside the step (under jit on the mesh) is p on the written-out mask."""
  layout = sharded.make_layout(2, 4)
  compressor = layout.rbgs(4, SPECS, per_leaf=True)
  params = shard_params(mlp_params(sizes=SIZES), layout, SPECS)
  kept = jax.jit(compressor.compress)(params, compressor.init(params))
  leaves = jax.tree.leaves(mlp_params(sizes=SIZES))
  specs = jax.tree.leaves(SPECS, is_leaf=lambda s: isinstance(s, P))
  n_local = [
      x.size // (4 if 'model' in s else 1) for x, s in zip(leaves, specs)
  ]
  for j, (got, x, s) in enumerate(zip(jax.tree.leaves(kept), leaves, specs)):
    mask = _block_mask(x.shape, s, j, n_local, 0, 4, 4)
    np.testing.assert_array_equal(
        np.asarray(got), np.where(mask, np.asarray(x), 0)
    )
  assert compressor.payload(params) == sum(max(1, n // 4) for n in n_local)


def test_specs_are_checked():
  layout = sharded.make_layout(2, 4)
  params = mlp_params(sizes=SIZES)
  bad = jax.tree.map(lambda s: s, SPECS, is_leaf=lambda s: isinstance(s, P))
  bad['layer1']['b'] = P('model')  # 3 values over 4 shards
  with pytest.raises(ValueError, match='does not divide'):
    layout.check_param_specs(params, bad)
  bad['layer1']['b'] = P('data')
  with pytest.raises(ValueError, match="may only name 'model'"):
    layout.check_param_specs(params, bad)
  with pytest.raises(ValueError, match='needs 16 devices'):
    sharded.make_layout(4, 4)


def test_workers_initialise_x_already_sharded():
  """The program's init (``task.initializer`` on the config's layout) puts
  each shard of x on its device without a whole copy on any device: the
  compiled init's per-device output is the local shards' size, and its
  values are the unsharded init's."""
  import flax.linen as nn
  from configs import default
  from defjax.training import models, task

  config = default.get_config()
  config.update({'model': 'mlp_tp', 'num_workers': 4, 'model_axis_size': 2})
  model = models.get_model('mlp_tp', 10)
  layout = layouts.for_config(config)
  params, _, param_specs = task.init_variables(
      model, config, (28, 28, 1), layout
  )
  whole = nn.unbox(
      jax.jit(lambda k, x: model.init(k, x, train=False))(
          jax.random.PRNGKey(config.seed), jnp.zeros((1, 28, 28, 1))
      )
  )['params']
  specs = jax.tree.leaves(param_specs, is_leaf=lambda s: isinstance(s, P))
  local_bytes = 0
  for x, want, spec in zip(
      jax.tree.leaves(params), jax.tree.leaves(whole), specs
  ):
    np.testing.assert_array_equal(layouts.host_value(x), np.asarray(want))
    assert x.sharding.is_equivalent_to(
        jax.sharding.NamedSharding(layout.mesh, spec), x.ndim
    )
    local_bytes += x.nbytes // (2 if 'model' in spec else 1)
  assert local_bytes < optax.tree.size(whole) * 4  # something is sharded
  init, args, _ = task.initializer(model, config, (28, 28, 1), layout)
  out_bytes = init.lower(*args).compile().memory_analysis().output_size_in_bytes
  # XLA counts the output tuple's pointers too (8 bytes a leaf).
  assert local_bytes <= out_bytes <= local_bytes + 8 * len(specs)
