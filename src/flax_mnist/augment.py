"""On-device data augmentation inside the compiled epoch: pure functions of a batch and a key.

Each training step draws its own key from the epoch's (``fold_in(augment_key, step)``), so an
epoch's augmentation is a function of the seed and the epoch alone and a resumed run sees what
the uninterrupted one would have.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def random_shifts(images: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
  """Each NHWC image moved by its own uniform integer offset in -max_shift..max_shift along
  height and width, the uncovered edge filled with 0 (MNIST's background), as Keras's
  ``RandomTranslation(fill_mode="constant")`` with integer pixels; ``max_shift`` 0: unchanged."""
  if max_shift == 0:
    return images
  count, height, width, channels = images.shape
  pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0))
  padded = jnp.pad(images, pad)
  offsets = jax.random.randint(key, (count, 2), 0, 2 * max_shift + 1)

  def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

  return jax.vmap(crop)(padded, offsets)
