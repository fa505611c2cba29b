"""The client inside a TensorFlow process (the generator's, which runs the data writer).

torch stays out of this process: the tiny model and its expected scores come from a helper
process, and scoring from the sidecar process. About 17 s of CPU (two torch imports, elsewhere).
"""

import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from jip2p.sidecar import SCORE_KEYS, ClipScorer

pytestmark = pytest.mark.tf

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_scores_from_a_tensorflow_process(tmp_path):
  subprocess.run([sys.executable, "-m", "tests.sidecar.tiny_clip", str(tmp_path)], cwd=ROOT,
                 check=True, capture_output=True)
  case = np.load(tmp_path / "case.npz")
  images0 = tf.constant(case["images0"]).numpy()  # as a tf.data pipeline would hand them over
  captions0, captions1 = [str(c) for c in case["captions0"]], [str(c) for c in case["captions1"]]
  with ClipScorer(str(tmp_path / "tiny_clip.pt"), config=str(tmp_path / "tiny_clip.json"),
                  device="cpu", start_timeout=120) as clip:
    clip.submit("only", images0, case["images1"], captions0, captions1)
    (batch_id, scores), = list(clip.results())
  assert batch_id == "only"
  for k in SCORE_KEYS:
    np.testing.assert_allclose(scores[k], case[f"expected_{k}"], atol=1e-5, err_msg=k)
  assert "torch" not in sys.modules and "tensorflow" in sys.modules
