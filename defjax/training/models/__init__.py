"""The model zoo: Flax linen classifiers looked up by name.

Every model is called the same way; the trainer relies on it::

  model = get_model('resnet20', num_classes=10)
  variables = model.init(key, x, train=False)         # x: float32 NHWC
  logits, updates = model.apply(variables, x, train=True,
                                mutable=['batch_stats'])
  logits = model.apply(variables, x, train=False)

``updates`` has a 'batch_stats' entry only for models with BatchNorm (all but
'cnn' and 'mlp_tp'). The VGGs with the authors' classifier ('vgg16',
'vgg16_slim') use dropout in training: pass ``rngs={'dropout': key}`` (the
trainer derives the key from the seed, the step and the worker, so a step
stays a deterministic, resumable function of its inputs); the other models
ignore it. 'mlp_tp' carries ``nn.with_partitioning`` specs for tensor
parallelism (``defjax.layouts.sharded``): unbox its variables with ``nn.unbox``.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn

from defjax.training.models import cnn
from defjax.training.models import mlp
from defjax.training.models import resnet_cifar
from defjax.training.models import resnet_imagenet
from defjax.training.models import vgg

_FACTORIES: dict[str, Callable[[int], nn.Module]] = {
    'cnn': cnn.CNN,  # 28x28x1
    # 784 -> 1024 -> 1024 -> classes, Megatron-annotated for model_axis_size > 1.
    'mlp_tp': mlp.MLP,  # any image size
    # The authors' VGG-16 (classifier 512-512 with dropout) and at 1/4 width.
    'vgg16': functools.partial(vgg.VGG, cfg=vgg.VGG16),  # 32x32x3
    'vgg16_slim': functools.partial(
        vgg.VGG, cfg=vgg.VGG16_SLIM, head_width=128
    ),
    # pytorch-cifar's VGG-16 (one Linear), as the results before 2026-11-29.
    'vgg16_linear': functools.partial(vgg.VGG, cfg=vgg.VGG16, head_width=None),
    'vgg16_slim_linear': functools.partial(
        vgg.VGG, cfg=vgg.VGG16_SLIM, head_width=None
    ),
    'resnet20': resnet_cifar.resnet20,  # 32x32x3
    'preact_resnet110': resnet_cifar.preact_resnet110,  # 32x32x3
    'wrn28_10': resnet_cifar.wrn28_10,  # 32x32x3
    'resnet50': resnet_imagenet.resnet50,  # 224x224x3
}

MODELS = tuple(_FACTORIES)


def get_model(name: str, num_classes: int) -> nn.Module:
  """Returns the model called ``name`` with ``num_classes`` outputs.

  Raises:
    ValueError: if ``name`` is not one of ``MODELS``.
  """
  if name not in _FACTORIES:
    raise ValueError(f'unknown model {name!r}; choose one of {MODELS}')
  return _FACTORIES[name](num_classes)
