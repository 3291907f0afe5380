"""Numbers to report text: formatting only, nothing computed but a change of unit (a fraction
to points or percent, seconds to minutes)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def mean_std(value: Mapping[str, float], digits: int = 4) -> str:
  """A spread over seeds as "mean ± std"."""
  return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"


def points(fraction: float, *, signed: bool = True) -> str:
  """An accuracy (difference) in percentage points: 0.0123 -> "+1.23"."""
  hundredths = fraction * 100
  return f"{hundredths:+.2f}" if signed else f"{hundredths:.2f}"


def percent_change(fraction: float) -> str:
  """A relative change: 0.25 -> "+25%"."""
  percent = fraction * 100
  return f"{percent:+.0f}%"


def seconds(value: float | None) -> str:
  """A duration in seconds, in minutes from 2 minutes on; "n/a" when unknown."""
  if value is None:
    return "n/a"
  if value >= 120:
    minutes = value / 60
    return f"{minutes:.1f} min"
  return f"{value:.1f} s"


def p_value(value: float) -> str:
  """A p-value to two significant digits; nan (no spread to test) says so."""
  if math.isnan(value):
    return "n/a (no spread)"
  return f"{value:.2g}" if value >= 1e-4 else "< 1e-4"


def shape(dims: Sequence[int]) -> str:
  """An array shape as "24 × 24 × 16"."""
  return " × ".join(map(str, dims))


def params(facts: Mapping[str, Any]) -> str:
  """Trainable parameters, "+ BatchNorm statistics" when the model has them."""
  statistics = f" + {facts['non_trainable']:,}" if facts["non_trainable"] else ""
  return f"{facts['trainable']:,}{statistics}"


def of_seeds(text: str, reached: int, seeds: int) -> str:
  """``text``, with "(reached/seeds seeds)" when not every seed counts in it."""
  return text if reached == seeds else f"{text} ({reached}/{seeds} seeds)"


def epochs_to(value: Mapping[str, Any], seeds: int) -> str:
  """The mean epoch that reaches an accuracy (``summary["epochs_to_98"]``), or "never"."""
  if value["reached"] == 0:
    return "never"
  return of_seeds(f"{value['mean']:.1f}", value["reached"], seeds)


def time_to(value: Mapping[str, Any], seeds: int) -> str:
  """Seconds to reach an accuracy (``stats.time_to``), or "never"."""
  if value["seconds"] is None:
    return "never"
  return of_seeds(f"{value['seconds']:.0f} s", value["reached"], seeds)


def interval(row: Mapping[str, Any]) -> str:
  """A pairwise row's bootstrap interval, in points."""
  low, high = row["interval"]
  return f"[{points(low)}, {points(high)}]"


def table(header: str, rows: Sequence[Sequence[str]]) -> str:
  """A Markdown table; ``header`` is its column names joined by " | "."""
  separator = " | ".join(["---"] * len(header.split(" | ")))
  lines = [header, separator, *(" | ".join(cells) for cells in rows)]
  return "\n".join(f"| {line} |" for line in lines)
