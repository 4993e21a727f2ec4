"""The image-classification task: the model's variables, the per-worker loss
and the test-set accuracy.

A worker's loss is keyed by (seed, step, worker): its crops, flips and
dropout depend only on those, so a resumed run draws what the uninterrupted
one drew.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from defjax import layouts
from defjax.training import data as data_lib


def initializer(model, config, image_shape, layout: layouts.Layout):
  """``(init, args, specs)``: ``init(*args)`` returns the model's variables
  with x on the layout; ``specs`` are x's PartitionSpecs (a model's
  ``nn.with_partitioning`` annotations, ``P()`` for unannotated leaves).

  The jitted init writes x straight into the layout's shardings for it
  (``Layout.param_shardings``), so a device computes and holds only its own
  shards of x (x sharded over 'model' is never whole on one device;
  tests/test_sharded.py checks the compiled program's per-device sizes).
  """
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  key = jax.random.PRNGKey(config.seed)
  init = functools.partial(model.init, train=False)
  boxed = jax.eval_shape(init, key, dummy)
  specs = nn.get_partition_spec(boxed)['params']
  abstract = nn.unbox(boxed)
  place = layout.param_shardings(abstract['params'], specs)
  shardings = {
      name: place if name == 'params' else layout.replicated
      for name in abstract
  }
  return (
      jax.jit(lambda k, x: nn.unbox(init(k, x)), out_shardings=shardings),
      (key, dummy),
      specs,
  )


def init_variables(model, config, image_shape, layout: layouts.Layout):
  """x, the batch-norm statistics (per worker if not synced) and x's specs,
  as ``initializer`` places them."""
  init, args, specs = initializer(model, config, image_shape, layout)
  variables = init(*args)
  params = variables['params']
  batch_stats = variables.get('batch_stats', {})
  if config.sync_batch_stats:
    return params, batch_stats, specs
  stacked = jax.tree.map(
      lambda x: jnp.stack([x] * config.num_workers), batch_stats
  )
  return params, jax.device_put(stacked, layout.per_worker), specs


def make_loss_fn(model, info: data_lib.DatasetInfo, config):
  """``loss_fn(params, batch_stats, (images, labels, ids))`` for one worker.

  ``ids``: one (step, worker) row per example; the first row keys the
  augmentation and dropout (the rows are equal).
  """
  base_key = jax.random.PRNGKey(config.seed)
  mean = jnp.asarray(info.mean, jnp.float32)
  std = jnp.asarray(info.std, jnp.float32)
  augment = config.crop_padding > 0 or config.flip

  def loss_fn(params, batch_stats, batch):
    images, labels, ids = batch
    step, worker = ids[0]
    key = jax.random.fold_in(jax.random.fold_in(base_key, step), worker)
    if augment:
      images = data_lib.augment(
          images, key, pad=config.crop_padding, flip=config.flip
      )
    x = data_lib.standardize(images, mean, std)
    variables = {'params': params}
    if batch_stats:
      variables['batch_stats'] = batch_stats
    logits, updates = model.apply(
        variables,
        x,
        train=True,
        mutable=['batch_stats'],
        rngs={'dropout': jax.random.fold_in(key, 1)},
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, labels
    ).mean()
    return loss, updates.get('batch_stats', {})

  return loss_fn


def make_evaluator(
    model,
    info: data_lib.DatasetInfo,
    test,
    layout: layouts.Layout,
    batch_size: int,
):
  """``accuracy(params, batch_stats)`` on the whole test split.

  The test set goes in batches split like a per-worker array (over the
  devices of the 1-D mesh; over 'data' only, replicated over 'model', on
  the sharded layout's), ``batch_size`` rounded to a multiple of the splits; each
  process reads only its devices' rows, and the last batch is padded and
  masked.
  """
  mean = jnp.asarray(info.mean, jnp.float32)
  std = jnp.asarray(info.std, jnp.float32)

  @jax.jit
  def count_correct(params, batch_stats, images, labels, valid):
    variables = {'params': params}
    if batch_stats:
      variables['batch_stats'] = batch_stats
    logits = model.apply(
        variables, data_lib.standardize(images, mean, std), train=False
    )
    return ((jnp.argmax(logits, -1) == labels) & valid).sum()

  sharding = layout.per_worker
  n_dev = sharding.mesh.shape[
      sharding.spec[0]
  ]  # how many ways a batch is split
  eval_bs = max(n_dev, batch_size // n_dev * n_dev)
  n_test = test.num_examples

  def batch(lo):
    idx = np.arange(lo, lo + eval_bs)
    valid = idx < n_test
    idx = np.where(valid, idx, 0)
    read = {}  # each device's rows are read (decoded, for a stream) once

    def rows(index):
      key = index[0].indices(eval_bs)
      if key not in read:
        read[key] = test.batch(idx[index[0]])
      return read[key]

    return (
        jax.make_array_from_callback(
            (eval_bs, *test.image_shape), sharding, lambda i: rows(i)[0]
        ),
        jax.make_array_from_callback(
            (eval_bs,), sharding, lambda i: rows(i)[1]
        ),
        jax.make_array_from_callback(
            (eval_bs,), sharding, lambda i: valid[i[0]]
        ),
    )

  def accuracy(params, batch_stats) -> float:
    correct = 0
    for i in range(math.ceil(n_test / eval_bs)):
      correct += int(
          layouts.host_value(
              count_correct(params, batch_stats, *batch(i * eval_bs))
          )
      )
    return correct / n_test

  return accuracy
