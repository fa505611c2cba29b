"""`jip2p.p2p.world`: world prompts, exact pair scores of generated datasets, the CLIP filter's
precision and recall, the threshold chooser, configs/generate_world.py, and one small
`jip2p-generate` run on a random world text-to-image model and a tiny CLIP (TensorFlow side:
datasets are TFRecords; the CLIP model is written by a helper process and runs in the sidecar).
"""

import json
import pathlib

import numpy as np
import pytest

from jip2p.data import synthetic
from jip2p.data.schema import Triplet
from jip2p.data.writer import DatasetWriter
from jip2p.errors import ConfigError, InputError
from jip2p.p2p import world
from tests.data.triplet_fixtures import encode

pytestmark = pytest.mark.tf

ROOT = pathlib.Path(__file__).resolve().parents[2]
SEED, PROMPTS, SIZE = 7, 6, 32
# Candidates of every prompt, by seed: whether each is exact.
EXACT = {0: True, 1: False, 2: False, 3: True, 4: False}


def _noise(seed, shape, amplitude):
  rng = np.random.default_rng(seed)
  return rng.integers(-amplitude, amplitude + 1, shape)


def _shift(image, noise):
  return np.clip(image.astype(np.int32) + noise, 0, 255).astype(np.uint8)


def _candidate(example, seed):
  """(image 0, image 1) of a planted candidate: 0 the true pair; 1 image 1 unchanged; 2 image 1
  noise; 3 the true pair with the same small noise on both (a model's soft drawing); 4 image 0
  draws the edited scene."""
  a, b = example.input_image, example.edited_image
  if seed == 1:
    return a, a
  if seed == 2:
    return a, np.random.default_rng(seed).integers(0, 256, a.shape, dtype=np.uint8)
  if seed == 3:
    noise = _noise(example.index, a.shape, 12)
    return _shift(a, noise), _shift(b, noise)
  if seed == 4:
    return b, b
  return a, b


def _record(row, line, seed, images):
  return Triplet(input_image=encode(images[0]), edited_image=encode(images[1]),
                 instruction=row["edit"], input_caption=row["input"],
                 edited_caption=row["output"], source="jip2p-generate",
                 source_id=f"{line}/{seed}", prompt_index=line, seed=seed)


def _write(directory, records):
  with DatasetWriter(str(directory)) as writer:
    for record in records:
      writer.write(record)
  return str(directory)


# Kept by a pretend filter: seeds 0-2 of the first two prompts, seed 3 of the others.
def _kept(line, seed):
  return seed in ((0, 1, 2) if line < 2 else (3,))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
  """(prompts path, all-candidates dataset, filtered dataset, rows)."""
  root = tmp_path_factory.mktemp("world")
  prompts = root / "prompts.jsonl"
  assert world.main(["prompts", "--num", str(PROMPTS), "--seed", str(SEED), "--out",
                     str(prompts)]) == 0
  rows = [json.loads(line) for line in prompts.read_text().splitlines()]
  records = []
  for line, row in enumerate(rows):
    example = synthetic.example_at(line, seed=SEED, size=SIZE)
    records += [_record(row, line, seed, _candidate(example, seed)) for seed in EXACT]
  everything = _write(root / "all", records)
  kept = _write(root / "kept", [r for r in records if _kept(r.prompt_index, r.seed)])
  return str(prompts), everything, kept, rows


def test_prompt_rows_are_the_world_examples_and_parse(planted):
  from jip2p.p2p.dataset import read_prompts
  from jip2p.tokenizer import CLIPTokenizer
  path, _, _, rows = planted
  for line, row in enumerate(rows):
    e = synthetic.example_at(line, seed=SEED)
    assert (row["input"], row["edit"], row["output"]) == (e.input_caption, e.instruction,
                                                          e.edited_caption)
    assert row["world"] == {"seed": SEED, "index": line}
    assert e.template_id in {t.id for t in synthetic.templates(e.family, "train")}
  prompts, report = read_prompts(pathlib.Path(path).read_text().splitlines(),
                                 CLIPTokenizer.default())
  assert not report.skipped and not report.truncated
  assert [(p.index, p.input, p.edit, p.output) for p in prompts] == [
      (n, r["input"], r["edit"], r["output"]) for n, r in enumerate(rows)]
  assert world.prompt_rows(2, seed=SEED, start=4) == rows[4:6]


def test_prompts_command_rejects_bad_numbers(tmp_path, capsys):
  out = tmp_path / "p.jsonl"
  assert world.main(["prompts", "--num", "0", "--seed", "1", "--out", str(out)]) == 2
  assert capsys.readouterr().err.startswith("python -m jip2p.p2p.world: error: --num 0")
  assert not out.exists()


def test_exact_scores_of_planted_pairs(planted):
  path, everything, _, _ = planted
  results = world.score_dataset(everything, world.read_world_prompts(path))
  assert [(r["prompt_index"], r["seed"]) for r in results] == [
      (line, seed) for line in range(PROMPTS) for seed in EXACT]
  assert [r["exact"] for r in results] == list(EXACT.values()) * PROMPTS
  assert all(r["drawn"] for r in results if r["seed"] != 4)
  assert not any(r["drawn"] for r in results if r["seed"] == 4)
  summary = world.summarize(results)
  assert summary["exact"] == pytest.approx(0.4) and summary["pairs_per_prompt"] == 5
  assert summary["exact_per_prompt"] == 2 and summary["prompts_with_exact"] == 1
  families = [synthetic.example_at(n, seed=SEED).family for n in range(PROMPTS)]
  assert {f: s["pairs"] for f, s in summary["families"].items()} == {
      f: 5 * families.count(f) for f in synthetic.FAMILIES if f in families}
  assert all(s["exact"] == pytest.approx(0.4) for s in summary["families"].values())


def test_an_extra_object_beside_a_soft_drawing_is_not_exact():
  # Image 0 a noisy drawing: the rest of image 1 is compared with it away from the true edit,
  # not skipped because the drawing differs from the render everywhere.
  checked = 0
  for index in range(12):
    example = synthetic.example_at(index, seed=SEED, size=SIZE)
    if example.family == "background":
      continue
    image0, image1 = _candidate(example, 3)
    assert world.score_pair(image0, image1, example)["exact"]
    taken = {o.cell for s in (example.input_scene, example.edited_scene) for o in s.objects}
    cell = next(c for c in synthetic.PLACES if c not in taken)
    colour = next(c for c in synthetic.COLOURS if c != example.input_scene.background)
    stray = synthetic.Obj("square", colour, cell, size=1.0)
    extra = image1.copy()
    extra[synthetic.object_mask(stray, SIZE)] = synthetic.COLOURS[colour]
    scores = world.score_pair(image0, extra, example)
    assert scores["drawn"] and scores["edit_ok"] and not scores["exact"]
    checked += 1
  assert checked >= 6


def test_filter_precision_recall_and_grid(planted):
  from jip2p import grids
  from jip2p.data.reader import iter_triplets
  from jip2p.eval.sets import decode
  path, everything, kept_dir, _ = planted
  results = world.score_dataset(everything, world.read_world_prompts(path))
  kept = world.kept_mask(results, kept_dir)
  assert kept.tolist() == [_kept(r["prompt_index"], r["seed"]) for r in results]
  stats = world.summarize(results, kept)["filter"]
  # Kept: 3 of the first two prompts (1 exact each), 1 exact of each of the other four.
  assert stats["kept"] == 10 and stats["kept_exact"] == 6
  assert stats["precision"] == pytest.approx(0.6) and stats["recall"] == pytest.approx(0.5)
  assert stats["prompts_kept"] == 1.0
  grid = world.pair_grid(everything, results, kept, per_group=2)
  side, text = 4 * SIZE, 6 * SIZE
  # 4 group labels (16 px) and 2 pairs in each group (every group has 2 or more), 2 px gaps.
  assert grid.shape == (4 * 16 + 8 * side + 11 * 2, text + 2 * side, 3)
  first_kept_exact = next(t for t in iter_triplets(everything) if t.seed == 0)
  np.testing.assert_array_equal(grid[18:18 + side, text:text + side],
                                grids.upscale(decode(first_kept_exact.input_image, "x"), 4))


def test_score_command(planted, tmp_path, capsys):
  path, everything, kept_dir, _ = planted
  grid, records = tmp_path / "pairs.png", tmp_path / "records.jsonl"
  assert world.main(["score", everything, "--prompts", path, "--kept", kept_dir, "--grid",
                     str(grid), "--records", str(records)]) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["exact"] == pytest.approx(0.4)
  assert summary["filter"]["precision"] == pytest.approx(0.6)
  assert grid.read_bytes().startswith(b"\x89PNG")
  assert len(records.read_text().splitlines()) == 5 * PROMPTS
  # A filtered dataset with a pair the scored one lacks.
  assert world.main(["score", kept_dir, "--prompts", path, "--kept", everything]) == 2
  assert "is not a pair of the scored dataset" in capsys.readouterr().err
  # Another seed's prompts: the records' texts are not its lines'.
  other = tmp_path / "other.jsonl"
  other.write_text("".join(json.dumps(r) + "\n" for r in world.prompt_rows(6, seed=SEED + 1)))
  assert world.main(["score", everything, "--prompts", str(other)]) == 2
  assert "are not those of prompt line 1" in capsys.readouterr().err


def _planted_scores(rng, exact):
  """CLIP scores where exactness needs a high direction and a high image similarity; sim_0 and
  sim_1 say nothing."""
  n = len(exact)
  kind = rng.integers(0, 2, n)  # a non-exact pair fails on direction (0) or on image (1)
  direction = np.where(exact | (kind == 1), rng.uniform(0.3, 0.5, n), rng.uniform(0, 0.25, n))
  image = np.where(exact | (kind == 0), rng.uniform(0.8, 0.95, n), rng.uniform(0.3, 0.6, n))
  return {"sim_direction": direction, "sim_image": image, "sim_0": rng.uniform(0.2, 0.3, n),
          "sim_1": rng.uniform(0.2, 0.3, n)}


def test_threshold_chooser_separates_a_planted_exact_set():
  from jip2p.p2p import filter as filter_lib
  rng = np.random.default_rng(0)
  exact = rng.random(400) < 0.3
  config, stats = world.choose_thresholds(_planted_scores(rng, exact), exact, min_recall=0.5)
  assert stats["precision"] == 1.0 and stats["recall"] >= 0.5
  assert 0.25 < config.min_sim_direction <= 0.5 and 0.6 < config.min_sim_image <= 0.95
  assert config.top_k is None
  # Checked on another draw: the thresholds carry over.
  check = rng.random(400) < 0.3
  kept = filter_lib.passes(_planted_scores(rng, check), config)
  held = world.filter_stats(check, kept)
  assert held["precision"] == 1.0 and held["recall"] >= 0.5
  assert world.filter_stats(check, np.ones(400, bool))["precision"] < 0.4  # no filter
  with pytest.raises(ConfigError, match="min_recall"):
    world.choose_thresholds(_planted_scores(rng, exact), exact, min_recall=0)
  with pytest.raises(InputError, match="no candidate is exact"):
    world.choose_thresholds(_planted_scores(rng, exact), np.zeros(400, bool))


def test_thresholds_command_reads_clip_filter_scores(planted, tmp_path, capsys):
  path, everything, _, _ = planted
  results = world.score_dataset(everything, world.read_world_prompts(path))
  scores = tmp_path / "scores.jsonl"
  rows = [{"index": r["position"], "prompt_index": r["prompt_index"],
           "source_id": r["source_id"], "sim_0": 0.25, "sim_1": 0.25,
           "sim_direction": 0.4 if r["exact"] else 0.1 + 0.01 * n, "sim_image": 0.9,
           "kept": True} for n, r in enumerate(results)]
  scores.write_text("".join(json.dumps(r) + "\n" for r in rows))
  argv = ["thresholds", str(scores), "--dataset", everything, "--prompts", path]
  assert world.main(argv) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["candidates"] == 5 * PROMPTS and out["exact"] == 2 * PROMPTS
  assert out["calibration"]["precision"] == 1.0 and out["calibration"]["recall"] == 1.0
  assert out["thresholds"]["min_sim_direction"] == pytest.approx(0.4)
  assert "--min-sim-direction 0.4" in out["clip_filter_flags"]
  # Scores of another dataset: the rows do not name these records.
  scores.write_text("".join(json.dumps({**r, "source_id": "x"}) + "\n" for r in rows))
  assert world.main(argv) == 2
  assert "has no scores of record 0" in capsys.readouterr().err


def test_generate_world_config_validates(tmp_path):
  from jip2p.p2p import generation_config
  from jip2p.train import config as config_lib
  spec = f"{ROOT}/configs/generate_world.py:model={tmp_path},clip=clip.pt"
  c = config_lib.load(spec)
  generation_config.validate(c)
  options = generation_config.from_config(c)
  assert (c.height, c.width, options.min_p, options.max_p) == (32, 32, 0.1, 0.9)
  assert options.filter.top_k == options.candidates == 16 and options.image_format == "png"
  assert options.filter.min_sim_image == -1 and options.mode == "ip2p"
  c = config_lib.load(spec + ",mode=p2p,top_k=4,min_sim_image=0.8,min_cfg=3,max_cfg=3")
  options = generation_config.from_config(c)
  assert (options.mode, options.filter.top_k, options.filter.min_sim_image) == ("p2p", 4, 0.8)
  assert options.min_cfg == options.max_cfg == 3.0
  with pytest.raises(ConfigError, match="mode"):
    generation_config.validate(config_lib.load(spec + ",mode=swap"))


def test_generate_world_end_to_end(tmp_path, capsys):
  from jip2p.checkpoints import create_random_pipeline
  from jip2p.cli import generate as generate_cli
  create_random_pipeline(str(tmp_path / "t2i"), "world", unet_in_channels=3)
  prompts = tmp_path / "prompts.jsonl"
  assert world.main(["prompts", "--num", "2", "--seed", "3", "--out", str(prompts)]) == 0
  out = tmp_path / "all"
  # The config's CLIP is the shipped world CLIP, served by the sidecar.
  spec = f"{ROOT}/configs/generate_world.py:model={tmp_path / 't2i'},candidates=2,steps=2,batch=2"
  assert generate_cli.main(["--config", spec, "--prompts", str(prompts), "--out", str(out)]) == 0
  results = world.score_dataset(str(out), world.read_world_prompts(str(prompts)))
  assert [r["prompt_index"] for r in results] == [0, 0, 1, 1]
  families = [synthetic.example_at(n, seed=3).family for n in range(2)]
  assert [r["family"] for r in results] == [families[0]] * 2 + [families[1]] * 2
  summary = world.summarize(results)
  assert summary["pairs_per_prompt"] == 2 and 0 <= summary["exact"] <= 1
  capsys.readouterr()
