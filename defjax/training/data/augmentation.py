"""On-device augmentation and normalisation, inside the jitted step.

The host only gathers uint8 rows; random crop + flip and the float
conversion run on the accelerator, so a small host never limits a run.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def shift(images: jax.Array, offsets: jax.Array, *, pad: int) -> jax.Array:
  """The window at ``offsets`` (dy, dx in [0, 2 pad]) of each zero-padded image.

  Args:
    images: (N, H, W, C).
    offsets: (N, 2) int; (pad, pad) is the unshifted image.
    pad: zero padding on each side.

  Returns:
    (N, H, W, C), same dtype.
  """
  _, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  zero = jnp.zeros((), offsets.dtype)
  return jax.vmap(
      lambda image, o: jax.lax.dynamic_slice(
          image, (o[0], o[1], zero), (h, w, c)
      )
  )(padded, offsets)


def augment(
    images: jax.Array, key: jax.Array, *, pad: int = 4, flip: bool = True
) -> jax.Array:
  """Random crop with zero padding ``pad`` and random horizontal flip.

  Each image gets its own crop offset and flip. Pure JAX: jit it with
  ``static_argnames=('pad', 'flip')`` or call it inside a jitted step.

  Args:
    images: uint8 (..., H, W, C); any leading dimensions (e.g. workers, batch).
    key: a PRNG key.
    pad: zero padding on each side; crops shift by up to ``pad`` pixels.
    flip: whether to flip left-right with probability 1/2.

  Returns:
    The augmented images, same shape and dtype.
  """
  images = jnp.asarray(images)
  flat = images.reshape((-1,) + images.shape[-3:])
  crop_key, flip_key = jax.random.split(key)
  if pad:
    offsets = jax.random.randint(crop_key, (flat.shape[0], 2), 0, 2 * pad + 1)
    flat = shift(flat, offsets, pad=pad)
  if flip:
    flipped = jax.random.bernoulli(flip_key, 0.5, (flat.shape[0], 1, 1, 1))
    flat = jnp.where(flipped, flat[:, :, ::-1, :], flat)
  return flat.reshape(images.shape)


def standardize(
    images: jax.Array, mean: Sequence[float], std: Sequence[float]
) -> jax.Array:
  """(images - mean) / std per channel, as float32 (mean, std in [0, 255])."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (jnp.asarray(images).astype(jnp.float32) - mean) / std
