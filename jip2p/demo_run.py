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
              ``metrics.json``, and `jip2p.demo_report`'s ``report.md``, ``grid.png`` (input |
              instruction | output | ground truth) and ``metrics.png`` (loss and held-out
              success over the training steps).

``base=DIR`` fine-tunes a world text-to-image model (`configs/synthetic_t2i.py`'s export) instead
of training from scratch, as the paper does; ``generate`` (with a base) replaces stage 1 by the
paper's stage 2 on the world: world prompts (`jip2p.p2p.world`) → ``jip2p-generate`` with the base
(every candidate kept) → ``jip2p-clip-filter`` with the world CLIP at `FILTER_THRESHOLDS`, the
training data being what the filter kept; the generated pairs are scored exactly (exact / drawn /
edited, the filter's precision and recall) into the report and ``pairs.png``.

``pretrained=DIR`` skips 1–2 and edits with that model folder (`PRETRAINED`: the one shipped in
``data/``; any exported world model works); ``sweep`` edits again at every (s_T, s_I) of
`jip2p.eval.sweep`'s "grid" over `SWEEP_TEXT` × `SWEEP_IMAGE`. This process imports TensorFlow
(the reader and writer), so it must never import PyTorch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jip2p import demo_report, files, storage
from jip2p.data import synthetic
from jip2p.errors import CheckpointError, ConfigError
from jip2p.eval import world_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "synthetic.py")
PRETRAINED = os.path.join(REPO, "data", "synthetic-ip2p")
GENERATE_CONFIG = os.path.join(REPO, "configs", "generate_world.py")
WORLD_CLIP = os.path.join(REPO, "data", "world-clip", "world-clip")  # + .json / .safetensors
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
  base: str | None = None  # a world text-to-image model to fine-tune from (config ``init``)
  generate: bool = False  # train on pairs generated from ``base`` and CLIP-filtered
  num_prompts: int = 256  # world prompts generated from (with ``generate``)
  candidates: int = 4  # candidate pairs per prompt
  generation_steps: int = 20  # sampler steps per generated image

  def validate(self) -> None:
    for key in ("num_train", "num_eval", "eval_points", "eval_steps", "batch_size",
                "num_prompts", "candidates", "generation_steps"):
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
    if self.pretrained is not None and not os.path.isdir(self.pretrained):
      raise CheckpointError(f"no model folder at {self.pretrained}; run without --pretrained to "
                            "train one")
    if self.pretrained is not None and (self.base or self.generate):
      raise ConfigError("demo: --pretrained edits with a finished model; --base and --generate "
                        "train one")
    if self.generate and self.base is None:
      raise ConfigError("demo: --generate makes its pairs with a text-to-image model: give it "
                        "with --base DIR")
    if self.base is not None and not os.path.isfile(os.path.join(self.base, "model_index.json")):
      raise CheckpointError(f"--base {self.base}: not a diffusers-format model folder (no "
                            "model_index.json); export one with jip2p-export")
    files.require_local(self.out, "--out")
    storage.check_writable(self.out, "the output folder")


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


# ------------------------------------------------------------------------------ generated pairs

# The world CLIP filter's thresholds (`jip2p-clip-filter` flags). Off (-1: every candidate is
# kept) until a base model draws exact pairs to choose them on (`python -m jip2p.p2p.world
# thresholds`); the base models trained so far draw none (bench/RESULTS.md).
FILTER_THRESHOLDS = {"min_sim_image": -1.0, "min_sim_direction": -1.0, "min_sim_0": -1.0,
                     "min_sim_1": -1.0}


def run_tool(module: str, args: Sequence[str]) -> None:
  """Runs ``python -m module args`` (a jip2p console script) with its output on ours; a failure
  raises `ConfigError` naming the tool (its own error line is already printed above)."""
  done = subprocess.run([sys.executable, "-m", module, *args])
  if done.returncode:
    raise ConfigError(f"demo: {module.rsplit('.', 1)[-1].replace('_', '-')} failed (exit status "
                      f"{done.returncode}; its message is above)")


def generate_pairs(s: Settings, size: int, timings: dict[str, float],
                   log: Callable[[str], None]) -> tuple[str, dict[str, Any]]:
  """The paper's stage 2 in the world, each step by its own console script: prompts of the
  training seed → pairs from ``s.base`` → the CLIP filter. Returns (the filtered dataset, the
  pairs' exact scores: `jip2p.p2p.world.summarize` with the filter's). A rerun resumes."""
  from jip2p.p2p import world
  start = time.time()
  prompts = os.path.join(s.out, "prompts.jsonl")
  rows = world.prompt_rows(s.num_prompts, seed=TRAIN_SEED)
  with files.replacing(prompts) as tmp, open(tmp, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  pairs, kept = os.path.join(s.out, "pairs"), os.path.join(s.out, "pairs-kept")
  run_tool("jip2p.cli.generate", [
      "--config", f"{GENERATE_CONFIG}:model={s.base},candidates={s.candidates},"
      f"steps={s.generation_steps},res={size}", "--prompts", prompts, "--out", pairs])
  run_tool("jip2p.cli.clip_filter", [
      pairs, "--out", kept, "--clip-weights", WORLD_CLIP + ".safetensors", "--clip-config",
      WORLD_CLIP + ".json", "--device", "cpu",
      *[a for k, v in FILTER_THRESHOLDS.items() for a in (f"--{k.replace('_', '-')}", str(v))]])
  timings["generate and filter pairs"] = time.time() - start
  results = world.score_dataset(pairs, world.read_world_prompts(prompts))
  mask = world.kept_mask(results, kept)
  files.save_png(world.pair_grid(pairs, results, mask), os.path.join(s.out, "pairs.png"))
  summary = world.summarize(results, mask)
  log(f"generated {summary['pairs']} pairs from {summary['prompts']} prompts: "
      f"{summary['exact']:.0%} exact; the filter kept {summary['filter']['kept']} "
      f"(precision {demo_report.percent(summary['filter']['precision'])}, recall "
      f"{demo_report.percent(summary['filter']['recall'])})")
  return kept, summary


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


def baselines(examples: Sequence[synthetic.Example]) -> dict[str, dict]:
  """Scores that need no model: the unedited input ("copy") and uniform noise ("noise")."""
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (len(examples),) + examples[0].input_image.shape, dtype=np.uint8)
  return {"copy": score(np.stack([e.input_image for e in examples]), examples),
          "noise": score(noise, examples)}


class HeldOut:
  """The held-out scenes (dataset `EVAL_SEED`, held-out wording) and what each model made of
  them: ``points`` (the scores of every model evaluated), and the last model's ``editor`` and
  ``outputs`` (for the sweep and the grid)."""

  def __init__(self, s: Settings, size: int, timings: dict[str, float],
               log: Callable[[str], None]):
    self.examples = list(synthetic.generate(s.num_eval, seed=EVAL_SEED, size=size,
                                            split="heldout", families=s.families))
    self.points: list[dict[str, Any]] = []
    self.editor = self.outputs = None
    self._settings, self._timings, self._log = s, timings, log

  def evaluate(self, step: int, editor) -> None:
    """Edits the scenes with ``editor``, the model at training ``step`` (-1: a given model)."""
    start = time.time()
    self.editor, self.outputs = editor, edit_examples(editor, self.examples, self._settings)
    self.points.append({"step": step, "scores": score(self.outputs, self.examples)})
    name = f"step {step}" if step >= 0 else "the model"
    self._timings[f"edit {self._settings.num_eval} scenes ({name})"] = time.time() - start
    overall = self.points[-1]["scores"]["overall"]
    self._log(f"{name}: held-out success {overall['success']:.0%}, PSNR "
              f"{overall['psnr']:.1f} dB")


SWEEP_TEXT = (1.0, 3.0, 7.5)
SWEEP_IMAGE = (1.0, 1.5, 2.0)


def guidance_sweep(editor, examples: Sequence[synthetic.Example], s: Settings,
                   log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Scores of the held-out edits at every (s_T, s_I) of `SWEEP_TEXT` × `SWEEP_IMAGE`."""
  from jip2p.eval import sweep as sweep_lib
  rows = []
  for setting in sweep_lib.settings("grid", text_values=SWEEP_TEXT, image_values=SWEEP_IMAGE):
    text, image = setting.text_guidance, setting.image_guidance
    outputs = edit_examples(editor, examples, dataclasses.replace(
        s, text_guidance=text, image_guidance=image))
    rows.append({"text_guidance": text, "image_guidance": image,
                 "scores": score(outputs, examples)})
    o = rows[-1]["scores"]["overall"]
    log(f"sweep s_T={text:g} s_I={image:g}: success {o['success']:.0%}, instruction followed "
        f"{o['edit_ok']:.0%}, rest of the scene kept {o['rest_ok']:.0%}, PSNR to the input "
        f"{o['input_psnr']:.1f} dB")
  return rows


# ------------------------------------------------------------------------------ the demo


def edit_pretrained(s: Settings, timings: dict[str, float],
                    log: Callable[[str], None]) -> tuple[HeldOut, dict[str, Any]]:
  """Stage 3 with the model folder ``s.pretrained``: (the held-out edits, facts for the report)."""
  from jip2p.edit import Editor
  editor = Editor.from_pretrained(s.pretrained)
  editor.check_method("ip2p")  # an InstructPix2Pix model, before any work
  held_out = HeldOut(s, editor.pipeline.vae.config.sample_size, timings, log)
  held_out.evaluate(-1, editor)
  shipped = os.path.abspath(s.pretrained) == os.path.abspath(PRETRAINED)
  return held_out, {"model": (f"the shipped model `{os.path.relpath(PRETRAINED, REPO)}`"
                              if shipped else f"the model `{s.pretrained}`")}


def train_and_edit(s: Settings, timings: dict[str, float], log: Callable[[str], None]
                   ) -> tuple[HeldOut, dict[str, Any], list[tuple[int, float]]]:
  """Stages 1–3: writes the data (or generates and filters it), trains, edits with the untrained
  model and with checkpoints along the run. Returns (the held-out edits, facts for the report,
  the logged losses)."""
  from jip2p import checkpoints
  from jip2p.edit import Editor
  from jip2p.train import config as config_lib
  from jip2p.train import exporting, models
  from jip2p.train.checkpointing import Checkpointer
  config = config_lib.load(f"{s.config}:{s.config_arg}")
  held_out = HeldOut(s, config.data.res, timings, log)
  info: dict[str, Any] = {}
  if s.generate:
    data_dir, info["pairs"] = generate_pairs(s, config.data.res, timings, log)
  else:
    start = time.time()
    data_dir = os.path.join(s.out, "data")
    manifest = write_world(data_dir, n=s.num_train, size=config.data.res, families=s.families)
    timings["write dataset"] = time.time() - start
    log(f"wrote {manifest['splits']['train']['num_examples']} training triplets to {data_dir}")

  with config.unlocked():
    config.data.source, config.data.path = "tfrecord", data_dir
    if s.base is not None:
      config.model.init = s.base
    if s.steps is not None:
      config.total_steps = s.steps
    if s.minutes is None:
      config.checkpoint.every_steps = max(1, config.total_steps // s.eval_points)
    config.checkpoint.keep = max(config.checkpoint.keep, s.eval_points + 1)
    config.export.at_end = ""
  workdir = os.path.join(s.out, "run")
  held_out.evaluate(0, Editor(models.build_pipeline(config)))
  start = time.time()
  result = train(config, workdir, minutes=s.minutes)
  timings["train"] = time.time() - start
  log(f"trained to step {result['step']} (loss {result['loss']})")

  saved = Checkpointer(workdir, read_only=True)
  steps = spread([t for t in saved.all_steps() if t > 0], s.eval_points)
  saved.close()
  model_dir = os.path.join(s.out, "model")
  for step in steps:
    exporting.export_from_workdir(workdir, model_dir, step=step, overwrite=True)
    held_out.evaluate(step, Editor(checkpoints.load_pipeline(model_dir)))
  start_from = f"fine-tuned from `{s.base}`" if s.base else "trained from scratch"
  info = {"model": f"`configs/synthetic.py` {start_from} for {result['step']} steps (EMA "
                   f"weights, exported to `{model_dir}`)",
          "training examples": (f"the CLIP-filtered generated pairs ({data_dir})" if s.generate
                                else s.num_train),
          **info,
          "trainer": f"batch {config.batch_size}, AdamW lr {config.optimizer.lr}, EMA "
                     f"{config.ema.decay}, conditioning dropout "
                     f"{config.conditioning_dropout}, {config.data.res} px"}
  return held_out, info, read_losses(workdir)


def run_demo(s: Settings, log: Callable[[str], None] = print) -> dict[str, Any]:
  """The whole demo into ``s.out``; returns what ``metrics.json`` holds ({"points",
  "baselines", "timings", "losses", "sweep", "pairs"}) and "model" (the report's description of
  it)."""
  s.validate()
  os.makedirs(s.out, exist_ok=True)
  timings: dict[str, float] = {}
  if s.pretrained is not None:
    held_out, info = edit_pretrained(s, timings, log)
    losses = []
  else:
    held_out, info, losses = train_and_edit(s, timings, log)
  sweep = []
  if s.sweep:
    start = time.time()
    sweep = guidance_sweep(held_out.editor, held_out.examples, s, log)
    timings["guidance sweep"] = time.time() - start
  metrics = {"points": held_out.points, "baselines": baselines(held_out.examples),
             "timings": timings, "losses": losses, "sweep": sweep,
             "pairs": info.pop("pairs", None)}
  path = demo_report.write(s.out, s, metrics, info, held_out.examples, held_out.outputs,
                           eval_seed=EVAL_SEED)
  with files.replacing(os.path.join(s.out, "metrics.json")) as tmp, open(tmp, "w") as f:
    json.dump(metrics, f, indent=1, default=float)
  log(f"report: {path}")
  return {**metrics, "model": info["model"]}
