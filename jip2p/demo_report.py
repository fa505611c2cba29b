"""`jip2p-demo`'s report: ``report.md`` and its figures, from the scores `jip2p.demo_run` made.

  * ``report.md``   — per-family success and PSNR at each evaluated step, with the copy-the-input
                      and noise baselines, and the guidance sweep's table when there is one;
  * ``grid.png``    — `edit_grid`: input | instruction (and its score) | output | ground truth;
  * ``metrics.png`` — `plot_metrics`: training loss, held-out success and PSNR over the steps;
  * ``sweep.png``   — `jip2p.eval.sweep.plot_tradeoff` of the sweep: closeness to the input
                      against instructions followed, a line per s_T through its s_I values.

Everything is drawn from the run's ``metrics`` (what it writes to ``metrics.json``): "points",
each ``{"step", "scores"}`` (step -1: a given model; scores as `jip2p.eval.world_metrics.aggregate`
returns them), "baselines" (scores of copying the input and of noise), "timings" (seconds),
"losses" ([step, loss]) and "sweep", each row ``{"text_guidance", "image_guidance", "scores"}``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jip2p import files, grids
from jip2p.data import synthetic
from jip2p.eval import sweep as sweep_lib
from jip2p.eval import world_metrics


def edit_grid(examples: Sequence[synthetic.Example], outputs: np.ndarray,
              results: Sequence[dict], *, per_family: int = 2,
              scale: int | None = None) -> np.ndarray:
  """uint8 grid, one row per example (``per_family`` of each family): input | instruction (and
  its score) | output | ground truth, images upscaled ``scale``× (default: to 128 px)."""
  scale = scale or max(1, 128 // examples[0].size)
  side = examples[0].size * scale
  header = [grids.text_tile(t, 2 * side if t == "instruction" else side, 16)
            for t in ("input", "instruction", "output", "ground truth")]
  rows, taken = [header], {}
  for ex, out, res in zip(examples, outputs, results):
    if taken.get(ex.family, 0) >= per_family:
      continue
    taken[ex.family] = taken.get(ex.family, 0) + 1
    mark = "success" if res["success"] else "fail"
    text = grids.text_tile(f"[{ex.family}] {ex.instruction} ({mark}, {res['psnr']:.1f} dB)",
                           2 * side, side)
    rows.append([grids.upscale(ex.input_image, scale), text, grids.upscale(out, scale),
                 grids.upscale(ex.edited_image, scale)])
  return grids.image_grid(rows, gap=2)


def plot_metrics(path: str, losses: Sequence[tuple[int, float]],
                 points: Sequence[dict[str, Any]]) -> None:
  """Training loss, and held-out success per family and PSNR, over the training steps."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  fig, (ax_loss, ax_ok) = plt.subplots(1, 2, figsize=(11, 4))
  if losses:
    ax_loss.plot([s for s, _ in losses], [l for _, l in losses], color="tab:blue")
    ax_loss.set_yscale("log")
  ax_loss.set(xlabel="training step", ylabel="ε MSE (training batches)", title="loss")
  steps = [p["step"] for p in points]
  ax_ok.plot(steps, [p["scores"]["overall"]["success"] for p in points], "k-o", label="all")
  for family in synthetic.FAMILIES:
    values = [p["scores"]["families"].get(family, {}).get("success") for p in points]
    if all(v is not None for v in values):
      ax_ok.plot(steps, values, "--", marker=".", label=family)
  ax_ok.set(xlabel="training step", ylabel="success rate (held-out)", ylim=(-0.02, 1.02),
            title="held-out edits")
  ax_psnr = ax_ok.twinx()
  ax_psnr.plot(steps, [p["scores"]["overall"]["psnr"] for p in points], ":", color="tab:gray")
  ax_psnr.set_ylabel("PSNR dB (dotted)")
  ax_ok.legend(fontsize=7, loc="upper left")
  fig.tight_layout()
  with files.replacing(path) as tmp:
    fig.savefig(tmp, dpi=110, format="png")
  plt.close(fig)


def plot_sweep(path: str, rows: Sequence[dict[str, Any]]) -> None:
  """The paper's trade-off plot in this world: closeness to the input (x; the exact counterpart
  of the paper's CLIP image similarity) against instructions followed (y; of its directional
  similarity), a line per s_T through its s_I values."""
  table = [{"group": "all", "series": "image", "text_guidance": r["text_guidance"],
            "image_guidance": r["image_guidance"], **r["scores"]["overall"]} for r in rows]
  sweep_lib.plot_tradeoff(table, [path], title="two-scale guidance on held-out edits",
                          x="input_psnr", y="edit_ok")


def sweep_table(rows: Sequence[dict[str, Any]]) -> list[str]:
  """Markdown: one row per (s_T, s_I) with the overall rates, the PSNRs against the truth and
  against the input, and each family's success."""
  families = list(rows[0]["scores"]["families"])
  lines = ["| s_T | s_I | success | instruction followed | rest kept | PSNR dB | "
           "PSNR to input dB | " + " | ".join(families) + " |", "|---" * (7 + len(families)) + "|"]
  for r in rows:
    o, f = r["scores"]["overall"], r["scores"]["families"]
    lines.append(f"| {r['text_guidance']:g} | {r['image_guidance']:g} | {o['success']:.0%} | "
                 f"{o['edit_ok']:.0%} | {o['rest_ok']:.0%} | {o['psnr']:.1f} | "
                 f"{o['input_psnr']:.1f} | "
                 + " | ".join(f"{f[k]['success']:.0%}" for k in families) + " |")
  return lines


def _steps_table(points: Sequence[dict[str, Any]], base: dict[str, dict]) -> list[str]:
  """Markdown: one row per family (and overall), a column per point and baseline."""
  columns = [(f"step {p['step']}" if p["step"] >= 0 else "model", p["scores"])
             for p in points]
  columns += [("copy input", base["copy"]), ("noise", base["noise"])]
  lines = ["| family | n | " + " | ".join(name for name, _ in columns) + " |",
           "|---|---|" + "---|" * len(columns)]
  last = points[-1]["scores"]
  for family in list(last["families"]) + ["overall"]:
    cells = []
    for _, sc in columns:
      entry = sc["overall"] if family == "overall" else sc["families"][family]
      cells.append(f"{entry['success']:.0%} ({entry['psnr']:.1f} dB)")
    n = (last["overall"] if family == "overall" else last["families"][family])["n"]
    lines.append(f"| {family} | {n} | " + " | ".join(cells) + " |")
  return lines


def percent(x: float | None) -> str:
  """A rate as a whole percentage; "–" where it is undefined (None)."""
  return "–" if x is None else f"{x:.0%}"


def pairs_section(pairs: dict[str, Any]) -> list[str]:
  """Markdown: the generated training pairs' exact scores (`jip2p.p2p.world.summarize`)."""
  f = pairs["filter"]
  return [
      "## The generated training pairs",
      "",
      f"{pairs['pairs']} candidate pairs from {pairs['prompts']} prompts, scored exactly "
      "against the world's truth (\"exact\": the second image is the first with exactly the "
      "requested edit; \"drawn\": the first image shows its caption's scene; \"edited\": the "
      "requested change is there):",
      "",
      "| | pairs | exact | drawn | edited | exact pairs per prompt | prompts with an exact pair |",
      "|---|---:|---:|---:|---:|---:|---:|",
      f"| before the CLIP filter | {pairs['pairs']} | {pairs['exact']:.0%} | "
      f"{pairs['drawn']:.0%} | {pairs['edited']:.0%} | {pairs['exact_per_prompt']:.2f} | "
      f"{pairs['prompts_with_exact']:.0%} |",
      f"| kept by it | {f['kept']} | {percent(f['precision'])} | | | | {percent(f['prompts_kept'])} "
      "(with any kept pair) |",
      "",
      f"The filter's precision (exact among kept) {percent(f['precision'])}, recall (kept among "
      f"exact) {percent(f['recall'])}. Kept and rejected pairs:",
      "",
      "![pairs](pairs.png)",
      "",
  ]


def markdown(s, metrics: dict[str, Any], info: dict[str, Any], *, eval_seed: int) -> str:
  """``report.md`` of a run with settings ``s`` (a `jip2p.demo_run.Settings`)."""
  points, base, sweep = metrics["points"], metrics["baselines"], metrics["sweep"]
  final = points[-1]["scores"]
  lines = [
      "# jip2p demo: InstructPix2Pix on the procedural edit world",
      "",
      f"**Held-out success {final['overall']['success']:.0%}, PSNR "
      f"{final['overall']['psnr']:.1f} dB** on {s.num_eval} scenes and instruction wordings "
      f"never trained on (copying the input: {base['copy']['overall']['success']:.0%}, "
      f"{base['copy']['overall']['psnr']:.1f} dB). Model: {info['model']}.",
      "",
      "![edits](grid.png)",
      "",
      "Success per family (mean PSNR against the exact ground truth), at each evaluated step:",
      "",
      *_steps_table(points, base),
      "",
      "A success is an edit whose regions show the requested colours (within "
      f"{world_metrics.Tolerances.colour:.0f} RGB) while the rest of the scene is unchanged "
      "(see `jip2p/eval/world_metrics.py`).",
      "",
      *(["## Guidance sweep", "",
         "![sweep](sweep.png)", "",
         "The same held-out edits at each (s_T, s_I): \"instruction followed\" is the edit "
         "half of a success, \"rest kept\" the other half; \"PSNR to input\" is how close the "
         "output stays to the input image (the paper's trade-off: s_I keeps the input, s_T "
         "follows the text; the plot draws it as the paper does).", "", *sweep_table(sweep),
         ""] if sweep else []),
      *(pairs_section(metrics["pairs"]) if metrics["pairs"] else []),
      "## How it was made",
      "",
      f"Held-out evaluation: {s.num_eval} scenes of dataset seed {eval_seed} with the held-out "
      f"instruction wording, edited by `jip2p.edit.Editor` ({s.sampler}, {s.eval_steps} steps, "
      f"s_T = {s.text_guidance}, s_I = {s.image_guidance}, seed {s.seed})"
      + ("." if s.families == synthetic.FAMILIES else
         f"; edit families: {', '.join(s.families)}."),
      "",
      "![metrics](metrics.png)",
      "",
      *[f"- {k}: {v}" for k, v in info.items() if k != "model"],
      *[f"- {k}: {v:.0f} s" for k, v in metrics["timings"].items()],
      "",
  ]
  return "\n".join(lines)


def write(out: str, s, metrics: dict[str, Any], info: dict[str, Any],
          examples: Sequence[synthetic.Example], outputs: np.ndarray, *, eval_seed: int) -> str:
  """Writes ``report.md`` and its figures into ``out``; ``outputs`` are the last point's edits
  of ``examples`` (the grid's). Returns the report's path."""
  if metrics["sweep"]:
    plot_sweep(os.path.join(out, "sweep.png"), metrics["sweep"])
  results = [world_metrics.score(o, e) for o, e in zip(outputs, examples)]
  files.save_png(edit_grid(examples, outputs, results), os.path.join(out, "grid.png"))
  plot_metrics(os.path.join(out, "metrics.png"), metrics["losses"],
               [p for p in metrics["points"] if p["step"] >= 0])
  path = os.path.join(out, "report.md")
  with files.replacing(path) as tmp, open(tmp, "w") as f:
    f.write(markdown(s, metrics, info, eval_seed=eval_seed))
  return path
