"""The sidecar's DINO call and `jip2p-eval` end to end, against in-process PyTorch references.

Tiny random CLIP (open_clip) and DINO (ViT) models; the reference features are computed here, in
this (torch-side) process, and every metric the evaluation wrote is recomputed from them by hand.
Two sidecar starts (a torch import each) and one compilation of a tiny editor: about 1 min of
CPU; 2-3 min of wall time on two cores shared with other work.
"""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from jip2p import checkpoints
from jip2p.cli import eval as eval_cli
from jip2p.errors import Jip2pError
from jip2p.eval import paper_metrics, sets
from jip2p.sidecar import ClipScorer, server
from tests.eval import tiny_dino
from tests.sidecar import tiny_clip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("metric_models"))
  clip_config, clip_weights = tiny_clip.write_tiny_clip(directory)
  dino_config, dino_weights, dino_state = tiny_dino.write_tiny_dino(directory)
  return {"clip_config": clip_config, "clip_weights": clip_weights,
          "clip": tiny_clip.load_tiny(clip_weights), "dino_config": dino_config,
          "dino_weights": dino_weights, "dino_state": dino_state}


def cos(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_sidecar_dino_and_clip_metrics_equal_in_process_references(models):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 48, 40, 3), dtype=np.uint8)
  square = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
  with ClipScorer(models["clip_weights"], config=models["clip_config"], device="cpu",
                  dino_weights=models["dino_weights"], dino_config=models["dino_config"],
                  start_timeout=180) as scorer:
    assert scorer.info["dino"] == {"model": "dino_tiny.pth", "image_size": [32, 32],
                                   "embed_dim": 64}
    dino = scorer.encode_dino(images)
    want = tiny_dino.reference_features(models["dino_state"], images)
    assert dino.shape == (3, 64) and dino.dtype == np.float32
    np.testing.assert_allclose(dino, want, atol=2e-5)
    np.testing.assert_allclose(scorer.encode_dino(square),
                               tiny_dino.reference_features(models["dino_state"], square),
                               atol=2e-5)
    np.testing.assert_allclose(paper_metrics.dino_similarity(dino[:2], dino[1:]),
                               [cos(want[0], want[1]), cos(want[1], want[2])], atol=2e-5)

    # The CLIP metric functions on sidecar features = the reference's scores in-process.
    im0, im1, c0, c1 = tiny_clip.make_case(seed=5, n=4)
    ref = tiny_clip.reference_scores(models["clip"], im0, im1, c0, c1)
    f0, f1 = scorer.encode_images(im0), scorer.encode_images(im1)
    t0, t1 = scorer.encode_texts(c0), scorer.encode_texts(c1)
  np.testing.assert_allclose(paper_metrics.clip_image_similarity(f0, f1), ref["sim_image"],
                             atol=1e-5)
  np.testing.assert_allclose(paper_metrics.clip_directional_similarity(f0, f1, t0, t1),
                             ref["sim_direction"], atol=1e-5)
  np.testing.assert_allclose(paper_metrics.clip_text_similarity(f1, t1), ref["sim_1"], atol=1e-5)


def test_dino_only_server_and_its_errors(models, tmp_path):
  """In this process (torch is here anyway): a sidecar start costs a torch import."""
  args = server.parse_args(["--dino-weights", models["dino_weights"], "--dino-config",
                            models["dino_config"], "--device", "cpu"])
  served = server.load_models(args)
  assert served.clip is None and served.ready()["dino"]["embed_dim"] == 64
  assert served.ready()["model"] is None
  with pytest.raises(Jip2pError, match="no CLIP model for 'encode_texts'"):
    server.handle(served, {"type": "encode_texts", "texts": ["a cat"]}, {})
  wrong = tmp_path / "wrong.json"
  wrong.write_text(json.dumps({**tiny_dino.CONFIG, "embed_dim": 32}))
  with pytest.raises(Jip2pError, match="cannot load DINO weights .*dino_tiny.pth into a ViT"):
    server.DinoEncoder(models["dino_weights"], config=str(wrong), device="cpu")
  unknown = tmp_path / "unknown.json"
  unknown.write_text(json.dumps({"layers": 3}))
  with pytest.raises(Jip2pError, match=r"unknown keys \['layers'\]"):
    server.dino_config(models["dino_weights"], str(unknown))
  with pytest.raises(Jip2pError, match="give --clip-weights, --dino-weights or both"):
    server.load_models(server.parse_args([]))


def test_jip2p_eval_writes_csv_plot_and_reference_metrics(models, tmp_path, capsys):
  model = checkpoints.create_random_pipeline(str(tmp_path / "tiny"), "tiny")
  out = tmp_path / "eval"
  argv = ["--model", model, "--set", "world", "--world-n", "3", "--world-size", "64",
          "--steps", "2", "--batch-size", "1", "--sweep", "image", "--image-values", "1.0,2.0",
          "--clip-weights", models["clip_weights"], "--clip-config", models["clip_config"],
          "--dino-weights", models["dino_weights"], "--dino-config", models["dino_config"],
          "--sidecar-device", "cpu", "--save-images", "--no-progress", "--output", str(out)]
  assert eval_cli.main(argv) == 0
  printed = capsys.readouterr().out
  assert "sT7.5_sI1" in printed and "tradeoff.png" in printed
  for name in ("summary.csv", "tradeoff.png", "tradeoff.svg", "results.jsonl", "run.json"):
    assert (out / name).stat().st_size > 0, name
  with open(out / "summary.csv") as f:
    table = list(csv.DictReader(f))
  assert [(r["setting"], r["group"]) for r in table if r["group"] == "all"] == [
      ("sT7.5_sI1", "all"), ("sT7.5_sI2", "all")]
  with open(out / "results.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 6 and [r["seed"] for r in rows] == [0, 1, 2] * 2

  world = {s.key: s.turns[0] for s in sets.world_set(3, seed=1, size=64).sessions}
  for row in rows:
    turn = world[row["key"]]
    source, target = turn.load_image(), turn.load_target()
    output = np.asarray(Image.open(out / "images" / row["setting"] / f"{row['key']}.png"))
    f_in, f_out, f_gt = (tiny_clip.reference_features(models["clip"], im[None])[0]
                         for im in (source, output, target))
    t_in, t_out = tiny_clip.reference_features(models["clip"],
                                               texts=[turn.input_caption, turn.output_caption])
    d_in, d_out, d_gt = tiny_dino.reference_features(models["dino_state"],
                                                     np.stack([source, output, target]))
    expected = {"clip_img": cos(f_in, f_out), "clip_dir": cos(f_out - f_in, t_out - t_in),
                "clip_out": cos(f_out, t_out), "clip_t": cos(f_out, t_out),
                "clip_i": cos(f_gt, f_out), "dino": cos(d_in, d_out), "dino_gt": cos(d_gt, d_out),
                "l1": np.abs(output / 255 - source / 255).mean(),
                "l1_gt": np.abs(output / 255 - target / 255).mean(),
                "l2_gt": ((output / 255 - target / 255) ** 2).mean()}
    for name, value in expected.items():
      assert row[name] == pytest.approx(value, abs=5e-5), (row["key"], name)
    assert row["world_success"] in (0.0, 1.0)

  # Other settings than the stored run's are refused before anything loads.
  assert eval_cli.main(argv + ["--steps", "3"]) == 2
  assert "holds results of another run (steps 2 there, 3 now)" in capsys.readouterr().err
