"""A small CNN for 28x28x1 images (Fashion-MNIST), cheap enough for CPU tests."""

from __future__ import annotations

import flax.linen as nn

from defjax.training.models import layers


class CNN(nn.Module):
  """conv32-relu-pool, conv64-relu-pool, dense128-relu, dense.

  No BatchNorm, so it has no 'batch_stats' collection; ``train`` is accepted
  only so that every model is called the same way.
  """

  num_classes: int

  @nn.compact
  def __call__(self, x, *, train: bool):
    del train
    for features in (32, 64):
      x = layers.conv(features, 3, use_bias=True)(x)
      x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(layers.dense(128)(x))
    return layers.dense(self.num_classes)(x)
