"""The CLIP sidecar against in-process open_clip; the client's restart and exactly-once guarantees.

One sidecar (tiny random CLIP, CPU) serves the parity, kill and hang tests; each sidecar start
costs a torch import, so the file keeps them to six. About 45 s of CPU; the wall time grows with
the machine's load (2.5 min at load 8 on 2 cores).
"""

import io
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.torch import save_file

from jip2p.errors import InputError, Jip2pError
from jip2p.sidecar import SCORE_KEYS, ClipScorer, protocol
from tests.sidecar import tiny_clip
from tests.sidecar.fake_sidecar import fake_scores

FAKE = os.path.join(os.path.dirname(__file__), "fake_sidecar.py")
ROOT = pathlib.Path(__file__).resolve().parents[2]
HANG_TIMEOUT = 4.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  directory = tmp_path_factory.mktemp("clip")
  config, weights = tiny_clip.write_tiny_clip(str(directory))
  return config, weights, tiny_clip.load_tiny(weights)


@pytest.fixture(scope="module")
def scorer(tiny):
  config, weights, _ = tiny
  clip = ClipScorer(weights, config=config, device="cpu", batch_size=3, timeout=60,
                    start_timeout=120)
  clip.start()
  yield clip
  clip.close()


def assert_scores_close(got, want, atol=1e-5):
  assert sorted(got) == sorted(SCORE_KEYS)
  for k in SCORE_KEYS:
    assert got[k].dtype == np.float32 and got[k].shape == want[k].shape, k
    np.testing.assert_allclose(got[k], want[k], atol=atol, err_msg=k)


def test_ready_handshake_reports_model(scorer):
  assert scorer.info["model"] == "tiny_clip"
  assert scorer.info["image_size"] == [32, 32]
  assert scorer.info["embed_dim"] == 32 and scorer.info["version"] == protocol.VERSION


def test_scores_equal_in_process_open_clip(scorer, tiny):
  model = tiny[2]
  case = tiny_clip.make_case(seed=0, n=5)
  want = tiny_clip.reference_scores(model, *case)
  assert want["sim_direction"][-1] == 0  # identical pair: zero image direction
  assert_scores_close(scorer.score(*case), want)
  # float images in [0, 1] take the same path as uint8 / 255
  floats = [im.astype(np.float32) / 255 for im in case[:2]]
  assert_scores_close(scorer.score(*floats, *case[2:]), want)


def test_feature_calls_equal_in_process_open_clip(scorer, tiny):
  model = tiny[2]
  images, _, texts, _ = tiny_clip.make_case(seed=1, n=7, hw=(64, 64))
  got = scorer.encode_images(images)
  assert got.shape == (7, 32) and got.dtype == np.float32
  np.testing.assert_allclose(got, tiny_clip.reference_features(model, images), atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
  np.testing.assert_allclose(scorer.encode_texts(texts),
                             tiny_clip.reference_features(model, texts=texts), atol=1e-5)


def wait_for_new_pid(clip, old, deadline=90.0):
  end = time.monotonic() + deadline
  while clip.pid == old:
    assert time.monotonic() < end, "the sidecar was not restarted"
    time.sleep(0.05)
  return clip.pid


def test_killed_sidecar_loses_and_duplicates_nothing(scorer, tiny):
  model = tiny[2]
  cases = {f"kill-{i}": tiny_clip.make_case(seed=10 + i, n=2) for i in range(7)}
  ids = list(cases)
  restarts = scorer.restarts
  pid = scorer.pid
  os.kill(pid, signal.SIGSTOP)  # holds replies back, so the batches below are surely in flight
  for i in ids[:4]:
    scorer.submit(i, *cases[i])
  assert scorer.in_flight == 4
  os.kill(pid, signal.SIGKILL)
  for i in ids[4:6]:
    scorer.submit(i, *cases[i])
  pid = wait_for_new_pid(scorer, pid)
  os.kill(pid, signal.SIGKILL)  # the fresh one dies too, before or after its resends
  scorer.submit(ids[6], *cases[ids[6]])
  delivered = list(scorer.results())
  assert sorted(i for i, _ in delivered) == sorted(ids)  # each exactly once
  assert scorer.in_flight == 0 and list(scorer.results(wait=False)) == []
  assert scorer.restarts >= restarts + 2
  for i, scores in delivered:
    assert_scores_close(scores, tiny_clip.reference_scores(model, *cases[i]))


def test_hung_sidecar_is_restarted_after_timeout(scorer, tiny):
  model = tiny[2]
  cases = {f"hang-{i}": tiny_clip.make_case(seed=20 + i, n=3) for i in range(2)}
  pid, restarts = scorer.pid, scorer.restarts
  scorer.timeout = HANG_TIMEOUT  # short here only: on a loaded machine a slow reply looks hung
  os.kill(pid, signal.SIGSTOP)
  start = time.monotonic()
  try:
    for i, case in cases.items():
      scorer.submit(i, *case)
    delivered = dict(scorer.results())
  finally:
    scorer.timeout = 60
  assert time.monotonic() - start >= HANG_TIMEOUT
  assert scorer.pid != pid and scorer.restarts >= restarts + 1
  assert sorted(delivered) == sorted(cases)
  for i, case in cases.items():
    assert_scores_close(delivered[i], tiny_clip.reference_scores(model, *case))


def test_submit_validates_input(scorer):
  images0, images1, c0, c1 = tiny_clip.make_case(seed=3, n=2)
  with pytest.raises(InputError, match="same N pairs"):
    scorer.submit("bad", images0, images1, c0, c1[:1])
  with pytest.raises(InputError, match=r"\[N>0, H, W, 3\]"):
    scorer.submit("bad", images0[..., :2], images1, c0, c1)
  scorer.submit("once", images0, images1, c0, c1)
  with pytest.raises(InputError, match="already submitted"):
    scorer.submit("once", images0, images1, c0, c1)
  assert [i for i, _ in scorer.results()] == ["once"]


def test_torchscript_release_file(tmp_path):
  path = str(tmp_path / "ViT-tiny.pt")
  model = tiny_clip.write_torchscript(path)
  case = tiny_clip.make_case(seed=4, n=3)
  with ClipScorer(path, device="cpu", start_timeout=120) as clip:
    assert clip.info["model"] == "openai:ViT-tiny.pt" and clip.info["image_size"] == [32, 32]
    assert_scores_close(clip.score(*case), tiny_clip.reference_scores(model, *case))


def test_missing_weights_error_from_start(tmp_path):
  missing = str(tmp_path / "nope.safetensors")
  with pytest.raises(Jip2pError, match="CLIP weights file not found: .*nope.safetensors"):
    ClipScorer(missing).start()


def test_server_reports_missing_weights_before_loading_torch(tmp_path):
  missing = str(tmp_path / "nope.pt")
  code = ("import sys; from jip2p.sidecar import server; rc = server.main(sys.argv[1:]); "
          "assert 'torch' not in sys.modules; sys.exit(rc)")
  result = subprocess.run([sys.executable, "-c", code, "--clip-weights", missing],
                          capture_output=True, cwd=ROOT)
  assert result.returncode == 2, result.stderr.decode()
  header, _ = protocol.read_message(io.BytesIO(result.stdout))
  assert header["type"] == "fatal" and missing in header["message"]


def test_weights_that_do_not_fit_the_architecture(tmp_path, tiny):
  config, _, _ = tiny
  other = dict(tiny_clip.CONFIG, embed_dim=16)
  weights = str(tmp_path / "other.safetensors")
  save_file(tiny_clip.tiny_model(config=other).state_dict(), weights)
  with pytest.raises(Jip2pError, match="cannot load CLIP weights .*other.safetensors as tiny_clip"):
    ClipScorer(weights, config=config, device="cpu", start_timeout=120).start()


class _OpensAFile:
  """A pickle that runs code when unpickled: it creates the file at ``path``."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return open, (self.path, "w")


def test_a_file_that_is_not_weights_is_refused_without_running_it(tmp_path, tiny):
  from jip2p.sidecar import server
  config, _, _ = tiny
  marker = tmp_path / "the_pickle_ran"
  code = tmp_path / "code.pt"
  code.write_bytes(pickle.dumps(_OpensAFile(str(marker))))
  noise = tmp_path / "noise.pt"
  noise.write_bytes(np.random.default_rng(0).bytes(4096))
  for path in (code, noise):
    for load in (lambda: server.Scorer(str(path), config=config, device="cpu"),
                 lambda: server._dino_state_dict(str(path))):
      with pytest.raises(Jip2pError) as e:
        load()
      message = str(e.value)
      assert f"{path}: " in message or f"{path} as tiny_clip: " in message
      assert "not a file of weights (the weights-only unpickler refused it" in message
      assert "weights_only" not in message and "\n" not in message
  assert not marker.exists()


def fake_case(seed, first_caption="x"):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  return images, images, [first_caption, "y"], ["z", "w"]


def test_duplicate_replies_are_dropped(tmp_path):
  weights = tmp_path / "w.bin"
  weights.write_bytes(b"x")
  with ClipScorer(str(weights), command=[sys.executable, FAKE, "--mode", "duplicate"],
                  timeout=30) as clip:
    cases = {i: fake_case(i) for i in range(5)}
    for i, case in cases.items():
      clip.submit(i, *case)
    clip.submit("failing", *fake_case(9, first_caption="fail"))
    delivered = []
    with pytest.raises(Jip2pError, match="failed on batch 'failing': on purpose"):
      for item in clip.results():
        delivered.append(item)
    delivered += list(clip.results())
    assert sorted(i for i, _ in delivered) == sorted(cases)
    for i, scores in delivered:
      np.testing.assert_array_equal(scores["sim_0"], fake_scores(cases[i][0])["sim_0"])
    assert clip.dropped_replies >= 5
    np.testing.assert_array_equal(clip.score(*cases[0])["sim_image"],
                                  fake_scores(cases[0][0])["sim_image"])


def test_sidecar_crashing_on_every_request_gives_up(tmp_path):
  weights = tmp_path / "w.bin"
  weights.write_bytes(b"x")
  with ClipScorer(str(weights), command=[sys.executable, FAKE, "--mode", "crash"],
                  max_restarts=2) as clip:
    clip.submit(0, *fake_case(0))
    with pytest.raises(Jip2pError, match="2 restarts in a row brought no reply"):
      list(clip.results())
    assert clip.restarts == 2
    with pytest.raises(Jip2pError, match="restarts in a row"):
      clip.submit(1, *fake_case(1))
