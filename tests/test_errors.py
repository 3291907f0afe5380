"""Every bad input, through the scripts as a user runs them: one line naming the culprit and what
was expected, exit status 2, no traceback, and nothing saved before changed (``scripts/_cli``)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, small_config, write_idx, write_mnist_dir

from flax_mnist import checkpoint, train, workdir

pytestmark = pytest.mark.integration

# Root writes through any file mode: drop that capability for the not-writable cases.
_SETPRIV = shutil.which("setpriv")
_AS_USER = [_SETPRIV, "--bounding-set=-dac_override"] if os.geteuid() == 0 and _SETPRIV else []
_EXPECTED_NPY = "expected 28x28 grey levels: integers 0..255 or floats in [0, 1]"


@dataclasses.dataclass(frozen=True)
class Case:
  """One command line. ``last``: the last stderr line, ``*`` matching anything, ``{name}`` a
  path of ``made``. ``{run}`` is the module's trained workdir (a copy per case), which must come
  out byte for byte the same; ``absent``: paths that must not exist afterwards."""

  id: str
  script: str
  args: tuple[str, ...]
  last: str
  status: int = 2
  read_only: bool = False  # {run} made read-only, and the script run as a non-root user.
  absent: tuple[str, ...] = ()
  env: tuple[tuple[str, str], ...] = ()
  max_seconds: float = 60.0
  offline: bool = False  # Where the download host answers, a dead proxy stands in for no network.
  # Run on the case's paths ({run}, {case}: its own directory) before anything is compared.
  setup: Callable[[dict[str, Path]], None] | None = None


MLP = str(REPO_ROOT / "configs" / "mlp.py")
TRAIN = ("--workdir", "{run}", "--config", MLP)
_SMALL = ("--config.batch_size=64", "--config.eval_batch_size=32")  # As the saved run trained.
CASES = [
  # Flags and config files, before anything is loaded: scripts/_cli's flag parser.
  Case(
    "override-unknown-field",
    "train.py",
    (*TRAIN, "--config.foo=1"),
    f"error: --config.foo: {MLP} has no field config.foo; expected a field of *",
  ),
  Case(
    "override-misspelt-field",
    "train.py",
    (*TRAIN, "--config.num_epoch=3"),
    f"error: --config.num_epoch: {MLP} has no field config.num_epoch; *(did you mean num_epochs?)",
  ),
  Case(
    "override-bad-value",
    "train.py",
    (*TRAIN, "--config.num_epochs=abc"),
    "error: --config.num_epochs=abc: invalid literal for int() *; expected an integer (the config "
    "file has 20)",
  ),
  Case(
    "config-missing",
    "train.py",
    ("--workdir", "{run}", "--config", "{made}/nowhere.py"),
    "error: {made}/nowhere.py: no such config file (expected a file like configs/cnn.py)",
  ),
  Case(
    "config-syntax-error",
    "train.py",
    ("--workdir", "{run}", "--config={made}/syntax.py"),
    "error: {made}/syntax.py:2: syntax error (*)",
  ),
  Case(
    "config-without-get_config",
    "train.py",
    ("--workdir", "{run}", "--config", "{made}/no_get_config.py"),
    "error: {made}/no_get_config.py: defines no get_config() (expected one returning a ConfigDict)",
  ),
  Case(
    "config-misspelt-field-in-file",
    "train.py",
    ("--workdir", "{run}", "--config", "{made}/misspelt.py"),
    "error: {made}/misspelt.py: unknown field config.num_epoch; did you mean 'num_epochs'?",
  ),
  Case("config-not-given", "train.py", ("--workdir", "{run}"), "error: --config: required, *"),
  Case(
    "unknown-flag",
    "train.py",
    (*TRAIN, "--workdirr=x"),
    "error: --workdirr: unknown flag (did you mean --workdir?) *",
  ),
  Case("positional-argument", "train.py", (*TRAIN, "extra"), "error: unexpected arguments: extra*"),
  # Workdirs (train.py: flax_mnist.workdir; evaluate.py --report: scripts/_cli).
  Case(
    "workdir-is-a-file",
    "train.py",
    ("--workdir", "{made}/a_file", "--config", MLP, "--config.data_dir={data}"),
    "error: {made}/a_file: *file*",
  ),
  Case(
    "workdir-under-a-file",
    "train.py",
    ("--workdir", "{made}/a_file/run", "--config", MLP, "--config.data_dir={data}"),
    "error: {made}/a_file/run: *file*",
  ),
  Case(
    "workdir-not-writable",
    "train.py",
    (*TRAIN, "--config.data_dir={data}"),
    "error: {run}*: *not writable*",
    read_only=True,
  ),
  Case(
    "evaluate-workdir-is-a-file",
    "evaluate.py",
    ("--workdir", "{made}/a_file"),
    "error: {made}/a_file: no checkpoints directory (expected a workdir written by train.py)",
  ),
  Case(
    "evaluate-report-into-read-only-workdir",
    "evaluate.py",
    ("--workdir", "{run}", "--report", "--data_dir", "{data}"),
    "error: {run}/report: cannot write there (Permission denied); pass --report_dir with a "
    "writable directory",
    read_only=True,
  ),
  # Data.
  Case(
    "zero-image-split",
    "train.py",
    ("--workdir", "{made}/new_run", "--config", MLP, "--config.data_dir={zero}"),
    "error: {zero}/t10k-images-idx3-ubyte: 0 images, expected at least one *",
    absent=("{made}/new_run",),
  ),
  Case(
    "no-data-and-no-network",
    "train.py",
    ("--workdir", "{made}/new_run", "--config", MLP, "--config.tfds_data_dir={made}/tfds"),
    "error: no MNIST files given, and storage.googleapis.com cannot be reached to download them "
    "(*); give a directory of the four MNIST IDX files with --config.data_dir=DIR * or "
    "FLAX_MNIST_DATA_DIR=DIR",
    absent=("{made}/tfds", "{made}/new_run"),
    max_seconds=30.0,
    offline=True,
  ),
  # A run's config.json, as results_table.py reads it.
  Case(
    "results-table-empty-config-json",
    "results_table.py",
    ("--workdirs", "{made}/empty_config", "--out", "{made}/table"),
    "error: {made}/empty_config/config.json: empty; expected the config.json that "
    "scripts/train.py writes",
    absent=("{made}/table",),
  ),
  Case(
    "results-table-corrupt-config-json",
    "results_table.py",
    ("--workdirs", "{run},{made}/corrupt_config", "--out", "{made}/table"),
    "error: {made}/corrupt_config/config.json: not valid JSON (*); expected the config.json that "
    "scripts/train.py writes",
    absent=("{made}/table",),
  ),
  # Models.
  Case(
    "compare-no-models",
    "compare.py",
    ("--models=", "--out", "{made}/report"),
    "error: --models: empty, expected a comma-separated list of mlp, cnn, cnn_pool, cnn_pool_bn",
    absent=("{made}/report",),
  ),
  Case(
    "compare-unknown-model",
    "compare.py",
    ("--models=mlp,cnnn", "--out", "{made}/report"),
    "error: --models: unknown 'cnnn' (did you mean cnn?); expected *",
    absent=("{made}/report",),
  ),
  # Images for --predict.
  *[
    Case(
      f"predict-{name}",
      "evaluate.py",
      ("--workdir", "{run}", "--predict", f"{{made}}/{file}"),
      f"error: {{made}}/{file}: {reason}{_EXPECTED_NPY}",
    )
    for name, file, reason in [
      ("empty-array", "empty.npy", "an empty array, *; "),
      ("not-npy", "text.npy", "not a .npy file *, "),
      ("nan-and-inf", "nan.npy", "1 NaN and 2 infinite values of 784; "),
      ("booleans", "bool.npy", "an array of booleans (bool), "),
      ("strings", "str.npy", "an array of strings (<U1), "),
    ]
  ],
  Case(
    "predict-dark-on-light-warns",
    "evaluate.py",
    ("--workdir", "{run}", "--predict", "{made}/white.png"),
    "warning: {made}/white.png: light background (mean 255/255 at the border, MNIST's is 0): "
    "MNIST digits are light on dark, invert it (255 - x) or pass --invert; *",
    status=0,
  ),
  # A workdir is data (issue 16): a model named by import path runs nothing without
  # --trust_model_code; model_kwargs fit the factory before any call; no link leads out.
  Case(
    "evaluate-refuses-an-import-path-in-a-checkpoint",
    "evaluate.py",
    ("--workdir", "{case}/crafted"),
    "error: {case}/crafted/checkpoints/best/1: model 'IPython:start_ipython': an import path; "
    "importing it runs its code, so a model named in a workdir is imported only if you trust "
    "it: pass --trust_model_code *",
    setup=lambda paths: _craft(paths, "IPython:start_ipython", _SHELL_ARGV),
    absent=("{case}/pwned",),
  ),
  Case(
    "results-table-refuses-an-import-path-in-config-json",
    "results_table.py",
    ("--workdirs", "{case}/crafted", "--out", "{case}/table"),
    "error: {case}/crafted/config.json: model 'logging:basicConfig': an import path; *"
    "--trust_model_code *",
    setup=lambda paths: _craft(paths, "logging:basicConfig", _TRUNCATE),
    absent=("{case}/table",),
  ),
  Case(
    "trusted-model-kwargs-are-checked-before-the-factory-is-called",
    "evaluate.py",
    ("--workdir", "{case}/crafted", "--trust_model_code"),
    "error: {case}/crafted/checkpoints/best/1: config.model_kwargs of model "
    "'my_models:wide_cnn': width 'abc' is a string, expected an integer like its default 32",
    setup=lambda paths: _craft(paths, "my_models:wide_cnn", {"width": "abc"}),
    env=(("PYTHONPATH", str(REPO_ROOT / "examples")),),
  ),
  Case(
    "resume-refuses-a-checkpoint-linked-from-another-run",
    "train.py",
    (
      "--workdir",
      "{case}/linked",
      "--config",
      MLP,
      "--config.data_dir={data}",
      "--config.num_epochs=3",
    ),
    "error: {case}/linked/checkpoints/latest: a link to {run}/checkpoints/latest, outside the "
    "workdir; *",
    setup=lambda paths: _link_from_run(paths, "checkpoints/latest"),
  ),
  Case(
    "results-table-refuses-a-linked-run-json",
    "results_table.py",
    ("--workdirs", "{case}/linked", "--out", "{case}/table"),
    "error: {case}/linked/run.json: a link to {run}/run.json, outside the workdir; *",
    setup=lambda paths: _link_from_run(paths, "run.json"),
    absent=("{case}/table",),
  ),
  Case(
    "results-table-config-json-of-the-wrong-shape",
    "results_table.py",
    ("--workdirs", "{case}/shaped", "--out", "{case}/table"),
    "error: {case}/shaped/config.json: a JSON list, expected an object; expected the config.json "
    "that scripts/train.py writes",
    setup=lambda paths: _reshape(paths, "config.json", "[1, 2]"),
    absent=("{case}/table",),
  ),
  Case(
    "results-table-history-json-of-the-wrong-shape",
    "results_table.py",
    ("--workdirs", "{case}/shaped", "--out", "{case}/table"),
    "error: {case}/shaped/history.json: a JSON dict, expected a list of objects; *",
    setup=lambda paths: _reshape(paths, "history.json", '{"epoch": 1}'),
    absent=("{case}/table",),
  ),
  Case(
    "train-config-json-of-the-wrong-shape-before-any-checkpoint",
    "train.py",
    ("--workdir", "{case}/shaped", "--config", MLP, "--config.data_dir={data}"),
    "error: {case}/shaped/config.json: a JSON list, expected an object; move it away to resume",
    setup=lambda paths: _reshape(paths, "config.json", "[]", checkpoints=False),
  ),
  # Nothing mixes on resume.
  Case(
    "resume-refuses-other-data",
    "train.py",
    (*TRAIN, *_SMALL, "--config.data_dir={case}/other_data", "--config.num_epochs=2"),
    "error: {run}: holds a run with data '300 train + 100 test images, blake2b *', this run's "
    "data (from IDX files in {case}/other_data) is '200 train + 100 test images, blake2b *'; "
    "use another workdir",
    setup=lambda paths: write_mnist_dir(paths["case"] / "other_data", num_train=200),
  ),
  Case(
    "resume-without-config-json-compares-the-checkpoint",
    "train.py",
    (
      *TRAIN,
      *_SMALL,
      "--config.data_dir={data}",
      "--config.num_epochs=2",
      "--config.learning_rate=0.01",
    ),
    "error: {run}: holds a run with learning_rate 0.001, config.learning_rate is 0.01; use "
    "another workdir",
    setup=lambda paths: (paths["run"] / "config.json").unlink(),
  ),
  # The model's output and factory, checked before anything compiles.
  *[
    Case(
      f"custom-model-{name}",
      "train.py",
      ("--workdir", "{case}/new", "--config", MLP, "--config.data_dir={data}", *more),
      f"error: {last}",
      env=(("PYTHONPATH", "{made}"),),
      absent=("{case}/new",),
    )
    for name, more, last in [
      (
        "flat-logits",
        ("--config.model=bad_models:flat",),
        "model 'bad_models:flat': returns logits of shape (2,) for images of shape (2, 28, 28, 1)"
        ", expected (2, 10) (one logit per class of 10)",
      ),
      (
        "five-logits",
        ("--config.model=bad_models:five",),
        "model 'bad_models:five': returns logits of shape (2, 5) *, expected (2, 10) *",
      ),
      (
        "eleven-logits",
        ("--config.model=bad_models:eleven",),
        "model 'bad_models:eleven': returns logits of shape (2, 11) *, expected (2, 10) *",
      ),
      (
        "factory-returns-none",
        ("--config.model=bad_models:nothing",),
        "model 'bad_models:nothing': its factory returned NoneType, expected an nnx.Module",
      ),
      (
        "module-raises-on-import",
        ("--config.model=raising_models:anything",),
        "config.model 'raising_models:anything': importing 'raising_models' raised "
        "RuntimeError: no GPU here",
      ),
      (
        "unknown-model-kwarg",
        ("--config.model=bad_models:eleven", "--config.model_kwargs={{'widht': 3}}"),
        "config.model_kwargs of model 'bad_models:eleven': 'widht' is not an argument of its "
        "factory; expected one of width",
      ),
      (
        "model-kwarg-of-another-type",
        ("--config.model=bad_models:eleven", "--config.model_kwargs={{'width': 'abc'}}"),
        "config.model_kwargs of model 'bad_models:eleven': width 'abc' is a string, expected an "
        "integer like its default 11",
      ),
      (
        "family-model-kwarg-misspelt",
        ("--config.model_kwargs={{'widht': 2}}",),
        "config.model_kwargs of model 'mlp': 'widht' is not an argument of its factory; expected "
        "one of input_shape, num_classes, width",
      ),
    ]
  ],
  Case(
    "config-file-that-exits",
    "train.py",
    ("--workdir", "{made}/new_run", "--config", "{made}/exits.py"),
    "error: {made}/exits.py: loading it raised SystemExit(0): a config file must not exit; "
    "expected get_config() to return a ConfigDict",
    absent=("{made}/new_run",),
  ),
  Case(
    "workdir-name-too-long",
    "train.py",
    ("--workdir", "{made}/" + "a" * 300, "--config", MLP, "--config.data_dir={data}"),
    "error: {made}/" + "a" * 300 + ": cannot be created (File name too long); use another workdir",
  ),
  # For developers: the traceback.
  Case(
    "debug-shows-the-traceback",
    "train.py",
    (*TRAIN, "--config.foo=1", "--debug"),
    "flax_mnist.errors.ConfigError: --config.foo: *",
    status=1,
  ),
]


# What a crafted workdir's model would do if it were imported and called.
_SHELL_ARGV = {"argv": ["-c", "open('{case}/pwned', 'w').write('ran')"]}
_TRUNCATE = {"filename": "{run}/history.json", "filemode": "w"}

_BAD_MODELS = """
from flax import nnx


class Head(nnx.Module):
  def __init__(self, shape, rngs):
    self.shape = shape
    self.dense = nnx.Linear(784, 11, rngs=rngs)

  def __call__(self, images):
    logits = self.dense(images.reshape(images.shape[0], -1))
    return logits[:, 0] if self.shape is None else logits[:, : self.shape]


def flat(*, rngs):
  return Head(None, rngs)


def five(*, rngs):
  return Head(5, rngs)


def eleven(*, rngs, width: int = 11):
  return Head(width, rngs)


def nothing(*, rngs):
  return None
"""


def _fill(value, paths: dict[str, Path]):
  """``value`` with ``{name}`` paths filled into its strings."""
  if isinstance(value, str):
    return value.format(**paths)
  if isinstance(value, list):
    return [_fill(item, paths) for item in value]
  return {key: _fill(item, paths) for key, item in value.items()}


def _craft(paths: dict[str, Path], model: str, kwargs: dict) -> None:
  """``{case}/crafted``: the trained run, its config.json and checkpoints naming ``model`` with
  ``kwargs``, every checksum resealed (a CRC is no signature: anyone can recompute it)."""
  crafted = paths["case"] / "crafted"
  shutil.copytree(paths["run"], crafted)
  kwargs = _fill(kwargs, paths)
  config = json.loads((crafted / "config.json").read_text())
  config.update(model=model, model_kwargs=kwargs)
  (crafted / "config.json").write_text(json.dumps(config))
  for meta_file in crafted.glob("checkpoints/*/*/meta/metadata"):
    meta = json.loads(meta_file.read_text())
    meta["config"].update(model=model, model_kwargs=kwargs)
    meta["model"] = model
    meta[checkpoint.META_CHECKSUM] = checkpoint.meta_checksum(meta)
    meta_file.write_text(json.dumps(meta))


def _link_from_run(paths: dict[str, Path], name: str) -> None:
  """``{case}/linked``: a copy of the run whose ``name`` is a link into the run itself."""
  linked = paths["case"] / "linked"
  shutil.copytree(paths["run"], linked)
  shutil.rmtree(linked / name) if (linked / name).is_dir() else (linked / name).unlink()
  (linked / name).symlink_to(paths["run"] / name)


def _reshape(paths: dict[str, Path], name: str, text: str, *, checkpoints: bool = True) -> None:
  """``{case}/shaped``: a copy of the run with ``name`` holding valid JSON of another shape."""
  shaped = paths["case"] / "shaped"
  shutil.copytree(paths["run"], shaped)
  (shaped / name).write_text(text)
  if not checkpoints:
    shutil.rmtree(shaped / "checkpoints")


def _online() -> bool:
  """Whether MNIST's download host answers (not in the sandbox this was written in)."""
  from flax_mnist import tfds_builder

  try:
    tfds_builder.probe_download()
  except Exception:
    return False
  return True


def _files(directory: Path) -> dict[str, bytes | None]:
  """Every file's bytes (None for a directory) under ``directory``, by relative path; ``.lock``
  apart: a refused resume holds the lock while it compares, and the lock file names its last
  holder (it holds no result)."""
  return {
    str(path.relative_to(directory)): None if path.is_dir() else path.read_bytes()
    for path in sorted(directory.rglob("*"))
    if path.name != workdir.LOCK_FILE
  }


def _make_inputs(made: Path, data: Path, run: Path) -> None:
  """The bad inputs: config files, images, a file where a directory belongs, damaged runs."""
  made.mkdir()
  (made / "syntax.py").write_text("def get_config():\n  return {\n")
  (made / "no_get_config.py").write_text("config = None\n")
  (made / "misspelt.py").write_text(
    "from flax_mnist.config import default_config\n\n\ndef get_config():\n"
    "  config = default_config()\n  config.num_epoch = 3\n  return config\n"
  )
  (made / "a_file").write_text("not a directory\n")
  np.save(made / "empty.npy", np.zeros((0,)))
  (made / "text.npy").write_text("0, 0, 0\n")
  nan = np.zeros((28, 28))
  nan[0, 0], nan[1, 1], nan[2, 2] = np.nan, np.inf, -np.inf
  np.save(made / "nan.npy", nan)
  np.save(made / "bool.npy", np.zeros((28, 28), bool))
  np.save(made / "str.npy", np.full((28, 28), "a"))
  from PIL import Image

  white = np.full((28, 28), 255, np.uint8)
  white[5:22, 12:16] = 0  # A dark "1" on white paper.
  Image.fromarray(white).save(made / "white.png")
  (made / "exits.py").write_text("import sys\n\nsys.exit(0)\n")
  (made / "bad_models.py").write_text(_BAD_MODELS)
  (made / "raising_models.py").write_text("raise RuntimeError('no GPU here')\n")
  for name, text in (("empty_config", ""), ("corrupt_config", '{"model": "mlp", "seed"')):
    shutil.copytree(run, made / name)
    (made / name / "config.json").write_text(text)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
  """A trained tiny workdir (1 epoch of mlp) and the inputs of every case."""
  root = tmp_path_factory.mktemp("errors")
  data = write_mnist_dir(root / "idx")
  zero = write_mnist_dir(root / "zero", num_train=10, num_test=4, compress=False)
  write_idx(zero / "t10k-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8))
  write_idx(zero / "t10k-labels-idx1-ubyte", np.zeros(0, np.uint8))
  run = root / "run"
  train.train_and_evaluate(small_config(data, num_epochs=1), run, print_fn=None)
  _make_inputs(root / "made", data, run)
  return {"root": root, "data": data, "zero": zero, "run": run, "made": root / "made"}


def _run(case: Case, saved: dict[str, Path]) -> dict:
  """Runs ``case`` on its own copy of the trained workdir; what came out, and what changed."""
  case_dir = saved["root"] / "cases" / case.id
  run = case_dir / "run"
  shutil.copytree(saved["run"], run)
  if case.setup is not None:
    case.setup({"run": run, "case": case_dir, "made": saved["made"]})
  before = _files(run)
  paths = {"run": str(run), "made": str(saved["made"]), "data": str(saved["data"])}
  paths.update(zero=str(saved["zero"]), case=str(case_dir))
  env = {key: value for key, value in os.environ.items() if not key.startswith("FLAX_MNIST_")}
  env.update({name: value.format(**paths) for name, value in case.env})
  if case.offline and _online():
    env.update({name: "http://127.0.0.1:9" for name in ("https_proxy", "HTTPS_PROXY")})
  command = [sys.executable, str(REPO_ROOT / "scripts" / case.script)]
  command += [arg.format(**paths) for arg in case.args]
  if case.read_only:
    for path in [run, *run.rglob("*")]:
      path.chmod(path.stat().st_mode & ~0o222)
    command = _AS_USER + command
  start = time.monotonic()
  try:
    result = subprocess.run(
      command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120
    )
  finally:
    for path in [run, *run.rglob("*")]:
      path.chmod(path.stat().st_mode | 0o200)
  seconds, after = time.monotonic() - start, _files(run)
  changed = sorted(name for name in {*before, *after} if before.get(name) != after.get(name))
  return {"result": result, "seconds": seconds, "changed": changed, "paths": paths}


@pytest.fixture(scope="module")
def outcomes(saved, request) -> dict[str, concurrent.futures.Future]:
  """Every selected case, started at once two at a time (each pays ~2 s of imports)."""
  selected = {
    item.callspec.params["case"].id
    for item in request.session.items
    if getattr(item, "originalname", None) == "test_cli_case" and hasattr(item, "callspec")
  }
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
  futures = {case.id: pool.submit(_run, case, saved) for case in CASES if case.id in selected}
  yield futures
  pool.shutdown(wait=True, cancel_futures=True)


def _pattern(template: str, paths: dict[str, str]) -> re.Pattern:
  """``template`` with ``{name}`` paths filled in, literal but for ``*`` (anything)."""
  text = template.format(**paths)
  return re.compile(".*".join(re.escape(part) for part in text.split("*")))


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_cli_case(case, outcomes):
  if case.read_only and os.geteuid() == 0 and not _AS_USER:
    # Not a skip: a missing setpriv must not hide the not-writable cases (util-linux has it).
    pytest.fail("running as root without setpriv: cannot make a directory unwritable")
  outcome = outcomes[case.id].result()
  result, paths = outcome["result"], outcome["paths"]
  lines = result.stderr.strip().splitlines() or [""]
  report = f"exit {result.returncode}, stderr:\n{result.stderr[-3000:]}"
  assert result.returncode == case.status, report
  assert _pattern(case.last, paths).fullmatch(lines[-1]), report
  if case.status == 0:
    assert "predicted" in result.stdout, report
  if case.id.startswith("debug"):
    assert "Traceback (most recent call last)" in result.stderr, report
  else:
    assert "Traceback" not in result.stderr, report
    assert sum(line.startswith(("error:", "warning:")) for line in lines) == 1, report
  assert outcome["changed"] == [], f"changed in the saved workdir: {outcome['changed']}"
  for path in case.absent:
    assert not Path(path.format(**paths)).exists(), f"{path.format(**paths)} was left behind"
  assert outcome["seconds"] < case.max_seconds, f"took {outcome['seconds']:.0f} s"
