"""Layers shared by the model zoo, initialised as in the PyTorch reference code.

The DEF paper's CIFAR/ImageNet baselines are PyTorch models, so the layers
here reproduce PyTorch's choices: He-normal (fan_out) convolution kernels,
Linear weights U(-1/sqrt(fan_in), 1/sqrt(fan_in)), zero biases, and
BatchNorm with PyTorch's momentum 0.1 (flax counts momentum the other way
round, hence 0.9) and epsilon 1e-5.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn

# torch.nn.init.kaiming_normal_(mode='fan_out', nonlinearity='relu'). JAX's
# 'normal' is untruncated, as PyTorch's is; nn.initializers.kaiming_normal
# would be truncated and fan_in.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# PyTorch's default Linear weight init: kaiming_uniform_(a=sqrt(5)) has
# variance 1 / (3 * fan_in).
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def conv(
    features: int,
    kernel: int,
    strides: int = 1,
    use_bias: bool = False,
    name: Optional[str] = None,
) -> nn.Conv:
  """A square convolution with PyTorch's symmetric ``kernel // 2`` padding.

  Explicit padding rather than 'SAME': for stride 2 on even inputs 'SAME'
  pads only the bottom/right, which shifts features by half a pixel relative
  to the PyTorch models whose results we compare against.
  """
  pad = kernel // 2
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(strides, strides),
      padding=((pad, pad), (pad, pad)),
      use_bias=use_bias,
      kernel_init=conv_init,
      bias_init=nn.initializers.zeros,
      name=name,
  )


def dense(features: int, name: Optional[str] = None) -> nn.Dense:
  return nn.Dense(
      features,
      kernel_init=dense_init,
      bias_init=nn.initializers.zeros,
      name=name,
  )


# flax's running average: new = BN_MOMENTUM * old + (1 - BN_MOMENTUM) * batch
# (PyTorch's momentum 0.1).
BN_MOMENTUM = 0.9


def batch_norm(train: bool, name: Optional[str] = None) -> nn.BatchNorm:
  # Batch statistics in training, running averages in evaluation; the
  # running averages live in the 'batch_stats' collection.
  return nn.BatchNorm(
      use_running_average=not train,
      momentum=BN_MOMENTUM,
      epsilon=1e-5,
      name=name,
  )


class ResidualBlock(nn.Module):
  """The fields every ResNet block has: its output width (before a
  bottleneck's expansion) and the stride of its strided convolution."""

  features: int
  strides: int


def conv_bn(
    x,
    features: int,
    kernel: int,
    strides: int = 1,
    *,
    train: bool,
    relu: bool = True,
):
  """conv, BN and (with ``relu``) ReLU: the unit of the post-activation ResNets."""
  y = conv(features, kernel, strides)(x)
  y = batch_norm(train)(y)
  return nn.relu(y) if relu else y


def projection(x, features: int, strides: int, *, train: Optional[bool]):
  """He et al.'s option B shortcut (a strided 1x1 convolution) rather than
  option A (zero padding): the common PyTorch choice, and every weight is
  trainable. Followed by BN unless ``train`` is None (pre-activation blocks
  project the already normalised input)."""
  x = conv(features, 1, strides, name='shortcut_conv')(x)
  return x if train is None else batch_norm(train, name='shortcut_bn')(x)


def global_avg_pool(x):
  return x.mean(axis=(1, 2))


def stage_blocks(stage_sizes, widths):
  """(width, strides) of every residual block, stage by stage.

  The first block of each stage after the first halves the resolution.
  """
  for stage, (blocks, width) in enumerate(zip(stage_sizes, widths)):
    for block in range(blocks):
      yield width, 2 if stage > 0 and block == 0 else 1
