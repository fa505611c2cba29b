"""The resumable generation driver behind ``jip2p-generate`` (docs/design.md §1, stages 2–3).

prompts JSONL → candidates (N per prompt, many prompts per device batch) → CLIP sidecar scores →
filter → `DatasetWriter` triplets, plus one JSON line of every candidate's scores per prompt in
``candidates.jsonl`` beside the shards (with the prompt's Prompt-to-Prompt options in p2p mode),
so thresholds can be changed later without generating.

Determinism and resuming: a prompt's candidate seeds depend only on (config seed, prompt line
number); a candidate's images only on its seed (`sampling.PairGenerator`). Prompts are written in
file order, and each record carries the cursor ``{"prompt": line, "written": j, "of": kept}``.
After a crash the writer keeps complete shards only; the run restarts at the prompt of the last
committed cursor (skipping the records of it already stored, or the whole prompt when all were),
and ``candidates.jsonl`` is cut back to the prompts before it. The result is exactly the records
of an uninterrupted run, none twice.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from jip2p.data import schema
from jip2p.data import writer as writer_lib
from jip2p.errors import ConfigError, InputError
from jip2p.p2p import filter as filter_lib
from jip2p.p2p import sampling
from jip2p.p2p.generation_config import GenerationConfig
from jip2p.sidecar.protocol import SCORE_KEYS

SCORES_FILE = "candidates.jsonl"
SOURCE = "jip2p-generate"


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One usable line of the prompts file; ``index`` is its 0-based line number; ``p2p`` its
  Prompt-to-Prompt options (the config's, updated by the line's ``"p2p"`` object), None in
  ip2p mode."""

  index: int
  input: str
  edit: str
  output: str
  p2p: sampling.P2POptions | None = None


@dataclasses.dataclass
class PromptReport:
  """What `read_prompts` skipped (reason → 1-based line numbers, with the error of lines whose
  reason has one) and truncated."""

  lines: int = 0
  skipped: dict[str, list[int]] = dataclasses.field(
      default_factory=lambda: collections.defaultdict(list))
  errors: dict[int, str] = dataclasses.field(default_factory=dict)
  truncated: list[int] = dataclasses.field(default_factory=list)

  def skip(self, reason: str, line: int, error: Exception | None = None) -> None:
    self.skipped[reason].append(line)
    if error is not None:
      self.errors[line] = str(error)

  def summary(self) -> str:
    parts = [f"{self.lines} lines"]
    for reason, lines in sorted(self.skipped.items()):
      first = next((f"; line {n}: {self.errors[n]}" for n in lines if n in self.errors), "")
      parts.append(f"skipped {len(lines)} ({reason}: lines {_few(lines)}{first})")
    if self.truncated:
      parts.append(f"truncated {len(self.truncated)} captions to 77 tokens (lines "
                   f"{_few(self.truncated)})")
    return ", ".join(parts)


def _few(lines: Sequence[int], n: int = 10) -> str:
  return ", ".join(map(str, lines[:n])) + (", …" if len(lines) > n else "")


def read_prompts(lines: Iterable[str], tokenizer=None, p2p: sampling.P2POptions | None = None
                 ) -> tuple[list[Prompt], PromptReport]:
  """Parses prompts JSONL (keys ``input`` or ``caption``, ``edit``, ``output``, optional ``p2p``).

  Malformed lines, missing keys and empty captions/instructions are skipped and counted with
  their line number; captions longer than the tokenizer's context are counted (the text encoder
  sees their first 77 tokens). Blank lines are ignored.

  p2p: the config's Prompt-to-Prompt options in p2p mode (None in ip2p mode). A line's ``"p2p"``
  object (keys of `sampling.P2POptions`; lists for pairs) replaces some of them for that prompt.
  Skipped and counted: a bad ``"p2p"`` object (unknown key, bad value), one in ip2p mode, and,
  given a tokenizer, options that do not fit the captions (a word swap of captions with different
  word counts, reweighted or blend words that do not occur).
  """
  prompts, report = [], PromptReport()
  limit = tokenizer.max_length - 2 if tokenizer is not None else None
  for index, line in enumerate(lines):
    report.lines += 1
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError:
      report.skip("malformed JSON", index + 1)
      continue
    if not isinstance(row, dict):
      report.skip("not a JSON object", index + 1)
      continue
    row = dict(row)
    if "input" not in row and "caption" in row:
      row["input"] = row["caption"]  # the original generator's key
    missing = [k for k in ("input", "edit", "output") if k not in row]
    if missing:
      report.skip(f"missing {'/'.join(missing)}", index + 1)
      continue
    if not all(isinstance(row[k], str) and row[k].strip() for k in ("input", "edit", "output")):
      report.skip("empty caption or edit", index + 1)
      continue
    prompt = Prompt(index, row["input"].strip(), row["edit"].strip(), row["output"].strip(), p2p)
    if "p2p" in row:
      if p2p is None:
        report.skip("p2p options outside p2p mode", index + 1)
        continue
      try:
        prompt = dataclasses.replace(prompt, p2p=sampling.p2p_options(row["p2p"], p2p))
      except ConfigError as e:
        report.skip("bad p2p object", index + 1, e)
        continue
    if prompt.p2p is not None and tokenizer is not None:
      try:
        sampling.check_p2p(tokenizer, (prompt.input, prompt.output), prompt.p2p)
      except (ConfigError, InputError) as e:
        report.skip("p2p options do not fit the captions", index + 1, e)
        continue
    if limit is not None and any(len(tokenizer.encode(row[k])) > limit
                                 for k in ("input", "output")):
      report.truncated.append(index + 1)
    prompts.append(prompt)
  return prompts, report


def partition(prompts: Sequence[Prompt], index: int, count: int) -> list[Prompt]:
  """The prompts of partition ``index`` of ``count``: line numbers ≡ index (mod count)."""
  if not (isinstance(count, int) and count >= 1 and isinstance(index, int)
          and 0 <= index < count):
    raise ConfigError(f"partition {index} of {count}: need 0 ≤ partition < num_partitions")
  return [p for p in prompts if p.index % count == index]


def prompt_seeds(base_seed: int, prompt_index: int, n: int) -> np.ndarray:
  """uint32 [n]: the candidate seeds of one prompt, a function of (base seed, line number)."""
  return np.random.SeedSequence([base_seed, prompt_index]).generate_state(n, np.uint32)


@dataclasses.dataclass
class RunReport:
  prompts: int = 0
  candidates: int = 0
  passed: int = 0
  written: int = 0
  resumed_after: int | None = None


def resume_point(cursor) -> tuple[int, int]:
  """(first prompt line to generate, records of it already stored) from a writer cursor."""
  if cursor is None:
    return -1, 0
  if not isinstance(cursor, dict) or not {"prompt", "written", "of"} <= set(cursor):
    raise InputError(f"the dataset's cursor {cursor!r} was not written by {SOURCE}")
  if cursor["written"] >= cursor["of"]:
    return cursor["prompt"] + 1, 0
  return cursor["prompt"], cursor["written"]


def check_resumable(directory: str, key: str = "generator", producer: str = SOURCE) -> None:
  """Before any work: a dataset already at ``directory`` must be one that ``producer`` wrote (its
  manifest's ``metadata[key]``), to be resumed. Read without opening a `DatasetWriter`, which
  would mark another tool's dataset incomplete; `InputError` naming the folder otherwise."""
  if not _tf().io.gfile.exists(f"{directory.rstrip('/')}/{writer_lib.MANIFEST}"):
    return
  metadata = writer_lib.read_manifest(directory).get("metadata") or {}
  if metadata.get(key) != producer:
    raise InputError(f"{directory} holds a dataset that {producer} did not write; choose another "
                     "output folder")


def reopen_scores(path: str, first: int, key: str):
  """The scores JSONL at ``path`` open for appending, holding only the lines of an earlier run
  whose ``key`` is below ``first`` (a resumed run writes the rest again; a torn or foreign line
  is dropped). The kept lines are written under a temporary name and renamed over the file, so
  a crash in between loses none of them."""
  tf = _tf()
  kept = []
  if first >= 0 and tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path, "r") as f:
      for line in f.read().splitlines():
        try:
          row = json.loads(line)
        except ValueError:
          continue
        if isinstance(row, dict) and isinstance(row.get(key), int) and row[key] < first:
          kept.append(line)
  with tf.io.gfile.GFile(path + ".incomplete", "w") as f:
    f.write("".join(line + "\n" for line in kept))
  tf.io.gfile.rename(path + ".incomplete", path, overwrite=True)
  return tf.io.gfile.GFile(path, "a")


def generate_dataset(generator, scorer, prompts: Sequence[Prompt], writer,
                     config: GenerationConfig, *,
                     progress: Callable[[RunReport], None] | None = None) -> RunReport:
  """Generates, scores, filters and writes `prompts`, resuming what `writer` already holds.

  generator: a `sampling.PairGenerator`; scorer: a started `jip2p.sidecar.ClipScorer`;
  writer: an open `DatasetWriter` (its directory also gets ``candidates.jsonl``).
  """
  report = RunReport()
  first, skip_records = resume_point(writer.cursor(config.split))
  todo = [p for p in prompts if p.index >= first]
  if first >= 0:
    report.resumed_after = first
  scores_file = reopen_scores(f"{writer.directory}/{SCORES_FILE}", first, "prompt_index")
  try:
    state = _Run(generator, scorer, writer, scores_file, config, report, progress)
    state.skip_records = {todo[0].index: skip_records} if todo else {}
    state.go(todo)
  finally:
    scores_file.close()
  return report


class _Run:
  """The generation loop's state: candidates in flight, per prompt, until written in order."""

  def __init__(self, generator, scorer, writer, scores_file, config, report, progress):
    self.generator, self.scorer, self.writer = generator, scorer, writer
    self.scores_file, self.config, self.report = scores_file, config, report
    self.progress = progress
    self.pending: dict[int, dict] = {}
    self.batches: dict[int, list[tuple[int, int]]] = {}
    self.order: collections.deque = collections.deque()
    self.skip_records: dict[int, int] = {}

  def go(self, prompts: Sequence[Prompt]) -> None:
    c = self.config
    units = ((prompt, n) for prompt in prompts for n in range(c.candidates))
    for prompt in prompts:
      self.order.append(prompt.index)
    batch_index = 0
    while True:
      batch = []
      for unit in units:
        batch.append(unit)
        if len(batch) == c.batch_size:
          break
      if not batch:
        break
      self._generate(batch_index, batch)
      batch_index += 1
      self._collect(wait=False)
    self._collect(wait=True)
    if self.pending:
      raise InputError(f"{len(self.pending)} prompts were left unscored by the CLIP sidecar")

  def _generate(self, batch_index: int, batch: list[tuple[Prompt, int]]) -> None:
    c = self.config
    for prompt, _ in batch:
      if prompt.index not in self.pending:
        self.pending[prompt.index] = {
            "prompt": prompt, "seeds": prompt_seeds(c.seed, prompt.index, c.candidates),
            "images": None, "p": np.zeros(c.candidates, np.float32),
            "cfg_scale": np.zeros(c.candidates, np.float32),
            "scores": {k: np.full(c.candidates, np.nan, np.float32) for k in SCORE_KEYS},
            "remaining": c.candidates}
    # Pad to a fixed batch so that one program serves every batch.
    padded = batch + [batch[-1]] * (c.batch_size - len(batch))
    pairs = [(prompt.input, prompt.output) for prompt, _ in padded]
    seeds = [int(self.pending[prompt.index]["seeds"][n]) for prompt, n in padded]
    options = [prompt.p2p or c.p2p for prompt, _ in padded] if c.mode == "p2p" else None
    out = self.generator(pairs, seeds, mode=c.mode, min_p=c.min_p, max_p=c.max_p,
                         min_cfg=c.min_cfg, max_cfg=c.max_cfg, p2p=options)
    images = out.images[:len(batch)]
    for k, (prompt, n) in enumerate(batch):
      entry = self.pending[prompt.index]
      if entry["images"] is None:
        entry["images"] = np.zeros((c.candidates, *images.shape[1:]), np.uint8)
      entry["images"][n] = images[k]
      entry["p"][n], entry["cfg_scale"][n] = out.p[k], out.cfg_scale[k]
    self.batches[batch_index] = [(prompt.index, n) for prompt, n in batch]
    self.scorer.submit(batch_index, images[:, 0], images[:, 1],
                       [prompt.input for prompt, _ in batch],
                       [prompt.output for prompt, _ in batch])

  def _collect(self, wait: bool) -> None:
    for batch_index, scores in self.scorer.results(wait=wait):
      for k, (index, n) in enumerate(self.batches.pop(batch_index)):
        entry = self.pending[index]
        for key in SCORE_KEYS:
          entry["scores"][key][n] = scores[key][k]
        entry["remaining"] -= 1
      self._flush()

  def _flush(self) -> None:
    """Writes the finished prompts at the head of the file order."""
    while self.order and self.order[0] in self.pending and not self.pending[
        self.order[0]]["remaining"]:
      entry = self.pending.pop(self.order.popleft())
      self._write(entry)

  def _write(self, entry: dict) -> None:
    c, prompt = self.config, entry["prompt"]
    scores = entry["scores"]
    passed = filter_lib.passes(scores, c.filter)
    kept = filter_lib.select(scores, c.filter)
    skip = self.skip_records.pop(prompt.index, 0)
    # The scores line goes first: once a record of this prompt is committed, a resumed run
    # keeps the line instead of writing it again.
    row = {"prompt_index": prompt.index, "input": prompt.input, "edit": prompt.edit,
           "output": prompt.output, "seed": entry["seeds"].tolist(),
           "p": entry["p"].tolist(), "cfg_scale": entry["cfg_scale"].tolist(),
           **{k: v.tolist() for k, v in scores.items()}, "kept": kept.tolist()}
    if c.mode == "p2p":
      row["p2p"] = dataclasses.asdict(prompt.p2p or c.p2p)
    self.scores_file.write(json.dumps(row) + "\n")
    self.scores_file.flush()
    for j, n in enumerate(kept):
      if j < skip:
        continue
      triplet = schema.Triplet(
          input_image=_encode(entry["images"][n, 0], c),
          edited_image=_encode(entry["images"][n, 1], c),
          instruction=prompt.edit, input_caption=prompt.input, edited_caption=prompt.output,
          source=SOURCE, source_id=f"{prompt.index}/{int(entry['seeds'][n])}",
          prompt_index=prompt.index, seed=int(entry["seeds"][n]),
          p2p_threshold=float(entry["p"][n]), cfg_scale=float(entry["cfg_scale"][n]),
          clip_sim_0=float(scores["sim_0"][n]), clip_sim_1=float(scores["sim_1"][n]),
          clip_sim_direction=float(scores["sim_direction"][n]),
          clip_sim_image=float(scores["sim_image"][n]))
      self.writer.write(triplet, c.split,
                        cursor={"prompt": prompt.index, "written": j + 1, "of": len(kept)})
      self.report.written += 1
    self.report.prompts += 1
    self.report.candidates += c.candidates
    self.report.passed += int(passed.sum())
    if self.progress is not None:
      self.progress(self.report)


def _encode(image: np.ndarray, config: GenerationConfig) -> bytes:
  from PIL import Image
  buffer = io.BytesIO()
  if config.image_format == "png":
    Image.fromarray(image).save(buffer, format="PNG")
  else:
    Image.fromarray(image).save(buffer, format="JPEG", quality=config.jpeg_quality)
  return buffer.getvalue()


def _tf():
  from jip2p.data.tf_setup import import_tf
  return import_tf()


class Throughput:
  """Prompts/s, candidates/s and the pass rate for a progress bar's postfix."""

  def __init__(self):
    self.start = time.monotonic()

  def postfix(self, report: RunReport) -> dict[str, str]:
    elapsed = max(time.monotonic() - self.start, 1e-9)
    rate = report.passed / report.candidates if report.candidates else 0.0
    return {"prompts/s": f"{report.prompts / elapsed:.3g}",
            "cand/s": f"{report.candidates / elapsed:.3g}", "pass": f"{rate:.1%}"}
