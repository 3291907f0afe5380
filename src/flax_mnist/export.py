"""A trained model that leaves the package: ``jax.export`` of its eval-mode probabilities.

``export_model`` serializes ``images -> softmax(model(images / 255))`` for uint8 NHWC images
(N, H, W, C), N symbolic, with the parameters and BatchNorm statistics baked in as constants, for
every platform asked for (an accelerator's lowering works on a CPU machine). The file needs only
``jax`` and ``numpy`` to run, in a process that has never heard of flax or flax_mnist::

    import numpy as np
    from jax import export
    with open("model.jaxexport", "rb") as file:
      exported = export.deserialize(bytearray(file.read()))
    probabilities = np.asarray(exported.call(images))  # uint8 (N, 28, 28, 1) -> (N, 10)

(``load_exported`` and ``predict_exported`` below are exactly that.) The model is exported in
the ``lax`` layout (XLA's convolution: every layout computes the same function, and inference
needs no fast gradient).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import export as jax_export  # (Not an attribute of jax before it is imported: 0.7.)

from flax_mnist import data, workdir
from flax_mnist.errors import DatasetError, FlaxMnistError


class ExportError(FlaxMnistError):
  """An export that cannot be made here (a missing optional dependency)."""


PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
SUFFIX = ".jaxexport"


def export_model(
  model: nnx.Module, image_shape: Sequence[int], platforms: Sequence[str] = ("cpu",)
) -> jax_export.Exported:
  """``model`` (eval mode) as a ``jax.export.Exported`` from uint8 images ``(N, *image_shape)``,
  N symbolic, to softmax probabilities, lowered for ``platforms`` (of ``PLATFORMS``)."""
  unknown = [platform for platform in platforms if platform not in PLATFORMS]
  if unknown or not platforms:
    raise ValueError(f"platforms {list(platforms)}: expected some of {', '.join(PLATFORMS)}")
  (batch,) = jax_export.symbolic_shape("n")
  images = jax.ShapeDtypeStruct((batch, *image_shape), jnp.uint8)
  return jax_export.export(jax.jit(_probabilities(model)), platforms=tuple(platforms))(images)


def _probabilities(model: nnx.Module) -> Callable[[jax.Array], jax.Array]:
  """``images -> softmax(model(images / 255))`` for uint8 images, ``model`` in eval mode and
  closed over (its parameters become constants of whatever traces the function)."""
  model.eval()
  graphdef, state = nnx.split(model)

  def probabilities(images: jax.Array) -> jax.Array:
    logits = nnx.merge(graphdef, state)(data.normalize_images(images))
    return jax.nn.softmax(logits.astype(jnp.float32))

  return probabilities


def export_onnx(model: nnx.Module, image_shape: Sequence[int]) -> Any:
  """``model`` (eval mode) as an ONNX ``ModelProto`` (jax2onnx), the same function as
  ``export_model``'s: uint8 images ``(N, *image_shape)``, N symbolic, to softmax probabilities.
  Needs the ``onnx`` extra (``pip install -e '.[onnx]'``: jax2onnx and onnxruntime); a
  one-line ExportError without it. Checked against onnxruntime for the whole family (tests)."""
  try:
    import jax2onnx  # noqa: PLC0415 (an optional extra: imported only when asked for)
  except ImportError:
    raise ExportError(
      "ONNX export needs jax2onnx: pip install -e '.[onnx]' (jax2onnx, onnxruntime)"
    ) from None
  images = jax.ShapeDtypeStruct(("N", *image_shape), jnp.uint8)
  return jax2onnx.to_onnx(_probabilities(model), [images], model_name="flax_mnist")


def save_onnx(proto: Any, path: str | os.PathLike) -> Path:
  """Writes the ONNX ``proto`` to ``path`` (atomically)."""
  path = Path(path)
  workdir.write_bytes(path, proto.SerializeToString())
  return path


def save(exported: jax_export.Exported, path: str | os.PathLike) -> Path:
  """Writes ``exported``'s serialization to ``path`` (atomically: a reader never sees half)."""
  path = Path(path)
  workdir.write_bytes(path, exported.serialize())
  return path


def load_exported(path: str | os.PathLike) -> jax_export.Exported:
  """The exported model in ``path``; a one-line DatasetError for a file that is not one."""
  path = Path(path)
  try:
    return jax_export.deserialize(bytearray(path.read_bytes()))
  except OSError as error:
    raise DatasetError(f"{path}: cannot read ({error.strerror})") from None
  except Exception as error:  # noqa: BLE001 (flatbuffers raises anything on a foreign file)
    raise DatasetError(
      f"{path}: not a jax.export file ({type(error).__name__}); expected one written by "
      "scripts/export.py"
    ) from None


def predict_exported(exported: jax_export.Exported, images: np.ndarray) -> np.ndarray:
  """Probabilities ``(N, classes)`` of uint8 images through ``exported``; a one-line
  DatasetError when their shape is not the one it was exported for."""
  expected = tuple(exported.in_avals[0].shape[1:])
  if images.ndim != len(expected) + 1 or tuple(images.shape[1:]) != expected:
    shape = ", ".join(map(str, expected))
    raise DatasetError(f"images of shape {images.shape}: the exported model takes (N, {shape})")
  return np.asarray(exported.call(np.asarray(images, np.uint8)))
