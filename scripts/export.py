"""Exports a trained workdir's model with jax.export: a file that runs with jax and numpy alone.

  python scripts/export.py --workdir runs/cnn [--which best|latest] --out model.jaxexport \
      [--platforms cpu,cuda,tpu]

serializes the eval-mode model of the checkpoint (params and BatchNorm statistics baked in)
from uint8 images (N, 28, 28, 1), N symbolic, to softmax probabilities, lowered for each of
--platforms (an accelerator's lowering works on a CPU machine). Load it without flax or
flax_mnist (README "Export"):

  from jax import export
  exported = export.deserialize(bytearray(open("model.jaxexport", "rb").read()))
  probabilities = np.asarray(exported.call(images))

or predict with it: python scripts/evaluate.py --exported model.jaxexport --predict batch.npy.
--format onnx writes the same function as ONNX (jax2onnx; the onnx extra) for onnxruntime and
other ONNX runtimes; --platforms does not apply there. An existing --out is not overwritten. A
workdir is data: a model it names by import path is imported only with --trust_model_code.
"""

from pathlib import Path

import _cli
from absl import flags

from flax_mnist import checkpoint, export

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by scripts/train.py.")
_WHICH = flags.DEFINE_enum("which", "best", ["best", "latest"], "Which checkpoint to export.")
_OUT = flags.DEFINE_string("out", None, f"The file to write (…{export.SUFFIX}).")
_PLATFORMS = flags.DEFINE_list(
  "platforms", ["cpu"], f"Platforms to lower for, of {', '.join(export.PLATFORMS)}."
)
_FORMAT = flags.DEFINE_enum(
  "format", "jax", ["jax", "onnx"], "jax.export (default) or ONNX (needs the onnx extra)."
)
_TRUST = flags.DEFINE_bool(
  "trust_model_code", False, "Import the model the workdir names by import path (runs its code)."
)
_cli.require("workdir", "out")


def main() -> None:
  unknown = [name for name in _PLATFORMS.value if name not in export.PLATFORMS]
  if unknown or not _PLATFORMS.value:
    _cli.fail(
      f"--platforms={','.join(_PLATFORMS.value)}: expected some of {', '.join(export.PLATFORMS)}"
    )
  out = Path(_OUT.value)
  if out.exists():
    _cli.fail(f"{out}: exists, not overwritten; pass another --out or move it away")
  _cli.check_writable_dir(out.parent, "--out")
  model, info = checkpoint.load_model(
    _WORKDIR.value, _WHICH.value, trust_model_code=_TRUST.value, impl="lax"
  )
  shape = info["config"].get("input_shape") or (28, 28, 1)  # (MNIST's before it was recorded.)
  if _FORMAT.value == "onnx":
    export.save_onnx(export.export_onnx(model, shape), out)
    where = "as ONNX"
  else:
    exported = export.export_model(model, shape, _PLATFORMS.value)
    export.save(exported, out)
    where = f"for {', '.join(exported.platforms)}"
  print(
    f"wrote {out}: {info['model']} ({_WHICH.value} checkpoint, epoch {info['epoch']}), uint8 "
    f"(N, {', '.join(map(str, shape))}) -> probabilities, {where}"
  )


if __name__ == "__main__":
  _cli.run(main)
