"""VGG with BatchNorm for 32x32 inputs, as in kuangliu/pytorch-cifar.

The DEF paper trains this VGG-16 on CIFAR: 13 conv3x3 (with bias) + BN + ReLU
layers, five max-pools taking 32x32 down to 1x1, then a single Linear layer.
"""

from __future__ import annotations

from typing import Sequence, Union

import flax.linen as nn

from defjax.models import layers

# Channel counts, 'M' for a 2x2 max-pool.
VGG16 = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M',
         512, 512, 512, 'M', 512, 512, 512, 'M')
# VGG-16's 13 conv layers at a quarter of the width (0.92M parameters instead
# of 14.7M, ~1/16 of the FLOPs): the paper's architecture at a size that
# trains on CPU in minutes per epoch.
VGG16_SLIM = tuple(c if c == 'M' else c // 4 for c in VGG16)


class VGG(nn.Module):
  """A VGG for 32x32 inputs described by ``cfg`` (e.g. ``VGG16``)."""

  num_classes: int
  cfg: Sequence[Union[int, str]] = VGG16

  @nn.compact
  def __call__(self, x, *, train: bool):
    for item in self.cfg:
      if item == 'M':
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      else:
        # pytorch-cifar keeps the conv bias even though BN follows it; kept
        # so the parameter count (and the RBGS block layout) matches.
        x = layers.conv(item, 3, use_bias=True)(x)
        x = nn.relu(layers.batch_norm(train)(x))
    x = x.reshape(x.shape[0], -1)
    return layers.dense(self.num_classes)(x)
