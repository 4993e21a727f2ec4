"""ResNets for 32x32 inputs: ResNet-20, pre-activation ResNet-110, WRN-28-10.

All three have a 3x3 stem with 16 channels and three stages of basic blocks,
the second and third starting with stride 2 (32x32 -> 16x16 -> 8x8), then
global average pooling and one Linear layer.

References:
  He et al., "Deep Residual Learning for Image Recognition", CVPR 2016
  (Section 4.2, the CIFAR-10 networks).
  He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016.
  Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from defjax.training.models import layers

STEM_WIDTH = 16


class BasicBlock(layers.ResidualBlock):
  """conv-BN-ReLU-conv-BN, plus the shortcut, then ReLU."""

  @nn.compact
  def __call__(self, x, *, train: bool):
    y = layers.conv_bn(x, self.features, 3, self.strides, train=train)
    y = layers.conv_bn(y, self.features, 3, train=train, relu=False)
    if x.shape != y.shape:
      x = layers.projection(x, self.features, self.strides, train=train)
    return nn.relu(x + y)


class PreActBlock(layers.ResidualBlock):
  """BN-ReLU-conv-BN-ReLU-conv plus the shortcut (He et al. 2016b).

  With ``features`` 10x wider this is WRN's wide basic block without dropout.
  """

  @nn.compact
  def __call__(self, x, *, train: bool):
    a = nn.relu(layers.batch_norm(train)(x))
    y = layers.conv(self.features, 3, self.strides)(a)
    y = nn.relu(layers.batch_norm(train)(y))
    y = layers.conv(self.features, 3)(y)
    if x.shape != y.shape:
      # The projection sees the pre-activated input, as in both reference
      # implementations; an identity shortcut carries x untouched.
      x = layers.projection(a, self.features, self.strides, train=None)
    return x + y


class ResNet(nn.Module):
  """CIFAR ResNet: post-activation basic blocks (ResNet-20 is stage_sizes=(3,
  3, 3)), or with ``pre_activation`` pre-activation blocks (ResNet-110, and
  the Wide ResNet with wider ``widths``)."""

  num_classes: int
  stage_sizes: Sequence[int]
  widths: Sequence[int]
  pre_activation: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool):
    block = PreActBlock if self.pre_activation else BasicBlock
    x = layers.conv(STEM_WIDTH, 3)(x)
    if not self.pre_activation:
      x = nn.relu(layers.batch_norm(train)(x))
    for width, strides in layers.stage_blocks(self.stage_sizes, self.widths):
      x = block(width, strides)(x, train=train)
    if self.pre_activation:
      # The last block ends on an addition; normalise and activate before
      # pooling.
      x = nn.relu(layers.batch_norm(train)(x))
    x = layers.global_avg_pool(x)
    return layers.dense(self.num_classes)(x)


def resnet20(num_classes: int) -> ResNet:
  """ResNet-20: depth 6n + 2 with n = 3."""
  return ResNet(num_classes, stage_sizes=(3, 3, 3), widths=(16, 32, 64))


def preact_resnet110(num_classes: int) -> ResNet:
  """Pre-activation ResNet-110: depth 6n + 2 with n = 18."""
  return ResNet(
      num_classes,
      stage_sizes=(18, 18, 18),
      widths=(16, 32, 64),
      pre_activation=True,
  )


def wrn28_10(num_classes: int) -> ResNet:
  """WRN-28-10: depth 6n + 4 with n = 4, widths 16k, 32k, 64k with k = 10."""
  return ResNet(
      num_classes,
      stage_sizes=(4, 4, 4),
      widths=(160, 320, 640),
      pre_activation=True,
  )
