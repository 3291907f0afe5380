"""The notebook's questions answered from several seeds: train, measure, test, plot, write.

``run.run_comparison`` trains each model of the family from every seed (the only module here
that imports the trainer); ``stats`` turns the per-seed histories into figures over seeds and
asks whether the differences between models exceed the seed spread (Welch's t-test, bootstrap
interval); ``plots`` draws the PNGs; ``render`` writes report.md, whose every figure and
sentence comes from the results. ``write_report`` writes results.json, the PNGs and report.md;
``render_from_results`` writes the PNGs and report.md again from a results.json alone, without
training (after a change of wording or plot).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flax_mnist import workdir
from flax_mnist.errors import FlaxMnistError
from flax_mnist.study import plots, render, stats
from flax_mnist.study.plots import PLOTS
from flax_mnist.study.render import SECTIONS

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"

__all__ = [
  "PLOTS",
  "REPORT_FILE",
  "RESULTS_FILE",
  "SECTIONS",
  "plots",
  "render",
  "render_from_results",
  "stats",
  "write_report",
]


def write_report(results: Mapping[str, Any], out_dir: str | os.PathLike, *, command: str) -> Path:
  """Writes the PNGs, results.json (with ``command`` and the plots' files) and report.md into
  ``out_dir``; returns the report's path."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  written = plots.write_plots(results, out_dir)
  results = {**results, "command": command, "plots": written}
  workdir.write_json(out_dir / RESULTS_FILE, results)
  path = out_dir / REPORT_FILE
  workdir.write_text(path, render.render_report(results))
  return path


def render_from_results(
  results_path: str | os.PathLike, out_dir: str | os.PathLike | None = None
) -> Path:
  """Writes the PNGs and report.md again from ``results_path`` (a results.json that
  ``write_report`` wrote; the command it records is the one shown) into ``out_dir`` (default:
  beside it, where results.json is rewritten unchanged). Trains nothing; returns the report."""
  results_path = Path(results_path)
  if not results_path.is_file():
    raise FlaxMnistError(f"{results_path}: no such file (run the comparison first)")
  results = workdir.read_json(results_path)
  if "command" not in results:
    raise FlaxMnistError(f"{results_path}: records no command (not written by write_report)")
  out_dir = results_path.parent if out_dir is None else out_dir
  return write_report(results, out_dir, command=results["command"])
