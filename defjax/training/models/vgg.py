"""VGG with BatchNorm for 32x32 inputs, as in the DEF authors' code.

13 conv3x3 (with bias) + BN + ReLU layers and five max-pools take 32x32 down
to 1x1; the authors' CIFAR VGG-16 (anxuthu/DEF, models/vgg.py) then has the
classifier Dropout, Linear(512, 512), ReLU, Dropout, Linear(512, 512), ReLU,
Linear(512, classes) (``head_width=512``). kuangliu/pytorch-cifar's VGG ends
in one Linear instead (``head_width=None``, the ``*_linear`` models: the
results before 2026-11-29 used it).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import flax.linen as nn

from defjax.training.models import layers

# Channel counts, 'M' for a 2x2 max-pool.
VGG16 = (
    64,
    64,
    'M',
    128,
    128,
    'M',
    256,
    256,
    256,
    'M',
    512,
    512,
    512,
    'M',
    512,
    512,
    512,
    'M',
)
# VGG-16's 13 conv layers at a quarter of the width (0.92M parameters instead
# of 14.7M, ~1/16 of the FLOPs): the paper's architecture at a size that
# trains on CPU in minutes per epoch.
VGG16_SLIM = tuple(c if c == 'M' else c // 4 for c in VGG16)


class VGG(nn.Module):
  """A VGG for 32x32 inputs described by ``cfg`` (e.g. ``VGG16``)."""

  num_classes: int
  cfg: Sequence[Union[int, str]] = VGG16
  # Width of the two hidden Linear layers of the classifier; None = one Linear.
  head_width: Optional[int] = 512
  dropout: float = 0.5  # PyTorch's nn.Dropout() default

  @nn.compact
  def __call__(self, x, *, train: bool):
    """Logits; with ``train=True`` and a head, needs ``rngs={'dropout': key}``."""
    for item in self.cfg:
      if item == 'M':
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      else:
        # pytorch-cifar keeps the conv bias even though BN follows it; kept
        # so the parameter count (and the RBGS block layout) matches.
        x = layers.conv(item, 3, use_bias=True)(x)
        x = nn.relu(layers.batch_norm(train)(x))
    x = x.reshape(x.shape[0], -1)
    if self.head_width is not None:
      for _ in range(2):
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.relu(layers.dense(self.head_width)(x))
    return layers.dense(self.num_classes)(x)
