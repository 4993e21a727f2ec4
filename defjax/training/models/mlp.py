"""A wide MLP with Megatron-style tensor-parallel annotations.

The model whose workers ``defjax.layouts.sharded`` splits over a 'model'
axis: the first hidden layer is column-parallel (kernel ``P(None, 'model')``, bias
``P('model')``: each model device computes its slice of the hidden units),
the second row-parallel (kernel ``P('model', None)``: each device multiplies
its slice of the hidden units and XLA all-reduces the partial sums over
'model'), the classifier replicated (1024 x classes values, small). The
annotations are ``nn.with_partitioning`` metadata: ``nn.get_partition_spec``
reads the specs, ``nn.unbox`` the plain params, and on a 1-D layout they are
ignored.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from defjax.training.models import layers

MODEL = 'model'  # the mesh axis the hidden units are split over


def _dense(features: int, kernel_spec, bias_spec, name: str) -> nn.Dense:
  return nn.Dense(
      features,
      kernel_init=nn.with_partitioning(layers.dense_init, kernel_spec),
      bias_init=nn.with_partitioning(nn.initializers.zeros, bias_spec),
      name=name,
  )


class MLP(nn.Module):
  """flatten, dense(width) column-parallel, relu, dense(width) row-parallel,
  relu, dense(num_classes). No BatchNorm; ``train`` is accepted only so that
  every model is called the same way."""

  num_classes: int
  widths: Sequence[int] = (1024, 1024)

  @nn.compact
  def __call__(self, x, *, train: bool):
    del train
    x = x.reshape(x.shape[0], -1)
    first, second = self.widths
    x = nn.relu(_dense(first, (None, MODEL), (MODEL,), 'column')(x))
    x = nn.relu(_dense(second, (MODEL, None), (None,), 'row')(x))
    return layers.dense(self.num_classes, name='head')(x)
