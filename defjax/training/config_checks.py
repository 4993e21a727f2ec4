"""Checks a training config before any compute: one clear line per mistake."""

from __future__ import annotations

import math

import ml_collections

from defjax import compress
from defjax import feedback
from defjax import layouts
from defjax import methods
from defjax.training import data as data_lib
from defjax.training import models as models_lib

SCHEDULES = ('step', 'cosine')


class ConfigError(ValueError):
  """The config cannot run; the message says what to change."""


def _choice(value, known, key):
  if value not in known:
    raise ConfigError(
        f'unknown {key} {value!r}; choose one of {", ".join(known)}'
    )


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first field that cannot run."""
  o = config.optim
  _choice(o.method, methods.NAMES, 'optim.method')
  _choice(config.model, tuple(models_lib.MODELS), 'model')
  _choice(config.dataset, tuple(data_lib.DATASETS), 'dataset')
  _choice(o.schedule, SCHEDULES, 'optim.schedule')
  _choice(config.local_gradients, ('auto', 'vmap', 'unroll'), 'local_gradients')
  try:
    compress.check_ratio(o.ratio)
    feedback.check_lam(o.lam)
  except ValueError as e:
    raise ConfigError(f'optim.{e}') from None
  # A negative eval or checkpoint interval used to end in a traceback, and
  # max_to_keep=0 keeps no checkpoint at all (orbax deletes each one saved).
  for node, key, minimum in (
      (config, 'num_workers', 1),
      (config, 'model_axis_size', 1),
      (config, 'devices_per_host', 1),
      (config, 'batch_size', 1),
      (config, 'eval_every_steps', 0),
      (config, 'checkpoint_every_steps', 0),
      (config, 'max_to_keep', 1),
      (config, 'steps_per_dispatch', 0),
      (o, 'dense_warmup_steps', 0),
  ):
    value = node[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      what = (
          'a positive integer' if minimum == 1 else f'an integer >= {minimum}'
      )
      raise ConfigError(
          f'{"optim." if node is o else ""}{key} must be {what}, got {value!r}'
      )
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ConfigError('set num_epochs > 0 or num_train_steps > 0')
  for key, bounds, ok in (
      ('lr', '> 0', lambda v: v > 0),
      ('momentum', 'in [0, 1)', lambda v: 0 <= v < 1),
      ('weight_decay', '>= 0', lambda v: v >= 0),
      ('warmup_epochs', '>= 0', lambda v: v >= 0),
  ):
    what = f'a number {bounds}'
    try:
      value = compress.as_real_scalar(o[key], key, what)
    except ValueError as e:
      raise ConfigError(f'optim.{e}') from None
    if not (math.isfinite(value) and ok(value)):
      raise ConfigError(f'optim.{key} must be {what}, got {o[key]!r}')
  if any(not 0 < f < 1 for f in o.decay_at):
    raise ConfigError(
        f'optim.decay_at must be fractions in (0, 1), got {tuple(o.decay_at)}'
    )
  if config.dataset in data_lib.STREAMED and (
      config.crop_padding or config.flip
  ):
    raise ConfigError(
        f'{config.dataset} is augmented on the host (random-resized crop and flip):'
        ' set crop_padding=0 and flip=False'
    )
  try:
    layouts.check_config(config)  # the workers' layout: its own checks
  except ValueError as e:
    raise ConfigError(str(e)) from None
