"""The evaluation runner: an editor over an evaluation set at guidance settings, scored, resumable.

    rows = evaluate(editor, sets.emu_edit_set("emu/"), [Setting(7.5, 1.5)], "out/",
                    config=RunConfig(steps=100), scorer=clip)        # clip: a started ClipScorer

Per edit it writes one JSON line to ``out/results.jsonl`` (the setting, the turn, the seed and
every applicable metric, NaN-free: a metric that does not apply is absent), a session's lines at
once, flushed. Rerun with the same arguments, it skips every (setting, session) already there and
goes on; `RunConfig` and the set must be those of the first run (``out/run.json``), settings may
be added (a sweep extended).

Seeds: the edits of a set are numbered in order (session by session, turn by turn), and edit f
uses ``config.seed + f`` at every setting, so results do not depend on batching, on resuming, or
on which settings run (the paper's sweep compares settings on the same noise).

SDEdit, the paper's baseline, runs beside the editor: settings with a ``strength`` are edited
by ``sdedit_editor`` (a text-to-image model) towards each turn's *edited caption*, with
guidance ``text_guidance``, on the same seeds, and scored the same way.

What is scored: the input is the image the model saw (the set's image resized by the editor's
rule; in a multi-turn session the previous output), the output is compared with it, with the
captions, with the target where the set has one (`jip2p.eval.paper_metrics` defines each
metric), and on the procedural world with its exact truth (`jip2p.eval.world_metrics`). CLIP and
DINO features come from ``scorer`` (`jip2p.sidecar.ClipScorer`, any of CLIP / DINO loaded); the
features of a set's images and captions are computed once for all settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from jip2p import edit, files
from jip2p.errors import ConfigError, InputError
from jip2p.eval import multiturn, paper_metrics, sets, world_metrics

RESULTS = "results.jsonl"
RUN_INFO = "run.json"
CLIP_METRICS = ("clip_img", "clip_dir", "clip_out", "clip_i", "clip_t")
DINO_METRICS = ("dino", "dino_gt")
# Column order of tables: IP2P / Emu Edit (vs the input), MagicBrush (vs the target), the world.
METRICS = ("clip_dir", "clip_img", "clip_out", "l1", "dino", "l1_gt", "l2_gt", "clip_i",
           "dino_gt", "clip_t", "world_success", "world_psnr")


@dataclasses.dataclass(frozen=True)
class Setting:
  """One guidance setting; ``series`` names the sweep it belongs to (a line of the plot). With a
  ``strength`` it is an SDEdit setting (`jip2p.edit.Editor`'s method "sdedit", guidance scale
  text_guidance; image_guidance is not used and is 0)."""
  text_guidance: float
  image_guidance: float
  series: str = ""
  strength: float | None = None

  @property
  def key(self) -> str:
    if self.strength is not None:
      return f"sdedit_strength{self.strength:g}_s{self.text_guidance:g}"
    return f"sT{self.text_guidance:g}_sI{self.image_guidance:g}"

  @property
  def label(self) -> str:
    if self.strength is not None:
      return f"SDEdit strength={self.strength:g}, s={self.text_guidance:g}"
    return f"s_T={self.text_guidance:g}, s_I={self.image_guidance:g}"


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything but the guidance that decides the edits and their scores."""
  steps: int = 100
  resolution: int | None = 512
  seed: int = 0
  batch_size: int = 1
  sampler: str = "euler_ancestral"
  schedule: str = "discrete"
  threshold: float | None = None  # Emu Edit's sequential-edit threshold (multi-turn sets)
  threshold_radius: int = 2

  def validate(self) -> None:
    for name, least in (("steps", 1), ("batch_size", 1), ("seed", 0), ("threshold_radius", 0)):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{name} must be an integer ≥ {least}, got {value!r}")
    if self.resolution is not None and (isinstance(self.resolution, bool) or not isinstance(
        self.resolution, int) or self.resolution < 1):
      raise ConfigError(f"resolution must be a positive integer (or None), got "
                        f"{self.resolution!r}")
    if self.threshold is not None and not 0 <= self.threshold <= 1:
      raise ConfigError(f"threshold must be in [0, 1], got {self.threshold}")


def evaluate(editor, eval_set: sets.EvalSet, settings: Sequence[Setting], out_dir: str, *,
             config: RunConfig = RunConfig(), scorer=None, save_images: bool = False,
             progress: bool = True, run_info: dict | None = None,
             sdedit_editor=None) -> list[dict[str, Any]]:
  """Runs what ``out_dir`` lacks; returns the rows of ``settings`` (all sessions), in order.

  editor: a `jip2p.edit.Editor` (or anything with its call signature and `size_multiple`, which
  ``config.resolution`` must be a multiple of, `edit.check_resolution`); scorer: a started
  `jip2p.sidecar.ClipScorer` or None (then only pixel and world metrics); run_info: JSON-able
  facts a resumed run must share (the model, the metric models), kept in run.json;
  sdedit_editor: the `jip2p.edit.Editor` of a text-to-image model that edits the settings with a
  strength (SDEdit), each turn's output caption as its prompt.
  """
  config.validate()
  sdedit = [s for s in settings if s.strength is not None]
  if sdedit and sdedit_editor is None:
    raise ConfigError(f"{len(sdedit)} SDEdit settings (with a strength) need an sdedit_editor: "
                      "a text-to-image model")
  if sdedit:
    check_sdedit_prompts(eval_set)
  for one in (editor, sdedit_editor if sdedit else None):
    if one is not None and config.resolution is not None:
      edit.check_resolution(config.resolution, one.size_multiple)
  if not settings:
    raise ConfigError("no guidance settings to evaluate")
  if len({s.key for s in settings}) != len(settings):
    raise ConfigError(f"repeated guidance settings: {[s.label for s in settings]}")
  files.check_output_dir(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  check_run_info(out_dir, eval_set, config, run_info or {})
  path = os.path.join(out_dir, RESULTS)
  rows = _complete_sessions(path, eval_set)
  done = {(r["setting"], r["session"]) for r in rows}
  offsets = np.cumsum([0] + [len(s.turns) for s in eval_set.sessions])
  features = _Features(scorer)
  todo = [(setting, i) for setting in settings for i, s in enumerate(eval_set.sessions)
          if (setting.key, s.key) not in done]
  total = len(settings) * eval_set.num_turns
  remaining = sum(len(eval_set.sessions[i].turns) for _, i in todo)
  with open(path, "a", encoding="utf-8") as results, tqdm(
      total=total, initial=total - remaining, unit="edit", desc=f"eval {eval_set.name}",
      file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
    for setting, chunk in _batches(todo, 1 if eval_set.multi_turn else config.batch_size):
      sessions = [eval_set.sessions[i] for i in chunk]
      who = editor if setting.strength is None else sdedit_editor
      if eval_set.multi_turn:
        new = _run_session(who, sessions[0], int(offsets[chunk[0]]), setting, config,
                           features)
      else:
        new = _run_single(who, sessions, int(offsets[chunk[0]]), setting, config, features)
      if save_images:
        _save_images(out_dir, setting, new)
      lines = "".join(json.dumps(row) + "\n" for row, _ in new)
      results.write(lines)
      results.flush()
      rows += [row for row, _ in new]
      bar.update(len(new))
  keys = {s.key for s in settings}
  order = {s.key: i for i, s in enumerate(settings)}
  position = {s.key: i for i, s in enumerate(eval_set.sessions)}
  chosen = [r for r in rows if r["setting"] in keys and r["session"] in position]
  return sorted(chosen, key=lambda r: (order[r["setting"]], position[r["session"]], r["turn"]))


def check_sdedit_prompts(eval_set: sets.EvalSet) -> None:
  """SDEdit edits towards each turn's output caption: `ConfigError` when the set lacks one."""
  uncaptioned = [t.key for s in eval_set.sessions for t in s.turns if not t.output_caption]
  if uncaptioned:
    raise ConfigError(f"SDEdit edits towards each edit's output caption, and the set "
                      f"{eval_set.name} has none for {len(uncaptioned)} of its edits (first: "
                      f"{uncaptioned[0]})")


def _batches(todo, batch_size: int):
  """(setting, [session indices]): runs of consecutive sessions, so that seeds stay consecutive."""
  chunk, current = [], None
  for setting, i in todo:
    if chunk and (setting != current or i != chunk[-1] + 1 or len(chunk) == batch_size):
      yield current, chunk
      chunk = []
    current = setting
    chunk.append(i)
  if chunk:
    yield current, chunk


def _edit_kwargs(setting: Setting, config: RunConfig) -> dict:
  kwargs = {"steps": config.steps, "text_guidance": setting.text_guidance,
            "image_guidance": setting.image_guidance, "resolution": None,
            "sampler": config.sampler, "schedule": config.schedule}
  if setting.strength is not None:
    kwargs.update(method="sdedit", strength=setting.strength)
  return kwargs


def _prompt(turn: sets.Turn, setting: Setting) -> str:
  """What the editor is given: the instruction, or SDEdit's edited caption."""
  return turn.instruction if setting.strength is None else turn.output_caption


def _model_input(image: np.ndarray, config: RunConfig, name: str, multiple: int) -> np.ndarray:
  """The image the editor sees: resized by its rule (uint8 [H, W, 3], sides multiples of the
  editor's `size_multiple`)."""
  prepared = edit.prepare_image(image, name)
  if config.resolution is not None:
    prepared = edit.preprocess(prepared, config.resolution, name, multiple)
  elif prepared.size[0] % multiple or prepared.size[1] % multiple:
    raise InputError(f"{name}: with resolution None the image size must be multiples of "
                     f"{multiple}, got {prepared.size[0]}×{prepared.size[1]}")
  return np.asarray(prepared)


def _run_single(editor, sessions, first_index: int, setting: Setting, config: RunConfig,
                features: _Features):
  turns = [s.turns[0] for s in sessions]
  inputs = [_model_input(t.load_image(), config, t.key, editor.size_multiple) for t in turns]
  outputs = editor(inputs, [_prompt(t, setting) for t in turns], seed=config.seed + first_index,
                   batch_size=config.batch_size, **_edit_kwargs(setting, config))
  outputs = [np.asarray(o, np.uint8) for o in outputs]
  scores = _score(turns, inputs, outputs, features, cache_inputs=True)
  return [(_row(s, t, 0, config.seed + first_index + j, setting, score), out)
          for j, (s, t, score, out) in enumerate(zip(sessions, turns, scores, outputs))]


def _run_session(editor, session: sets.Session, first_index: int, setting: Setting,
                 config: RunConfig, features: _Features):
  current = _model_input(session.turns[0].load_image(), config, session.turns[0].key,
                         editor.size_multiple)
  inputs, outputs = [], []
  for t, turn in enumerate(session.turns):
    [out] = editor([current], [_prompt(turn, setting)], seed=config.seed + first_index + t,
                   batch_size=1, **_edit_kwargs(setting, config))
    out = np.asarray(out, np.uint8)
    if config.threshold is not None:
      out = multiturn.threshold_edit(current, out, config.threshold, config.threshold_radius)
    inputs.append(current)
    outputs.append(out)
    current = out
  # Only the first input is the same at every setting; later ones are this setting's outputs.
  scores = _score(list(session.turns), inputs, outputs, features, cache_inputs=False)
  return [(_row(session, turn, t, config.seed + first_index + t, setting, score), out)
          for t, (turn, score, out) in enumerate(zip(session.turns, scores, outputs))]


def _row(session, turn: sets.Turn, t: int, seed: int, setting: Setting, score: dict) -> dict:
  row = {"setting": setting.key, "text_guidance": setting.text_guidance,
         "image_guidance": setting.image_guidance, "series": setting.series,
         "session": session.key, "turn": t, "key": turn.key, "group": turn.group,
         "instruction": turn.instruction, "seed": seed}
  if setting.strength is not None:
    row["strength"] = setting.strength
  row.update({k: v for k, v in score.items() if v is not None and np.isfinite(v)})
  return row


def _save_images(out_dir: str, setting: Setting, new) -> None:
  folder = os.path.join(out_dir, "images", setting.key)
  os.makedirs(folder, exist_ok=True)
  for row, image in new:
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in row["key"])
    files.save_png(image, os.path.join(folder, f"{name}.png"))


# ------------------------------------------------------------------------------ scoring


class _Features:
  """CLIP / DINO features through the scorer; a set's own images and captions are cached."""

  def __init__(self, scorer):
    info = getattr(scorer, "info", None) or {}
    self.scorer = scorer
    self.clip = scorer is not None and info.get("model") is not None
    self.dino = scorer is not None and info.get("dino") is not None
    self._cache: dict[tuple, np.ndarray] = {}

  def images(self, kind: str, images: list[np.ndarray], keys: list | None = None) -> np.ndarray:
    """kind "clip" or "dino" features [N, D] of uint8 images (any sizes: sent per shape)."""
    encode = self.scorer.encode_images if kind == "clip" else self.scorer.encode_dino
    return self._cached(kind, images, keys, lambda batch: encode(np.stack(batch)),
                        shape=lambda im: im.shape)

  def texts(self, texts: list[str]) -> np.ndarray:
    return self._cached("text", texts, texts, lambda batch: self.scorer.encode_texts(batch),
                        shape=lambda _: ())

  def _cached(self, kind, items, keys, encode, shape) -> np.ndarray:
    keys = keys if keys is not None else [None] * len(items)
    out: list[np.ndarray | None] = [self._cache.get((kind, k)) if k is not None else None
                                    for k in keys]
    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(items):
      if out[i] is None:
        groups.setdefault(shape(item), []).append(i)
    for indices in groups.values():
      for i, f in zip(indices, encode([items[i] for i in indices])):
        out[i] = f
        if keys[i] is not None:
          self._cache[(kind, keys[i])] = f
    return np.stack(out)


def _score(turns: list[sets.Turn], inputs: list[np.ndarray], outputs: list[np.ndarray],
           features: _Features, *, cache_inputs: bool) -> list[dict[str, float]]:
  """Every applicable metric of each edit (see `METRICS`)."""
  n = len(turns)
  targets = [t.load_target() for t in turns]
  scores = [{"l1": paper_metrics.l1_distance(o, i)} for o, i in zip(outputs, inputs)]
  with_target = [j for j in range(n) if targets[j] is not None]
  for j in with_target:
    scores[j]["l1_gt"] = paper_metrics.l1_distance(outputs[j], targets[j])
    scores[j]["l2_gt"] = paper_metrics.l2_distance(outputs[j], targets[j])
  for j, turn in enumerate(turns):
    if turn.example is not None:
      output = paper_metrics.resize_like(outputs[j], turn.example.input_image)
      world = world_metrics.score(output, turn.example)
      scores[j]["world_success"] = float(world["success"])
      scores[j]["world_psnr"] = world["psnr"]
  input_keys = [("input", t.key) for t in turns] if cache_inputs else None
  target_keys = [("target", turns[j].key) for j in with_target]
  for kind in ("clip", "dino"):
    if not (features.clip if kind == "clip" else features.dino):
      continue
    f_in = features.images(kind, inputs, input_keys)
    f_out = features.images(kind, outputs)
    name_in, name_gt = ("clip_img", "clip_i") if kind == "clip" else ("dino", "dino_gt")
    for j, value in enumerate(paper_metrics.cosine(f_in, f_out)):
      scores[j][name_in] = float(value)
    if with_target:
      f_gt = features.images(kind, [targets[j] for j in with_target], target_keys)
      similarity = paper_metrics.cosine(f_gt, f_out[with_target])
      for j, value in zip(with_target, similarity):
        scores[j][name_gt] = float(value)
    if kind == "clip":
      _score_captions(turns, f_in, f_out, with_target, scores, features)
  return scores


def _score_captions(turns, f_in, f_out, with_target, scores, features: _Features) -> None:
  has_out = [j for j, t in enumerate(turns) if t.output_caption]
  if not has_out:
    return
  t_out = features.texts([turns[j].output_caption for j in has_out])
  for j, value in zip(has_out, paper_metrics.clip_text_similarity(f_out[has_out], t_out)):
    scores[j]["clip_out"] = float(value)
    if j in with_target:
      scores[j]["clip_t"] = float(value)
  both = [k for k, j in enumerate(has_out) if turns[j].input_caption]
  if both:
    rows = [has_out[k] for k in both]
    t_in = features.texts([turns[j].input_caption for j in rows])
    direction = paper_metrics.clip_directional_similarity(f_in[rows], f_out[rows], t_in,
                                                          t_out[both])
    for j, value in zip(rows, direction):
      scores[j]["clip_dir"] = float(value)


# ------------------------------------------------------------------------------ files


def check_run_info(out_dir: str, eval_set: sets.EvalSet, config: RunConfig, extra: dict, *,
                   write: bool = True) -> None:
  """Checks that a resumed run matches run.json (the batch size may change: it does not change
  the edits), `ConfigError` naming what differs; writes run.json for a new run if ``write``."""
  info = {"set": eval_set.name, "sessions": len(eval_set.sessions),
          "turns": eval_set.num_turns, "multi_turn": eval_set.multi_turn, **extra,
          **{k: v for k, v in dataclasses.asdict(config).items() if k != "batch_size"}}
  path = os.path.join(out_dir, RUN_INFO)
  if os.path.exists(path):
    text = files.read_text(path, "run record")
    try:
      previous = json.loads(text)
    except ValueError as e:
      raise InputError(f"{path} is damaged ({e}); it names the settings of the run whose "
                       "results are in that folder: choose another output folder") from None
    if not isinstance(previous, dict):
      raise InputError(f"{path} holds no run record (a JSON object); choose another output "
                       "folder")
    diff = sorted(k for k in set(info) | set(previous) if info.get(k) != previous.get(k))
    if diff:
      changes = ", ".join(f"{k} {previous.get(k)!r} there, {info.get(k)!r} now" for k in diff)
      raise ConfigError(f"{out_dir} holds results of another run ({changes}); rerun with its "
                        "arguments to resume, or choose another output folder")
    return
  if os.path.exists(os.path.join(out_dir, RESULTS)):  # run.json is written before any result
    raise InputError(f"{out_dir} holds {RESULTS} but no {RUN_INFO}: results of another tool or "
                     "run; choose another output folder")
  if write:
    with files.replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
      json.dump(info, f, indent=2)


def _complete_sessions(path: str, eval_set: sets.EvalSet) -> list[dict]:
  """The stored rows of sessions with every turn stored; the file is rewritten without the rest
  (a session interrupted mid-write), so that appending continues cleanly."""
  rows, clean = _read_rows(path)
  expected = {s.key: len(s.turns) for s in eval_set.sessions}
  counts: dict[tuple[str, str], int] = {}
  for r in rows:
    counts[r["setting"], r["session"]] = counts.get((r["setting"], r["session"]), 0) + 1
  kept = [r for r in rows if counts[r["setting"], r["session"]] == expected.get(r["session"])]
  if len(kept) != len(rows) or not clean:
    with files.replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
  return kept


def _read_rows(path: str) -> tuple[list[dict], bool]:
  """The rows of a results file up to a line cut short by a crash; and whether all were read."""
  if not os.path.exists(path):
    return [], True
  rows = []
  with open(path, "rb") as f:
    for number, line in enumerate(f, 1):
      try:
        row = json.loads(line)
      except ValueError:
        return rows, False
      if not line.endswith(b"\n"):
        return rows, False
      if not isinstance(row, dict) or not {"setting", "session"} <= set(row):
        raise InputError(f"{path}, line {number}: not a result row of jip2p-eval; choose "
                         "another output folder")
      rows.append(row)
  return rows, True
