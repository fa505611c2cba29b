"""The latent cache: `jip2p-cache-latents` writes it, `LatentSource` reads it, and the trainer's own
loss on a cached batch equals its loss (and gradients) on the images of the same crops and flips,
with the VAE sampling noise drawn from the same key."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
import triplet_fixtures as fx  # noqa: E402

from jip2p.bench.jax_side import random_module  # noqa: E402
from jip2p.checkpoints import preset_configs  # noqa: E402
from jip2p.cli import cache_latents  # noqa: E402
from jip2p.data import latents, writer  # noqa: E402
from jip2p.diffusion import schedules  # noqa: E402
from jip2p.errors import ConfigError  # noqa: E402
from jip2p.train import step as step_lib  # noqa: E402
from tests import cli_errors  # noqa: E402

pytestmark = pytest.mark.tf

RES, RESIZE, N = 32, 40, 6
ARGS = ["--model", "random:tiny", "--resolution", str(RES), "--resize", str(RESIZE),
        "--batch-size", "4", "--examples-per-shard", "4"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """N pairs (edited = negative of input, with ramps that show flips) and one unusable record."""
  folder = str(tmp_path_factory.mktemp("triplets"))
  with writer.DatasetWriter(folder, examples_per_shard=4) as w:
    for i in range(N):
      w.write(fx.triplet(i, size=48))
      if i == 2:
        w.write(fx.triplet(99, size=48, instruction=" "))
  return folder


@pytest.fixture(scope="module")
def cache(dataset, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("cache") / "latents")
  assert cache_latents.main(["--data", dataset, "--out", out, *ARGS]) == 0
  return out


@pytest.fixture(scope="module")
def pipeline():
  return cache_latents.load_model("random:tiny", "float32")


def test_cache_layout(cache, dataset):
  info = latents.CacheInfo.read(cache)
  assert info.num_examples == N and info.skipped == 1
  assert [n for _, n in info.shards] == [4, 2]
  assert info.latent_shape == (RES // 2, RES // 2, 4) and info.text_shape == (77, 32)
  records = list(latents.iter_records(cache))
  assert [r["instruction"] for r in records] == [f"example {i}" for i in range(N)]
  assert [r["index"] for r in records] == [0, 1, 2, 4, 5, 6]  # record 3 had no instruction
  for r in records:  # the flipped crop is encoded, not the latent flipped
    assert not np.allclose(r["edited_mean"][1], r["edited_mean"][0][:, ::-1], atol=1e-3)
  validation = latents.LatentSource(cache, global_batch=2, seed=0).validation_batch(3)
  assert validation["input"].shape == (3, RES, RES, 3)
  # The fixture's edited image is the input's negative: the stored crops keep that pairing.
  np.testing.assert_allclose(validation["edited"], -validation["input"], atol=1.5 / 127.5)
  again = cache_latents.main(["--data", dataset, "--model", "random:tiny", "--out", cache])
  assert again == 2  # refuses to overwrite


def run_cli(argv, capsys) -> tuple[int, str]:
  code = cache_latents.main(argv)
  err = capsys.readouterr().err
  assert "Traceback" not in err
  return code, err.strip().splitlines()[-1]


@pytest.mark.parametrize("case", ["missing data", "no such split", "output under a file",
                                  "finished cache"])
def test_bad_input_and_output_are_named_before_the_model_loads(case, cache, dataset, tmp_path,
                                                                capsys, monkeypatch):
  # The tests run as root, for whom chmod does not make a folder unwritable: a target under a
  # regular file stands for a folder that cannot be written.
  monkeypatch.setattr(cache_latents, "load_model", lambda *_: pytest.fail("the model loaded"))
  (tmp_path / "a_file").write_text("x")
  data, out, extra = [dataset], str(tmp_path / "out"), []
  if case == "missing data":
    data, words = [dataset, str(tmp_path / "nope")], f"{tmp_path}/nope does not exist"
  elif case == "no such split":
    extra, words = ["--split", "test"], "has no split 'test' (it has ['train'])"
  elif case == "output under a file":
    out = str(tmp_path / "a_file" / "cache")
    words = f"cannot create the cache folder {out}: {tmp_path}/a_file is not a folder"
  else:
    out, words = cache, f"{cache} already holds a latent cache (latents.json)"
  code, line = run_cli(["--data", *data, "--out", out, *ARGS, *extra], capsys)
  assert code == 2 and line.startswith("jip2p-cache-latents: error: ") and words in line
  assert os.listdir(tmp_path) == ["a_file"]


def test_a_split_without_usable_records_leaves_nothing(tmp_path, capsys):
  data = str(tmp_path / "data")
  with writer.DatasetWriter(data, examples_per_shard=4) as w:
    w.write(fx.triplet(1, size=48, instruction=" "))
  code, line = run_cli(["--data", data, "--out", str(tmp_path / "cache"), *ARGS], capsys)
  assert code == 2 and line.endswith(f"split 'train' of ['{data}'] has no usable example to cache")
  assert os.listdir(tmp_path) == ["data"]


def test_a_rerun_finishes_an_interrupted_cache(cache, dataset, tmp_path):
  """What a kill leaves (a complete shard, one cut short under its temporary name, no
  validation.npz nor latents.json) is written again, as an uninterrupted run writes it."""
  out = tmp_path / "cache"
  shutil.copytree(cache, out)
  (out / latents.MANIFEST).unlink()
  (out / latents.VALIDATION).unlink()
  second = out / latents.CacheInfo.read(cache).shards[1][0]
  (out / f"{second.name}.incomplete").write_bytes(second.read_bytes()[:100])
  second.unlink()
  assert cache_latents.main(["--data", dataset, "--out", str(out), *ARGS]) == 0
  assert latents.CacheInfo.read(str(out)) == latents.CacheInfo.read(cache)
  assert sorted(os.listdir(out)) == sorted(os.listdir(cache))
  for got, want in zip(latents.iter_records(str(out)), latents.iter_records(cache), strict=True):
    assert got.keys() == want.keys()
    for key in got:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_data_and_cache_on_a_non_local_filesystem(cache, dataset):
  """jip2p-cache-latents --data/--out on TensorFlow's in-memory ram:// filesystem, which takes the
  tf.io.gfile path that gs:// takes: the same cache as on local disk, read back by LatentSource."""
  from jip2p.data.tf_setup import import_tf
  gfile = import_tf().io.gfile
  data, out = "ram://jip2p-latent-test/triplets", "ram://jip2p-latent-test/latents"
  gfile.makedirs(data)
  for name in gfile.listdir(dataset):
    gfile.copy(os.path.join(dataset, name), f"{data}/{name}", overwrite=True)
  assert cache_latents.main(["--data", data, "--out", out, *ARGS]) == 0
  assert latents.CacheInfo.read(out) == latents.CacheInfo.read(cache)
  for got, want in zip(latents.iter_records(out), latents.iter_records(cache), strict=True):
    for key in got:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  remote = latents.LatentSource(out, global_batch=2, seed=0).validation_batch(3)
  local = latents.LatentSource(cache, global_batch=2, seed=0).validation_batch(3)
  np.testing.assert_array_equal(remote["input"], local["input"])


def test_a_full_disk_is_one_line_and_a_rerun_finishes(cache, dataset, tmp_path):
  """A shard the file system refuses (a write past 16 KiB fails with EFBIG, as one on a full disk
  with ENOSPC) was a TensorFlow traceback; now one line, its temporary file removed."""
  out = tmp_path / "cache"
  script = os.path.join(os.path.dirname(sys.executable), "jip2p-cache-latents")
  done = subprocess.run(cli_errors.file_size_limited(
      [script, "--data", dataset, "--out", str(out), *ARGS], 16 << 10), capture_output=True,
      text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  line = cli_errors.named_error(done.stderr, done.returncode, "jip2p-cache-latents")
  assert line.startswith(f"jip2p-cache-latents: error: cannot write the latent cache {out}: ")
  assert "File too large" in line and line.endswith("rerun the same command: it writes the "
                                                    "cache again")
  assert os.listdir(out) == []  # no shard under its temporary name
  assert cache_latents.main(["--data", dataset, "--out", str(out), *ARGS]) == 0
  assert latents.CacheInfo.read(str(out)) == latents.CacheInfo.read(cache)


def test_crops_are_centre_crops_of_the_resized_images(dataset):
  """As the reader crops (crop-first): the centre window of the image resized to RESIZE, mapped to
  whole source pixels, area-resized to RES."""
  ds = latents.crop_dataset(dataset, split="train", resolution=RES, resize=RESIZE,
                            max_examples=1)
  first = next(ds.as_numpy_iterator())
  source = 48
  start = round((RESIZE - RES) // 2 / RESIZE * source)
  extent = round(RES / RESIZE * source)
  assert (start, extent) == (5, 38)
  from jip2p.data.tf_setup import import_tf
  tf = import_tf()
  for name, image in (("input", fx.pattern(0, source, source)),
                      ("edited", 255 - fx.pattern(0, source, source))):
    window = image[start:start + extent, start:start + extent].astype(np.float32)
    want = tf.image.resize(window, [RES, RES], method="area", antialias=True).numpy()
    np.testing.assert_allclose(first[name], want / 127.5 - 1.0, atol=1e-5)


def _micro_unet(pipeline):
  """A small 8-channel UNet for ``pipeline``'s text (SDXL: its text_time layout at tiny widths)."""
  if pipeline.is_sdxl:
    config = preset_configs("tiny-sdxl", unet_in_channels=8)["unet"]
  else:
    config = preset_configs("tiny", unet_in_channels=8)["unet"]
    config.update(block_out_channels=[32], down_block_types=["CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D"], layers_per_block=1, norm_num_groups=8,
                  cross_attention_dim=pipeline.text_encoder.config.hidden_size)
  return random_module(config, dtype=np.float32, attention="xla", seed=3)


@pytest.fixture(scope="module")
def sdxl_cache(dataset, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("sdxl_cache") / "latents")
  assert cache_latents.main(["--data", dataset, "--out", out, *ARGS[2:], "--model",
                             "random:tiny-sdxl"]) == 0
  return out


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl"])
def test_training_from_the_cache_equals_training_from_images(preset, cache, sdxl_cache, dataset,
                                                             pipeline):
  """The cached batch (moments, embeddings; SDXL's pooled text and micro-conditioning too) gives
  the loss and gradients of the image batch of the same crops and flips."""
  from jip2p.train import models
  if preset == "tiny-sdxl":
    cache, pipeline = sdxl_cache, cache_latents.load_model("random:tiny-sdxl", "float32")
  info = latents.CacheInfo.read(cache)
  source = latents.LatentSource(cache, global_batch=4, seed=1,
                                tokenizer=pipeline.text_tokenizer())
  batch = next(source)
  assert batch["edited"].shape == (4, RES // 2, RES // 2, 8)
  if pipeline.is_sdxl:
    # Both encoders' states (32 + 48 wide) and the pooled text (40); the fixture's 48 px images'
    # original size, and the centre crop's corner in the 40 px square, mirrored when flipped.
    assert set(batch) == {"edited", "input", "input_ids", "original_size", "crop_top_left"}
    assert info.scaling_factor == 0.13025 and info.pooled_shape == (40,)
    assert batch["input_ids"][0].shape == (4, 77, 80) and batch["input_ids"][1].shape == (4, 40)
    np.testing.assert_array_equal(batch["original_size"], np.full((4, 2), 48))
  else:
    assert set(batch) == {"edited", "input", "input_ids"}
    assert batch["input_ids"].shape == (4, 77, 32)

  # Which record and which flip each row holds, found by exact match.
  records = list(latents.iter_records(cache))
  crops = {int(c["index"]): c for c in latents.crop_dataset(
      dataset, split="train", resolution=RES, resize=RESIZE).as_numpy_iterator()}
  rows = []
  for row in batch["edited"]:
    rows += [(r, f) for r in records for f in (0, 1)
             if np.array_equal(row[..., :4], r["edited_mean"][f])]
  assert len(rows) == 4
  image_batch = {
      "input": np.stack([crops[r["index"]]["input"][:, ::-1] if f else crops[r["index"]]["input"]
                         for r, f in rows]),
      "edited": np.stack([crops[r["index"]]["edited"][:, ::-1] if f else
                          crops[r["index"]]["edited"] for r, f in rows]),
      "input_ids": np.asarray(pipeline.text_tokenizer()([r["instruction"] for r, _ in rows]),
                              np.int32)}
  if pipeline.is_sdxl:
    offset = (RESIZE - RES) // 2
    image_batch["original_size"] = np.asarray([crops[r["index"]]["original_size"]
                                               for r, _ in rows], np.int32)
    image_batch["crop_top_left"] = np.asarray([[offset, RESIZE - RES - offset if f else offset]
                                               for _, f in rows], np.int32)
    np.testing.assert_array_equal(batch["crop_top_left"], image_batch["crop_top_left"])

  unet_def, params = nnx.split(_micro_unet(pipeline), nnx.Param)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  frozen = models.frozen_models(pipeline, device)
  cached_vae_def, cached_vae_state = nnx.split(latents.CachedVAE(pipeline.vae.config))
  cached_text_def, cached_text_state = nnx.split(latents.PrecomputedText())
  common = dict(alphas_cumprod=schedules.from_scheduler_config(
      pipeline.scheduler_config).alphas_cumprod(),
      scaling_factor=pipeline.vae.config.scaling_factor, dropout=0.2)
  from_images = step_lib.make_loss_fn(unet_def, frozen.vae_def, frozen.text_def, **common)
  from_cache = step_lib.make_loss_fn(unet_def, cached_vae_def, cached_text_def, **common)
  cached_frozen = {"vae": cached_vae_state, "text_encoder": cached_text_state,
                   "null_text": frozen.state["null_text"]}
  grad = lambda fn: jax.jit(jax.value_and_grad(fn))
  key = jax.random.key(7)
  loss_i, grads_i = grad(from_images)(params, frozen.state, image_batch, key)
  loss_c, grads_c = grad(from_cache)(params, cached_frozen, batch, key)
  np.testing.assert_allclose(loss_c, loss_i, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads_i)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # Another key draws other VAE noise (and timesteps): the loss moves.
  other, _ = grad(from_cache)(params, cached_frozen, batch, jax.random.key(8))
  assert abs(float(other) - float(loss_c)) > 1e-4


def test_source_flips_shuffles_and_resumes(cache):
  source = latents.LatentSource(cache, global_batch=2, seed=0)
  batches = [next(source) for _ in range(9)]  # three epochs of six
  records = list(latents.iter_records(cache))
  seen = []
  for batch in batches:
    for row in batch["input"]:
      match = [(r["index"], f) for r in records for f in (0, 1)
               if np.array_equal(row[..., :4], r["input_mean"][f])
               and np.array_equal(row[..., 4:], r["input_logvar"][f])]
      assert len(match) == 1
      seen.append(match[0])
  epochs = [sorted(i for i, _ in seen[e * N:(e + 1) * N]) for e in range(3)]
  assert all(e == [r["index"] for r in records] for e in epochs)  # each record once per epoch
  assert {f for _, f in seen} == {0, 1}
  assert [i for i, _ in seen[:N]] != [i for i, _ in seen[N:2 * N]]  # reshuffled
  resumed = latents.LatentSource(cache, global_batch=2, seed=0)
  resumed.set_position(5)
  for want in batches[5:7]:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  assert resumed.get_position() == 7


def test_token_ids_mode(dataset, pipeline, tmp_path):
  info = latents.write_cache(dataset, str(tmp_path / "ids"), pipeline, resolution=RES,
                             text="ids", dtype="float16", batch_size=8, max_examples=3)
  assert info.text == "ids" and info.text_shape == (77,) and info.num_examples == 3
  batch = next(latents.LatentSource(str(tmp_path / "ids"), global_batch=3, seed=0))
  assert batch["input_ids"].dtype == np.int32 and batch["input_ids"].shape == (3, 77)
  assert batch["edited"].dtype == np.float32
  want = json.loads((tmp_path / "ids" / latents.MANIFEST).read_text())
  assert want["dtype"] == "float16" and want["resize"] == RES
  with pytest.raises(ConfigError, match="text='tokens'"):
    latents.write_cache(dataset, str(tmp_path / "bad"), pipeline, text="tokens")


def test_vae_option(tmp_path):
  """--vae DIR: the cache's VAE is that folder's (a model folder's vae/ too)."""
  from jip2p import checkpoints
  other = checkpoints.create_random_pipeline(str(tmp_path / "other"), "tiny", seed=9)
  kernel = lambda p: np.asarray(p.vae.decoder.conv_out.kernel.get_value())
  want = kernel(checkpoints.load_pipeline(other))
  base = checkpoints.create_random_pipeline(str(tmp_path / "base"), "tiny", seed=1)
  for spec, vae in (("random:tiny", other + "/vae"), (base, other)):
    np.testing.assert_array_equal(kernel(cache_latents.load_model(spec, "float32", vae)), want)
    assert not np.array_equal(kernel(cache_latents.load_model(spec, "float32")), want)
