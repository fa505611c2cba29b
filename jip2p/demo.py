"""`jip2p-demo`: the procedural edit world end to end, on a CPU, with nothing downloaded.

Each stage runs the code a real run uses:

  1. data   — examples of `jip2p.data.synthetic` (training wording, dataset seed 0) written as
              TFRecord triplets by `jip2p.data.writer.DatasetWriter`;
  2. train  — `jip2p.train.loop.train` on ``configs/synthetic.py`` reading them through the
              tf.data reader (checkpoints, EMA, conditioning dropout, AdamW);
  3. edit   — held-out scenes (dataset seed 1, held-out wording) edited by `jip2p.edit.Editor`
              with two-scale guidance, from the untrained model and from checkpoints along the run
              (each exported by `jip2p.train.exporting`);
  4. report — exact scores (`jip2p.eval.world_metrics`: PSNR, per-family success) in
              ``report.md``, with ``grid.png`` (input | instruction | output | ground truth) and
              ``metrics.png`` (loss and held-out success over the training steps).

``pretrained=DIR`` skips 1–2 and edits with that model folder (`PRETRAINED`: the one shipped in
``data/``; any exported world model works). This process imports
TensorFlow (the reader and writer), so it must never import PyTorch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jip2p.data import synthetic
from jip2p.errors import CheckpointError, ConfigError
from jip2p.eval import world_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "synthetic.py")
PRETRAINED = os.path.join(REPO, "data", "synthetic-ip2p")
TRAIN_SEED = 0  # dataset seed of the training scenes
EVAL_SEED = 1  # held-out scenes: another seed, and the held-out instruction wording
DATASET_NAME = "synthetic_world"


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a demo run does; the defaults make the README's command (a few minutes on 2 cores)."""

  out: str = "demo"
  config: str = CONFIG
  config_arg: str = ""
  steps: int | None = 300  # None: the config's total_steps (11,000, as the shipped model)
  minutes: float | None = None  # stop training after this long (a checkpoint is saved)
  pretrained: str | None = None  # a model folder to edit with instead of training one
  num_train: int = 20_000  # training examples written
  num_eval: int = 32  # held-out examples edited at each evaluation point
  eval_points: int = 1  # checkpoints evaluated along the run (besides the untrained model)
  eval_steps: int = 20  # sampler steps per edit
  # Not the paper's (7.5, 1.5): the world's small models do best at (3, 1), and no worse after
  # 300 steps (bench/RESULTS.md, the guidance sweeps); s_T 7.5 over-drives them.
  text_guidance: float = 3.0
  image_guidance: float = 1.0
  sampler: str = "euler_ancestral"
  seed: int = 0
  batch_size: int = 32  # edits per compiled call
  sweep: bool = False  # also edit with every (s_T, s_I) of SWEEP_TEXT × SWEEP_IMAGE
  families: tuple[str, ...] = synthetic.FAMILIES  # edit families trained on and evaluated

  def validate(self) -> None:
    for key in ("num_train", "num_eval", "eval_points", "eval_steps", "batch_size"):
      if getattr(self, key) < 1:
        raise ConfigError(f"demo: {key}={getattr(self, key)} must be at least 1")
    if self.steps is not None and self.steps < 1:
      raise ConfigError(f"demo: steps={self.steps} must be at least 1")
    if self.minutes is not None and not self.minutes > 0:
      raise ConfigError(f"demo: minutes={self.minutes} must be positive")
    unknown = [f for f in self.families if f not in synthetic.FAMILIES]
    if unknown or not self.families:
      raise ConfigError(f"demo: families {list(self.families)} must be a non-empty subset of "
                        f"{list(synthetic.FAMILIES)}")


# ------------------------------------------------------------------------------ data


def write_world(directory: str, *, n: int, seed: int = TRAIN_SEED, size: int = 64,
                families: Sequence[str] = synthetic.FAMILIES,
                examples_per_shard: int = 5000) -> dict:
  """Writes examples ``0 .. n-1`` of the world ``seed`` (training wording, edits of
  ``families``) as the ``train`` split of a TFRecord triplet dataset (what ``jip2p-import
  synthetic`` does); returns its manifest. A rerun into the same folder resumes."""
  from jip2p.data import importers
  from jip2p.data.writer import DatasetWriter
  writer = DatasetWriter(directory, name=DATASET_NAME, examples_per_shard=examples_per_shard,
                         metadata={"importer": "synthetic", "seed": seed, "size": size,
                                   "families": list(families)})
  try:
    importers.import_rows(importers.iter_synthetic(n, seed=seed, size=size, families=families),
                          writer,
                          split="train", workers=1)
  except BaseException:
    writer.abandon()
    raise
  return writer.close()


# ------------------------------------------------------------------------------ config


# ------------------------------------------------------------------------------ training


class _Deadline:
  """Stops `jip2p.train.loop.train` after ``seconds`` through its preemption path: SIGTERM makes
  the loop save a checkpoint and return. Our own handler stays installed around the call, so a
  signal that arrives after the loop returned does nothing."""

  def __init__(self, seconds: float | None):
    self.seconds = seconds
    self._timer = None
    self._previous = None

  def __enter__(self):
    if self.seconds is not None:
      self._previous = signal.signal(signal.SIGTERM, lambda *_: None)
      self._timer = threading.Timer(self.seconds, os.kill, (os.getpid(), signal.SIGTERM))
      self._timer.daemon = True
      self._timer.start()
    return self

  def __exit__(self, *exc):
    if self._timer is not None:
      self._timer.cancel()
      signal.signal(signal.SIGTERM, self._previous)


def train(config, workdir: str, *, minutes: float | None = None) -> dict[str, Any]:
  """Runs the trainer on ``config`` in ``workdir``; with ``minutes``, stops (and saves) then."""
  from jip2p.train import loop
  if minutes is not None and threading.current_thread() is not threading.main_thread():
    raise ConfigError("demo: a time limit (minutes) needs the main thread (it stops the trainer "
                      "with SIGTERM)")
  with _Deadline(None if minutes is None else 60.0 * minutes):
    return loop.train(config, workdir)


def read_losses(workdir: str) -> list[tuple[int, float]]:
  """(step, loss) of each line the trainer logged to ``metrics.jsonl``."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [(int(r["step"]), float(r["loss"])) for r in records if "loss" in r]


def spread(steps: Sequence[int], k: int) -> list[int]:
  """At most ``k`` of ``steps`` (sorted), evenly spaced, always including the last."""
  steps = sorted(steps)
  if len(steps) <= k:
    return steps
  picks = np.linspace(0, len(steps) - 1, k).round().astype(int)
  return [steps[i] for i in sorted(set(picks.tolist()))]


# ------------------------------------------------------------------------------ evaluation


def edit_examples(editor, examples: Sequence[synthetic.Example], s: Settings) -> np.ndarray:
  """uint8 [N, H, W, 3]: each example's input edited by its instruction (seed ``s.seed + i``)."""
  size = examples[0].size
  out = editor([e.input_image for e in examples], [e.instruction for e in examples],
               steps=s.eval_steps, text_guidance=s.text_guidance, image_guidance=s.image_guidance,
               resolution=size, seed=s.seed, sampler=s.sampler,
               batch_size=min(s.batch_size, len(examples)), output_type="np")
  return np.stack([np.round(np.asarray(o) * 255.0).astype(np.uint8) for o in out])


def score(outputs: np.ndarray, examples: Sequence[synthetic.Example]) -> dict[str, Any]:
  """`world_metrics.aggregate` of every output against its example's truth."""
  return world_metrics.aggregate(world_metrics.score(o, e) for o, e in zip(outputs, examples))


SWEEP_TEXT = (1.0, 3.0, 7.5)
SWEEP_IMAGE = (1.0, 1.5, 2.0)


def guidance_sweep(editor, examples: Sequence[synthetic.Example], s: Settings,
                   log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Scores of the held-out edits at every (s_T, s_I) of `SWEEP_TEXT` × `SWEEP_IMAGE`."""
  rows = []
  for text in SWEEP_TEXT:
    for image in SWEEP_IMAGE:
      outputs = edit_examples(editor, examples, dataclasses.replace(
          s, text_guidance=text, image_guidance=image))
      rows.append({"text_guidance": text, "image_guidance": image,
                   "scores": score(outputs, examples)})
      o = rows[-1]["scores"]["overall"]
      log(f"sweep s_T={text:g} s_I={image:g}: success {o['success']:.0%}, instruction followed "
          f"{o['edit_ok']:.0%}, rest of the scene kept {o['rest_ok']:.0%}, PSNR to the input "
          f"{o['input_psnr']:.1f} dB")
  return rows


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


def plot_sweep(path: str, rows: Sequence[dict[str, Any]]) -> None:
  """The paper's trade-off plot in this world: closeness to the input (x; the paper's CLIP image
  similarity, here PSNR to the input image) against instruction followed (y; its directional
  similarity, here exact), one line per s_T through its s_I values."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 4.5))
  for text in sorted({r["text_guidance"] for r in rows}):
    series = [r for r in rows if r["text_guidance"] == text]
    xs = [r["scores"]["overall"]["input_psnr"] for r in series]
    ys = [r["scores"]["overall"]["edit_ok"] for r in series]
    ax.plot(xs, ys, "-o", label=f"s_T = {text:g}")
    for r, x, y in zip(series, xs, ys):
      ax.annotate(f"s_I={r['image_guidance']:g}", (x, y), textcoords="offset points",
                  xytext=(4, 4), fontsize=7)
  ax.set(xlabel="closeness to the input image (PSNR dB)", ylabel="instruction followed (rate)",
         title="two-scale guidance on held-out edits", ylim=(-0.02, 1.02))
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def baselines(examples: Sequence[synthetic.Example]) -> dict[str, dict]:
  """Scores that need no model: the unedited input ("copy") and uniform noise ("noise")."""
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (len(examples),) + examples[0].input_image.shape, dtype=np.uint8)
  return {"copy": score(np.stack([e.input_image for e in examples]), examples),
          "noise": score(noise, examples)}


# ------------------------------------------------------------------------------ figures


def _text_tile(text: str, width: int, height: int) -> np.ndarray:
  tile = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(tile)
  font = ImageFont.load_default()
  lines, line = [], ""
  for word in text.split():
    candidate = f"{line} {word}".strip()
    if draw.textlength(candidate, font=font) > width - 8 and line:
      lines.append(line)
      line = word
    else:
      line = candidate
  lines.append(line)
  y = max(2, (height - 12 * len(lines)) // 2)
  for line in lines:
    draw.text((4, y), line, fill=(0, 0, 0), font=font)
    y += 12
  return np.asarray(tile)


def image_grid(examples: Sequence[synthetic.Example], outputs: np.ndarray, results: Sequence[dict],
               *, per_family: int = 2, scale: int | None = None) -> np.ndarray:
  """uint8 grid, one row per example (``per_family`` of each family): input | instruction (and
  ✓/✗) | output | ground truth, images upscaled ``scale``× (nearest; default to 128 px)."""
  rows, taken = [], {}
  scale = scale or max(1, 128 // examples[0].size)
  side = examples[0].size * scale
  up = lambda im: np.kron(im, np.ones((scale, scale, 1), np.uint8))
  header = np.concatenate([_text_tile(t, side if t != "instruction" else 2 * side, 16)
                           for t in ("input", "instruction", "output", "ground truth")], axis=1)
  for ex, out, res in zip(examples, outputs, results):
    if taken.get(ex.family, 0) >= per_family:
      continue
    taken[ex.family] = taken.get(ex.family, 0) + 1
    mark = "success" if res["success"] else "fail"
    text = _text_tile(f"[{ex.family}] {ex.instruction} ({mark}, {res['psnr']:.1f} dB)",
                      2 * side, side)
    rows.append(np.concatenate([up(ex.input_image), text, up(out), up(ex.edited_image)], axis=1))
  gap = np.full((2, rows[0].shape[1], 3), 255, np.uint8)
  return np.concatenate([header] + [r for row in rows for r in (gap, row)], axis=0)


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
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _table(points: Sequence[dict[str, Any]], base: dict[str, dict]) -> list[str]:
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


def write_report(path: str, s: Settings, points: Sequence[dict[str, Any]],
                 base: dict[str, dict], timings: dict[str, float], info: dict[str, Any],
                 sweep: Sequence[dict[str, Any]] = ()) -> None:
  final = points[-1]["scores"]
  lines = [
      "# jip2p demo: InstructPix2Pix on the procedural edit world",
      "",
      f"Model: {info['model']}. Held-out evaluation: {s.num_eval} scenes of dataset seed "
      f"{EVAL_SEED} with the held-out instruction wording, edited by `jip2p.edit.Editor` "
      f"({s.sampler}, {s.eval_steps} steps, s_T = {s.text_guidance}, s_I = {s.image_guidance}, "
      f"seed {s.seed})"
      + ("." if s.families == synthetic.FAMILIES else
         f"; edit families: {', '.join(s.families)}."),
      "",
      f"**Final: success {final['overall']['success']:.0%}, PSNR "
      f"{final['overall']['psnr']:.1f} dB** (copy-the-input baseline: "
      f"{base['copy']['overall']['success']:.0%}, {base['copy']['overall']['psnr']:.1f} dB).",
      "",
      "Success per family (mean PSNR against the exact ground truth), at each evaluated step:",
      "",
      *_table(points, base),
      "",
      "A success is an edit whose regions show the requested colours (within "
      f"{world_metrics.Tolerances.colour:.0f} RGB) while the rest of the scene is unchanged "
      "(see `jip2p/eval/world_metrics.py`).",
      "",
      "![edits](grid.png)",
      "",
      "![metrics](metrics.png)",
      "",
      *(["## Guidance sweep", "",
         "The same held-out edits at each (s_T, s_I): \"instruction followed\" is the edit "
         "half of a success, \"rest kept\" the other half; \"PSNR to input\" is how close the "
         "output stays to the input image (the paper's trade-off: s_I keeps the input, s_T "
         "follows the text; the plot draws it as the paper does).", "", *sweep_table(sweep), "",
         "![sweep](sweep.png)", ""] if sweep else []),
      "## Run",
      "",
      *[f"- {k}: {v}" for k, v in info.items() if k != "model"],
      *[f"- {k}: {v:.0f} s" for k, v in timings.items()],
      "",
  ]
  with open(path, "w") as f:
    f.write("\n".join(lines))


# ------------------------------------------------------------------------------ the demo


def run(s: Settings, log: Callable[[str], None] = print) -> dict[str, Any]:
  """The whole demo; returns {"points": [{step, scores}], "baselines", "timings", "model",
  "sweep"}."""
  s.validate()
  from jip2p import checkpoints
  from jip2p.edit import Editor
  from jip2p.train import exporting, models
  os.makedirs(s.out, exist_ok=True)
  timings: dict[str, float] = {}
  points: list[dict[str, Any]] = []
  losses: list[tuple[int, float]] = []
  outputs = None

  def evaluate(step: int, editor) -> None:
    nonlocal outputs
    start = time.time()
    outputs = edit_examples(editor, examples, s)
    points.append({"step": step, "scores": score(outputs, examples)})
    name = f"step {step}" if step >= 0 else "the model"
    timings[f"edit {s.num_eval} scenes ({name})"] = time.time() - start
    overall = points[-1]["scores"]["overall"]
    log(f"{name}: held-out success {overall['success']:.0%}, PSNR {overall['psnr']:.1f} dB")

  if s.pretrained is not None:
    if not os.path.isdir(s.pretrained):
      raise CheckpointError(f"no model folder at {s.pretrained}; run without --pretrained to "
                            "train one")
    editor = Editor.from_pretrained(s.pretrained)
    res = editor.pipeline.vae.config.sample_size
    examples = list(synthetic.generate(s.num_eval, seed=EVAL_SEED, size=res, split="heldout",
                                       families=s.families))
    evaluate(-1, editor)
    shipped = os.path.abspath(s.pretrained) == os.path.abspath(PRETRAINED)
    info = {"model": (f"the shipped model `{os.path.relpath(PRETRAINED, REPO)}`" if shipped else
                      f"the model `{s.pretrained}`")}
  else:
    from jip2p.train import config as config_lib
    config = config_lib.load(f"{s.config}:{s.config_arg}")
    res = config.data.res
    examples = list(synthetic.generate(s.num_eval, seed=EVAL_SEED, size=res, split="heldout",
                                       families=s.families))
    start = time.time()
    data_dir = os.path.join(s.out, "data")
    manifest = write_world(data_dir, n=s.num_train, size=res, families=s.families)
    timings["write dataset"] = time.time() - start
    log(f"wrote {manifest['splits']['train']['num_examples']} training triplets to {data_dir}")

    with config.unlocked():
      config.data.source, config.data.path = "tfrecord", data_dir
      if s.steps is not None:
        config.total_steps = s.steps
      if s.minutes is None:
        config.checkpoint.every_steps = max(1, config.total_steps // s.eval_points)
      config.checkpoint.keep = max(config.checkpoint.keep, s.eval_points + 1)
      config.export.at_end = ""
    workdir = os.path.join(s.out, "run")
    evaluate(0, Editor(models.build_pipeline(config)))
    start = time.time()
    result = train(config, workdir, minutes=s.minutes)
    timings["train"] = time.time() - start
    losses = read_losses(workdir)
    log(f"trained to step {result['step']} (loss {result['loss']})")

    from jip2p.train.checkpointing import Checkpointer
    saved = Checkpointer(workdir, read_only=True)
    steps = spread([t for t in saved.all_steps() if t > 0], s.eval_points)
    saved.close()
    model_dir = os.path.join(s.out, "model")
    for step in steps:
      exporting.export_from_workdir(workdir, model_dir, step=step, overwrite=True)
      editor = Editor(checkpoints.load_pipeline(model_dir))
      evaluate(step, editor)
    info = {"model": f"`configs/synthetic.py` trained {result['step']} steps (EMA weights, "
                     f"exported to `{model_dir}`)",
            "training examples": s.num_train,
            "trainer": f"batch {config.batch_size}, AdamW lr {config.optimizer.lr}, EMA "
                       f"{config.ema.decay}, conditioning dropout "
                       f"{config.conditioning_dropout}, {config.data.res} px"}

  sweep = []
  if s.sweep:
    start = time.time()
    sweep = guidance_sweep(editor, examples, s, log)
    timings["guidance sweep"] = time.time() - start
    plot_sweep(os.path.join(s.out, "sweep.png"), sweep)
  base = baselines(examples)
  results = [world_metrics.score(o, e) for o, e in zip(outputs, examples)]
  Image.fromarray(image_grid(examples, outputs, results)).save(os.path.join(s.out, "grid.png"))
  plot_metrics(os.path.join(s.out, "metrics.png"), losses, [p for p in points if p["step"] >= 0])
  write_report(os.path.join(s.out, "report.md"), s, points, base, timings, info, sweep)
  with open(os.path.join(s.out, "metrics.json"), "w") as f:
    json.dump({"points": points, "baselines": base, "timings": timings, "losses": losses,
               "sweep": sweep}, f, indent=1, default=float)
  log(f"report: {os.path.join(s.out, 'report.md')}")
  return {"points": points, "baselines": base, "timings": timings, "model": info["model"],
          "sweep": sweep}
