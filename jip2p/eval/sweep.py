"""Guidance sweeps, their summary table (CSV) and the paper's trade-off plot (PNG + SVG).

The paper's trade-off plot fixes text guidance s_T = 7.5 and sweeps image guidance s_I over
1.0 … 2.2; each setting is one point, directional CLIP similarity on x (does the edit follow the
caption change?) against CLIP image similarity on y (does the output keep the input?). "text" is
the reverse sweep (s_I fixed, s_T varied), "both" draws the two series, and "grid" every s_T ×
s_I, a line per s_T (`jip2p-demo --sweep` draws its exact world scores with the same plot).
`sdedit_settings` adds the paper's baseline beside them: SDEdit at s_T with its strength swept,
one more line on the same axes (the paper's Fig. 8).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence

import numpy as np

from jip2p import files
from jip2p.errors import ConfigError
from jip2p.eval import paper_metrics
from jip2p.eval.runner import METRICS, Setting

SWEEPS = ("none", "image", "text", "both", "grid")
IMAGE_VALUES = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2)
TEXT_VALUES = (3.0, 4.5, 6.0, 7.5, 9.0, 10.5, 12.0)
STRENGTH_VALUES = (0.3, 0.45, 0.6, 0.75, 0.9)


def settings(sweep: str = "image", *, text_guidance: float = 7.5, image_guidance: float = 1.5,
             image_values: Sequence[float] = IMAGE_VALUES,
             text_values: Sequence[float] = TEXT_VALUES) -> list[Setting]:
  """The settings of a sweep: "none" is the one (text_guidance, image_guidance) point; "image"
  sweeps s_I at s_T = text_guidance; "text" sweeps s_T at s_I = image_guidance; "both" both;
  "grid" sweeps s_I at each s_T of text_values (an "image" series per s_T)."""
  if sweep not in SWEEPS:
    raise ConfigError(f"sweep must be one of {SWEEPS}, got {sweep!r}")
  for name, values in (("image_values", image_values), ("text_values", text_values)):
    if not values or len(set(values)) != len(values):
      raise ConfigError(f"{name} must be distinct values, got {list(values)}")
  out = []
  if sweep == "none":
    out.append(Setting(float(text_guidance), float(image_guidance), "single"))
  if sweep in ("image", "both"):
    out += [Setting(float(text_guidance), float(v), "image") for v in image_values]
  if sweep in ("text", "both"):
    seen = {s.key for s in out}
    out += [s for s in (Setting(float(v), float(image_guidance), "text") for v in text_values)
            if s.key not in seen]
  if sweep == "grid":
    out += [Setting(float(t), float(i), "image") for t in text_values for i in image_values]
  return out


def sdedit_settings(strength_values: Sequence[float] = STRENGTH_VALUES, *,
                    text_guidance: float = 7.5) -> list[Setting]:
  """SDEdit's series: one setting per strength in (0, 1], guidance scale ``text_guidance``."""
  if not strength_values or len(set(strength_values)) != len(strength_values) or not all(
      0 < v <= 1 for v in strength_values):
    raise ConfigError(f"strength_values must be distinct values in (0, 1], got "
                      f"{list(strength_values)}")
  return [Setting(float(text_guidance), 0.0, "sdedit", strength=float(v))
          for v in strength_values]


def summary_table(rows: Sequence[dict], setting_list: Sequence[Setting], *,
                  group_key: str | None = "group", confidence: float = 0.95) -> list[dict]:
  """One dict per (setting, group): setting, s_T, s_I, series, group ("all" first), n, and per
  metric its mean, ``_low`` and ``_high`` (the confidence interval) and ``_n``.

  Metrics that no row has are left out.
  """
  present = [m for m in METRICS if any(m in r for r in rows)]
  table = []
  for setting in setting_list:
    mine = [r for r in rows if r["setting"] == setting.key]
    if not mine:
      continue
    groups = paper_metrics.summarize(mine, present, group_key=group_key, confidence=confidence)
    for group, means in groups.items():
      size = len(mine) if group == "all" else sum(
          1 for r in mine if str(r.get(group_key) or "") == group)
      entry = {"setting": setting.key, "text_guidance": setting.text_guidance,
               "image_guidance": setting.image_guidance, "series": setting.series,
               "strength": setting.strength, "group": group, "n": size}
      for m in present:
        mean = means[m]
        entry.update({m: mean.mean, f"{m}_low": mean.low, f"{m}_high": mean.high,
                      f"{m}_n": mean.n})
      table.append(entry)
  return table


def write_csv(table: Sequence[dict], path: str) -> None:
  """The summary table as CSV (NaN written empty), atomically."""
  if not table:
    raise ConfigError("nothing to write: the summary table is empty")
  columns = list(table[0])
  with files.replacing(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    for entry in table:
      writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v)
                       for k, v in entry.items()})


# Axis label and range of the metrics a trade-off plot draws (others: the metric's name, auto).
AXES = {
    "clip_dir": ("CLIP text-image direction similarity", None),
    "clip_img": ("CLIP image similarity", None),
    "edit_ok": ("instruction followed (rate)", (-0.02, 1.02)),
    "input_psnr": ("closeness to the input image (PSNR dB)", None),
}


def plot_tradeoff(table: Sequence[dict], paths: Sequence[str], *, title: str = "",
                  x: str = "clip_dir", y: str = "clip_img", error_bars: bool = False) -> bool:
  """The paper's plot of the "all" rows: one labelled point per setting, a line per series and
  fixed scale (an "image" series per s_T, a "text" series per s_I; with ``error_bars``, the
  confidence intervals too). Writes each of ``paths`` (format from the extension); returns False
  (writing nothing) when the table lacks the two metrics."""
  points = [e for e in table if e["group"] == "all" and np.isfinite(e.get(x, math.nan))
            and np.isfinite(e.get(y, math.nan))]
  if not points:
    return False
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=150)
  lines = list(dict.fromkeys((e["series"], _fixed_scale(e)) for e in points))
  for k, line in enumerate(lines):
    mine = [e for e in points if (e["series"], _fixed_scale(e)) == line]
    xs, ys = np.array([e[x] for e in mine]), np.array([e[y] for e in mine])
    colour = f"C{k}"
    if error_bars:
      ax.errorbar(xs, ys, xerr=_error_bars(mine, x), yerr=_error_bars(mine, y), fmt="none",
                  ecolor=colour, elinewidth=0.8, capsize=2, alpha=0.4)
    ax.plot(xs, ys, "-o", color=colour, markersize=5, label=line[1] or "setting")
    for e in mine:
      ax.annotate(_swept_scale(e), (e[x], e[y]), textcoords="offset points", xytext=(5, 4),
                  fontsize=7, color=colour)
  for axis, metric in (("x", x), ("y", y)):
    label, limits = AXES.get(metric, (metric, None))
    ax.set(**{f"{axis}label": label, f"{axis}lim": limits})
  if title:
    ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  with plt.rc_context({"svg.fonttype": "none"}):  # SVG text stays text: searchable, editable
    for path in paths:
      with files.replacing(path) as tmp:
        fig.savefig(tmp, format=os.path.splitext(path)[1][1:])
  plt.close(fig)
  return True


def _fixed_scale(e: dict) -> str:
  """The legend of the line ``e`` is on: the scale its series holds fixed ("" if none)."""
  return {"image": f"s_T = {e['text_guidance']:g}",
          "text": f"s_I = {e['image_guidance']:g}",
          "sdedit": f"SDEdit, s = {e['text_guidance']:g}"}.get(e["series"], "")


def _swept_scale(e: dict) -> str:
  """The label of ``e``'s point: the scale its series sweeps (both, for a single setting)."""
  if e["series"] == "sdedit":
    return f"strength={e['strength']:g}"
  return {"image": f"s_I={e['image_guidance']:g}", "text": f"s_T={e['text_guidance']:g}"}.get(
      e["series"], f"s_T={e['text_guidance']:g}, s_I={e['image_guidance']:g}")


def _error_bars(entries: Sequence[dict], metric: str) -> np.ndarray | None:
  """[2, n] distances to the interval ends (None when no entry has an interval)."""
  low = np.array([e.get(f"{metric}_low", math.nan) for e in entries], np.float64)
  high = np.array([e.get(f"{metric}_high", math.nan) for e in entries], np.float64)
  mean = np.array([e[metric] for e in entries], np.float64)
  if not np.isfinite(low).any():
    return None
  return np.nan_to_num(np.stack([mean - low, high - mean]))
