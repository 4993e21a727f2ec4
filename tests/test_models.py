"""Tests for defjax.training.models: parameter counts, shapes, and the BatchNorm contract."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from defjax.training import models

BATCH = 2
NUM_CLASSES = {  # the datasets each model is trained on
    'cnn': 10,  # Fashion-MNIST
    'mlp_tp': 10,  # Fashion-MNIST
    'vgg16': 10,  # CIFAR-10
    'vgg16_slim': 10,  # CIFAR-10
    'vgg16_linear': 10,  # CIFAR-10
    'vgg16_slim_linear': 10,  # CIFAR-10
    'resnet20': 10,  # CIFAR-10
    'preact_resnet110': 100,  # CIFAR-100
    'wrn28_10': 100,  # CIFAR-100
    'resnet50': 1000,  # ImageNet
}
DROPOUT = {
    'dropout': jax.random.PRNGKey(1)
}  # the VGGs' classifier; others ignore it
IMAGE_SHAPE = {
    'cnn': (28, 28, 1),
    'mlp_tp': (28, 28, 1),
    'resnet50': (224, 224, 3),
}  # else 32x32x3

# Published parameter counts (BN scale and bias included, running statistics
# excluded), reproduced by the formulas below before the models are checked
# against the formulas.
PUBLISHED = {
    # kuangliu/pytorch-cifar VGG('VGG16'), CIFAR-10.
    ('vgg16_linear', 10): 14_728_266,
    # The DEF authors' VGG-16: the same convolutions, then Linear(512, 512)
    # twice before Linear(512, 10): 14,728,266 + 2 x (512 x 512 + 512).
    ('vgg16', 10): 15_253_578,
    # WRN-28-10 on CIFAR-10 (Zagoruyko & Komodakis, "36.5M").
    ('wrn28_10', 10): 36_479_194,
    # torchvision.models.resnet50().
    ('resnet50', 1000): 25_557_032,
}
# He et al.'s CIFAR ResNets use zero-padding shortcuts (option A); their
# widely reproduced counts are ResNet-20: 269,722 and ResNet-110: 1,727,962.
# Ours project instead: ResNet-20 adds a 1x1 conv + BN at each of the two
# downsamplings, the pre-activation ResNet-110 adds the 1x1 convs only (its
# two BN layers that see the narrower input cost 96 parameters less, the same
# 96 that moving the stem BN to the 64-channel head adds).
PUBLISHED_OPTION_A = {
    ('resnet20', 10): (269_722, (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)),
    ('preact_resnet110', 10): (1_727_962, 16 * 32 + 32 * 64),
}


# ------------------------------------------------- counting by hand


def _conv(k, cin, cout, bias=False):
  return k * k * cin * cout + (cout if bias else 0)


def _bn(c):
  return 2 * c  # scale and bias


def _dense(cin, cout):
  return cin * cout + cout


def _cnn(n):
  # 28 -> 14 -> 7 after the two pools.
  return (
      _conv(3, 1, 32, True)
      + _conv(3, 32, 64, True)
      + _dense(7 * 7 * 64, 128)
      + _dense(128, n)
  )


def _vgg16(n, width=1.0, head=True):
  total, cin = 0, 3
  for c in (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512):
    c = int(c * width)
    total += _conv(3, cin, c, True) + _bn(c)
    cin = c
  if head:
    total += 2 * _dense(cin, cin)
  return total + _dense(cin, n)


def _stages(blocks, widths, cin):
  """(input width, output width, downsamples) for every block."""
  for stage, (count, width) in enumerate(zip(blocks, widths)):
    for block in range(count):
      yield cin, width, stage > 0 and block == 0
      cin = width


def _resnet20(n):
  total = _conv(3, 3, 16) + _bn(16)
  for cin, c, down in _stages((3, 3, 3), (16, 32, 64), 16):
    total += _conv(3, cin, c) + _bn(c) + _conv(3, c, c) + _bn(c)
    if down or cin != c:
      total += _conv(1, cin, c) + _bn(c)
  return total + _dense(64, n)


def _preact(n, blocks, widths):
  total = _conv(3, 3, 16)
  for cin, c, down in _stages(blocks, widths, 16):
    total += _bn(cin) + _conv(3, cin, c) + _bn(c) + _conv(3, c, c)
    if down or cin != c:
      total += _conv(1, cin, c)
  return total + _bn(widths[-1]) + _dense(widths[-1], n)


def _resnet50(n):
  total = _conv(7, 3, 64) + _bn(64)
  cin = 64
  for stage, (count, w) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
    for _ in range(count):
      total += (
          _conv(1, cin, w)
          + _bn(w)
          + _conv(3, w, w)
          + _bn(w)
          + _conv(1, w, 4 * w)
          + _bn(4 * w)
      )
      if cin != 4 * w:  # the first block of every stage
        total += _conv(1, cin, 4 * w) + _bn(4 * w)
      cin = 4 * w
  return total + _dense(2048, n)


EXPECTED = {
    'cnn': _cnn,
    'mlp_tp': (
        lambda n: _dense(784, 1024) + _dense(1024, 1024) + _dense(1024, n)
    ),
    'vgg16': _vgg16,
    'vgg16_slim': lambda n: _vgg16(n, width=0.25),
    'vgg16_linear': lambda n: _vgg16(n, head=False),
    'vgg16_slim_linear': lambda n: _vgg16(n, width=0.25, head=False),
    'resnet20': _resnet20,
    'preact_resnet110': lambda n: _preact(n, (18,) * 3, (16, 32, 64)),
    'wrn28_10': lambda n: _preact(n, (4,) * 3, (160, 320, 640)),
    'resnet50': _resnet50,
}


# ------------------------------------------------- helpers


def _images(name, seed=0):
  shape = (BATCH,) + IMAGE_SHAPE.get(name, (32, 32, 3))
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _count(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=None)
def _initialised(name):
  """(model, x, variables) for the models small enough to run on CPU."""
  model = models.get_model(name, NUM_CLASSES[name])
  x = _images(name)
  return model, x, model.init(jax.random.PRNGKey(0), x, train=False)


def _allclose(a, b, **kw):
  return all(
      jax.tree.leaves(
          jax.tree.map(lambda u, v: bool(np.allclose(u, v, **kw)), a, b)
      )
  )


# ------------------------------------------------- tests


def test_registry_covers_every_model():
  assert set(models.MODELS) == set(EXPECTED) == set(NUM_CLASSES)


@pytest.mark.parametrize('key', sorted(PUBLISHED))
def test_formula_reproduces_published_count(key):
  name, num_classes = key
  assert EXPECTED[name](num_classes) == PUBLISHED[key]


@pytest.mark.parametrize('key', sorted(PUBLISHED_OPTION_A))
def test_formula_is_option_a_count_plus_projections(key):
  name, num_classes = key
  option_a, projections = PUBLISHED_OPTION_A[key]
  assert EXPECTED[name](num_classes) == option_a + projections


@pytest.mark.parametrize('name', models.MODELS)
def test_param_count_and_output_shape(name):
  num_classes = NUM_CLASSES[name]
  model = models.get_model(name, num_classes)
  x = jax.ShapeDtypeStruct(_images(name).shape, jnp.float32)
  # eval_shape traces without computing: ResNet-50 and WRN stay cheap.
  variables = jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.PRNGKey(0), x
  )
  assert _count(variables['params']) == EXPECTED[name](num_classes)
  logits, updates = jax.eval_shape(
      functools.partial(
          model.apply, train=True, mutable=['batch_stats'], rngs=DROPOUT
      ),
      variables,
      x,
  )
  assert logits.shape == (BATCH, num_classes)
  assert logits.dtype == jnp.float32
  # Running statistics exist exactly for the models with BatchNorm.
  has_bn = name not in ('cnn', 'mlp_tp')
  assert ('batch_stats' in variables) == has_bn
  assert set(updates) == ({'batch_stats'} if has_bn else set())
  if has_bn:
    assert jax.tree.structure(updates['batch_stats']) == jax.tree.structure(
        variables['batch_stats']
    )


def test_mlp_tp_is_column_then_row_parallel():
  """Megatron's pairing: the first layer's output units and the second's
  input units are split over 'model'; the classifier is whole."""
  from jax.sharding import PartitionSpec as P

  model = models.get_model('mlp_tp', 10)
  variables = jax.eval_shape(
      functools.partial(model.init, train=False),
      jax.random.PRNGKey(0),
      _images('mlp_tp'),
  )
  assert nn.get_partition_spec(variables)['params'] == {
      'column': {'kernel': P(None, 'model'), 'bias': P('model')},
      'row': {'kernel': P('model', None), 'bias': P(None)},
      'head': {'kernel': P(), 'bias': P()},
  }


def test_unknown_model_raises():
  with pytest.raises(ValueError, match=r"unknown model 'resnet18'.*resnet20"):
    models.get_model('resnet18', 10)


@pytest.mark.parametrize('name', ['cnn', 'resnet20', 'vgg16'])
def test_forward_train_and_eval(name):
  model, x, variables = _initialised(name)
  num_classes = NUM_CLASSES[name]
  logits, updates = model.apply(
      variables, x, train=True, mutable=['batch_stats'], rngs=DROPOUT
  )
  assert logits.shape == (BATCH, num_classes)
  assert bool(jnp.isfinite(logits).all())
  eval_logits = model.apply(variables, x, train=False)
  assert eval_logits.shape == (BATCH, num_classes)
  assert bool(jnp.isfinite(eval_logits).all())

  if name == 'cnn':
    # Without BatchNorm the mutable collection comes back empty, so the
    # trainer can merge `updates` into the variables unconditionally.
    assert not updates
    np.testing.assert_allclose(logits, eval_logits, rtol=1e-6)
    return

  old, new = variables['batch_stats'], updates['batch_stats']
  # Every running mean and variance moved towards the batch statistics.
  for u, v in zip(jax.tree.leaves(old), jax.tree.leaves(new)):
    assert not np.allclose(u, v)
  updated = {**variables, **updates}
  # Evaluation normalises with the running statistics: with the updated ones
  # the logits change, and each image's logits no longer depend on the rest
  # of the batch (in training they do).
  eval_updated = model.apply(updated, x, train=False)
  assert not np.allclose(eval_updated, eval_logits)
  np.testing.assert_allclose(
      model.apply(updated, x[:1], train=False),
      eval_updated[:1],
      rtol=1e-4,
      atol=1e-5,
  )
  train_single, _ = model.apply(
      variables, x[:1], train=True, mutable=['batch_stats'], rngs=DROPOUT
  )
  assert not np.allclose(train_single, logits[:1])


@pytest.mark.parametrize('name', ['resnet20', 'vgg16'])
def test_batch_norm_uses_pytorch_momentum(name):
  model, x, variables = _initialised(name)
  _, state = model.apply(
      variables,
      x,
      train=True,
      mutable=['batch_stats', 'intermediates'],
      rngs=DROPOUT,
      capture_intermediates=lambda mdl, _: isinstance(mdl, nn.Conv),
  )
  # Both models start conv -> BN; PyTorch's momentum=0.1 moves the running
  # statistics a tenth of the way from (0, 1) to the batch's.
  conv_out = state['intermediates']['Conv_0']['__call__'][0]
  stats = state['batch_stats']['BatchNorm_0']
  np.testing.assert_allclose(
      stats['mean'], 0.1 * conv_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
  )
  np.testing.assert_allclose(
      stats['var'], 0.9 + 0.1 * conv_out.var(axis=(0, 1, 2)), rtol=1e-4
  )


def test_initialisation_follows_pytorch():
  _, _, variables = _initialised('resnet20')
  params = variables['params']
  # kaiming_normal_(mode='fan_out'): std sqrt(2 / (3 * 3 * 64)) for the
  # 36,864 weights of a 64 -> 64 conv in the last stage.
  kernel = params['BasicBlock_8']['Conv_1']['kernel']
  assert kernel.shape == (3, 3, 64, 64)
  np.testing.assert_allclose(np.std(kernel), math.sqrt(2 / (9 * 64)), rtol=0.03)
  # Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) weights, zero bias.
  head = params['Dense_0']
  assert float(jnp.abs(head['kernel']).max()) <= 1 / math.sqrt(64)
  assert not jnp.any(head['bias'])
  # BN starts as the identity.
  bn = params['BatchNorm_0']
  assert jnp.all(bn['scale'] == 1) and not jnp.any(bn['bias'])
