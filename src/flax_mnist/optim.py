"""The optimizer a config asks for, as an optax GradientTransformation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optax


def make_optimizer(config: Mapping[str, Any]) -> optax.GradientTransformation:
  """Adam with Keras's defaults (b1 0.9, b2 0.999, eps 1e-7 unless the config says otherwise)."""
  return optax.adam(learning_rate=config["learning_rate"], b1=0.9, b2=0.999, eps=config["adam_eps"])
