"""ResNet-50 v1.5 for 224x224 ImageNet inputs, as in torchvision.

v1.5 puts the stride-2 of a downsampling bottleneck on the 3x3 convolution
rather than the first 1x1, which is what torchvision's ``resnet50`` does.

References:
  He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from defjax.training.models import layers

EXPANSION = 4


class Bottleneck(layers.ResidualBlock):
  """1x1 reduce, 3x3 (strided), 1x1 expand by 4, each with BN, plus shortcut."""

  @nn.compact
  def __call__(self, x, *, train: bool):
    y = layers.conv_bn(x, self.features, 1, train=train)
    y = layers.conv_bn(y, self.features, 3, self.strides, train=train)
    y = layers.conv_bn(y, self.features * EXPANSION, 1, train=train, relu=False)
    if x.shape != y.shape:
      x = layers.projection(
          x, self.features * EXPANSION, self.strides, train=train
      )
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Bottleneck ImageNet ResNet; ResNet-50 is stage_sizes=(3, 4, 6, 3)."""

  num_classes: int
  stage_sizes: Sequence[int]
  widths: Sequence[int] = (64, 128, 256, 512)

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = layers.conv(64, 7, 2)(x)
    x = nn.relu(layers.batch_norm(train)(x))
    # flax pads max_pool with -inf, like PyTorch's MaxPool2d(3, 2, padding=1).
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for width, strides in layers.stage_blocks(self.stage_sizes, self.widths):
      x = Bottleneck(width, strides)(x, train=train)
    x = layers.global_avg_pool(x)
    return layers.dense(self.num_classes)(x)


def resnet50(num_classes: int) -> ResNet:
  return ResNet(num_classes, stage_sizes=(3, 4, 6, 3))
