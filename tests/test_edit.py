"""The Editor: parity with diffusers' InstructPix2Pix pipeline, determinism, batching, the
reference's preprocessing and every named input error. Uses torch (diffusers), never TensorFlow."""

import dataclasses
import math
import struct
import zlib

import warnings

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from skimage import data as skdata

from flax import nnx

from jip2p import checkpoints, edit
from jip2p.diffusion import editing, schedules
from jip2p.errors import CheckpointError, ConfigError, InputError, Jip2pWarning
from tests.reference import assert_pairwise_different, save_torch_pipeline

STEPS = 3
GUIDANCE = [(7.5, 1.5), (2.0, 1.0), (1.0, 1.0), (4.0, 2.5)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return save_torch_pipeline(str(tmp_path_factory.mktemp("model") / "pipe"), "tiny")


@pytest.fixture(scope="module")
def editor(folder):
  return edit.Editor.from_pretrained(folder)


@pytest.fixture(scope="module")
def photos():
  """Two real photos at 64×64 (the reference's resize at resolution 64)."""
  return [edit.preprocess(Image.fromarray(skdata.astronaut()), 64),
          edit.preprocess(Image.fromarray(skdata.chelsea()), 64)]


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("sampler,scheduler_cls,grid,spacing", [
    ("euler", diffusers.EulerDiscreteScheduler, "diffusers_euler", "linspace"),
    ("ddim", diffusers.DDIMScheduler, "diffusers_ddim", "leading"),
])
def test_matches_diffusers_pipeline(folder, editor, photos, sampler, scheduler_cls, grid, spacing):
  """Same folder, same initial latents, deterministic sampler: images agree within 2/255 for
  several guidance pairs (s_T, s_I), in one batch of two images and two instructions."""
  pipe = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(folder)
  pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, timestep_spacing=spacing,
                                            clip_sample=False)
  pipe.set_progress_bar_config(disable=True)
  ours_editor = edit.Editor(dataclasses.replace(
      editor.pipeline, scheduler_config={**editor.pipeline.scheduler_config,
                                         "timestep_spacing": spacing}))
  instructions = ["make it a watercolour painting", "turn the cat into a tiger"]
  noise = np.random.RandomState(0).standard_normal(
      (2,) + editor.noise_shape(64, 64)).astype(np.float32)
  results = []
  for text_scale, image_scale in GUIDANCE:
    with torch.no_grad():
      ref = pipe(instructions, image=photos, num_inference_steps=STEPS, guidance_scale=text_scale,
                 image_guidance_scale=image_scale, output_type="np",
                 latents=torch.from_numpy(noise.transpose(0, 3, 1, 2))).images
    ours = np.stack(ours_editor(photos, instructions, steps=STEPS, text_guidance=text_scale,
                                image_guidance=image_scale, resolution=64, sampler=sampler,
                                schedule=grid, batch_size=2, noise=noise, output_type="np"))
    assert ours.shape == ref.shape == (2, 64, 64, 3)
    err = np.abs(ours - ref).max()
    assert err <= 2 / 255, f"s_T={text_scale}, s_I={image_scale}: max error {err * 255:.2f}/255"
    results.append(ours)
  # The guidance pairs lead to visibly different images, so the agreement above is about them.
  assert_pairwise_different(results, GUIDANCE)


@pytest.fixture(scope="module")
def t2i_folder(tmp_path_factory):
  return save_torch_pipeline(str(tmp_path_factory.mktemp("t2i") / "pipe"), "tiny",
                             unet_in_channels=4)


SDEDIT = [(1.0, 7.5), (0.8, 7.5), (0.5, 4.0), (0.3, 1.0)]  # (strength, guidance)


def test_sdedit_matches_diffusers_img2img_pipeline(t2i_folder, photos, monkeypatch):
  """SDEdit against StableDiffusionImg2ImgPipeline with DDIM (η 0): same folder, same noise,
  images within 2/255 at several strengths and guidance scales, two images and captions in one
  batch. diffusers samples the VAE posterior where jip2p takes its mode: the test makes diffusers
  take the mode too, so that the noise of ``add_noise`` is its generator's first draw."""
  from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
  monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None:
                      self.mode())
  pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
      t2i_folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config,
                                                       timestep_spacing="leading",
                                                       clip_sample=False)
  pipe.set_progress_bar_config(disable=True)
  sdedit = edit.Editor.from_pretrained(t2i_folder)
  sdedit = edit.Editor(dataclasses.replace(
      sdedit.pipeline, scheduler_config={**sdedit.pipeline.scheduler_config,
                                         "timestep_spacing": "leading"}))
  captions = ["a watercolour painting of an astronaut", "a photo of a tiger"]
  steps = 10
  h, w, c = sdedit.noise_shape(64, 64)
  noise = torch.randn((2, c, h, w), generator=torch.Generator().manual_seed(0))
  results = []
  for strength, scale in SDEDIT:
    with torch.no_grad():
      ref = pipe(captions, image=photos, strength=strength, num_inference_steps=steps,
                 guidance_scale=scale, eta=0.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    ours = np.stack(sdedit(photos, captions, method="sdedit", strength=strength, steps=steps,
                           text_guidance=scale, resolution=64, sampler="ddim",
                           schedule="diffusers_ddim", batch_size=2, output_type="np",
                           noise=noise.numpy().transpose(0, 2, 3, 1)))
    assert ours.shape == ref.shape == (2, 64, 64, 3)
    err = np.abs(ours - ref).max()
    assert err <= 2 / 255, f"strength {strength}, s {scale}: max error {err * 255:.2f}/255"
    results.append(ours)
  assert_pairwise_different(results, SDEDIT)
  # Less strength keeps the output nearer the input.
  inputs = np.stack([np.asarray(p, np.float32) / 255 for p in photos])
  distance = [np.abs(r - inputs).mean() for r in results[1:3]]
  assert distance[0] > distance[1]


def test_sdedit_needs_a_text_to_image_model_and_a_strength(t2i_folder, editor, photos):
  sdedit = edit.Editor.from_pretrained(t2i_folder)
  with pytest.raises(CheckpointError, match="text-to-image model .*'sdedit'.*expand_conv_in"):
    sdedit(photos, "make it snowy", steps=2, resolution=64)
  with pytest.raises(CheckpointError, match="SDEdit needs a text-to-image model"):
    editor(photos, "a snowy photo", method="sdedit", steps=2, resolution=64)
  for strength in (0.0, 1.5, "0.5"):
    with pytest.raises(ConfigError, match="strength must be in"):
      sdedit(photos, "x", method="sdedit", strength=strength, steps=2, resolution=64)
  with pytest.raises(ConfigError, match="runs no step"):
    sdedit(photos, "x", method="sdedit", strength=0.4, steps=2, resolution=64)
  with pytest.raises(ConfigError, match="unknown method"):
    sdedit(photos, "x", method="p2p", steps=2, resolution=64)
  # Seeds as the InstructPix2Pix editor's: image j from seed + j alone.
  kw = dict(method="sdedit", strength=0.5, steps=4, resolution=64, output_type="np")
  both = sdedit(photos, "a snowy photo", seed=3, **kw)
  alone = sdedit([photos[1]], "a snowy photo", seed=4, **kw)
  np.testing.assert_allclose(both[1], alone[0], atol=1e-5)


# ------------------------------------------------------------------------------ seeds, batches


def test_seeds_are_deterministic_and_per_image(editor, photos):
  kw = dict(steps=2, resolution=64, output_type="np")
  first = editor(photos, "make it snowy", seed=5, **kw)
  again = editor(photos, "make it snowy", seed=5, **kw)
  other = editor(photos, "make it snowy", seed=6, **kw)
  alone = editor([photos[1]], "make it snowy", seed=6, **kw)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert all(np.abs(a - b).max() > 4 / 255 for a, b in zip(first, other))
  # Image j of a call uses seed + j: the second image of seed 5 is the single image of seed 6.
  np.testing.assert_array_equal(first[1], alone[0])
  assert np.abs(first[0] - first[1]).std() > 0.01
  pil = editor(photos, "make it snowy", seed=5, steps=2, resolution=64)
  np.testing.assert_array_equal(np.asarray(pil[1]), np.round(first[1] * 255).astype(np.uint8))


def test_seeds_can_be_given_one_per_image(editor, photos):
  """A list of seeds redoes chosen edits of a run: seed [6, 5] swaps what seed 5 gives."""
  kw = dict(steps=2, resolution=64, output_type="np")
  run = editor(photos, "make it snowy", seed=5, **kw)
  swapped = editor(photos[::-1], "make it snowy", seed=[6, 5], **kw)
  np.testing.assert_array_equal(run[0], swapped[1])
  np.testing.assert_array_equal(run[1], swapped[0])
  with pytest.raises(ConfigError, match="1 seeds for 2 edits"):
    editor(photos, "x", seed=[1], **kw)
  with pytest.raises(ConfigError, match="seed"):
    editor(photos, "x", seed=[1, -1], **kw)


def test_padded_batches_do_not_change_results(editor, photos):
  """Three images in batches of two (the last one padded): each result equals the same image
  and seed in another batch position."""
  third = edit.preprocess(Image.fromarray(skdata.coffee()), 64)
  kw = dict(steps=STEPS, resolution=64, sampler="euler", schedule="diffusers_euler",
            batch_size=2, output_type="np")
  three = editor(photos + [third], ["add snow", "add snow", "make it night"], seed=10, **kw)
  swapped = editor([third, photos[0]], ["make it night", "add snow"], seed=12, **kw)
  np.testing.assert_allclose(three[2], swapped[0], atol=1e-5)  # both seed 12
  assert np.abs(three[0] - swapped[1]).max() > 4 / 255  # seeds 10 and 13


def test_empty_instruction_returns_the_resized_input(editor):
  image = Image.fromarray(skdata.rocket())
  out = editor([image, image], ["", "make it a drawing"], steps=2, resolution=64, seed=0)
  expected = ImageOps.fit(image, edit.preprocess_size(*image.size, 64),
                          method=Image.Resampling.LANCZOS)
  np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(expected))
  assert out[1].size == out[0].size and np.abs(np.asarray(out[1], np.int32)
                                               - np.asarray(out[0], np.int32)).max() > 4


# ------------------------------------------------------------------------------ compiled programs


def test_step_counts_share_one_program(editor, photos):
  """The step count is data: 2, 3 and 5 steps (and another grid) run one compiled program, and
  each edit equals what a program compiled for its own unpadded grid gives, to float rounding."""
  kw = dict(resolution=64, seed=3, output_type="np")
  editor(photos[:1], "make it snowy", steps=2, **kw)
  programs = edit._edit_batch._cache_size()
  image = np.asarray(photos[0], np.float32)[None] / 127.5 - 1.0
  input_ids = editor.pipeline.tokenizer(["make it snowy", ""])
  seeds = np.asarray([3], np.uint32)
  noise = np.asarray(editing.initial_noise(seeds, shape=editor.noise_shape(64, 64)))
  runs = ((3, "discrete"), (5, "discrete"), (5, "karras"))
  outs = [editor(photos[:1], "make it snowy", steps=steps, schedule=grid, **kw)[0]
          for steps, grid in runs]
  assert edit._edit_batch._cache_size() == programs
  for (steps, grid), ours in zip(runs, outs):
    unpadded = schedules.make(grid, steps, editor.scheduler_config)
    assert unpadded.steps is None
    want, _ = edit._edit_batch(editor._states, image, input_ids, noise, seeds, unpadded,
                               np.float32(7.5), np.float32(1.5), graphdefs=editor._graphdefs,
                               method="euler_ancestral", scaling_factor=editor._scaling_factor,
                               prediction_type=editor.scheduler_config.prediction_type)
    np.testing.assert_allclose(ours, np.asarray(want)[0], atol=1e-5)
  assert edit._edit_batch._cache_size() == programs + 2  # one per unpadded step count
  assert np.abs(outs[0] - outs[1]).max() > 2 / 255 and np.abs(outs[1] - outs[2]).max() > 2 / 255


@pytest.mark.parametrize("size,expected", [
    ((512, 512), (512, 512)),
    ((1024, 768), (512, 384)),  # 4:3
    ((768, 1024), (384, 512)),
    ((1920, 1080), (512, 256)),  # 16:9 → 2:1 (nearer in log ratio than 4:3)
    ((1000, 900), (512, 512)),
    ((640, 400), (512, 384)),  # 8:5 → 4:3
    ((4000, 100), (512, 128)),  # anything wider than 4:1 → 4:1
    ((100, 4000), (128, 512)),
])
def test_bucket_size_table(size, expected):
  assert edit.bucket_size(*size, 512, 64, 4) == expected


def test_buckets_make_few_shapes_for_any_upload():
  rng = np.random.RandomState(1)
  sizes = [tuple(int(v) for v in rng.randint(1, 6000, 2)) for _ in range(3000)]
  for resolution, multiple, buckets, at_most in ((512, 64, 4, 7), (768, 64, 6, 11),
                                                 (32, 4, 4, 7), (64, 64, 4, 1)):
    shapes = {edit.bucket_size(w, h, resolution, multiple, buckets) for w, h in sizes}
    assert len(shapes) == at_most
    assert all(max(s) == resolution and min(s) % multiple == 0 for s in shapes)
  # The world model (32 px, step 4): 4:3 and 8:5 share the 32×24 program.
  assert edit.bucket_size(64, 48, 32, 4, 4) == edit.bucket_size(64, 40, 32, 4, 4) == (32, 24)
  assert edit.preprocess_size(64, 40, 32, 4) == (32, 20)


def test_bucketed_edits_take_the_bucket_shape(editor):
  image = Image.fromarray(skdata.chelsea())  # 451×300 → 192×128 by the reference's rule
  [out] = editor([image], "make it snowy", steps=2, resolution=128, seed=0, size_buckets=4)
  assert out.size == (128, 64) == edit.bucket_size(451, 300, 128, 64, 4)
  with pytest.raises(ConfigError, match="size_buckets"):
    editor([image], "x", steps=2, resolution=None, size_buckets=4)
  with pytest.raises(ConfigError, match="size_buckets"):
    editor([image], "x", steps=2, resolution=128, size_buckets=0)


# ------------------------------------------------------------------------------ preprocessing


def reference_size(width, height, resolution):
  """instruct-pix2pix's edit_cli.py, transcribed: long side → resolution, short side up to a
  multiple of 64, both floored to multiples of 64 (float arithmetic, as there)."""
  factor = resolution / max(width, height)
  factor = math.ceil(min(width, height) * factor / 64) * 64 / min(width, height)
  width = int((width * factor) // 64) * 64
  height = int((height * factor) // 64) * 64
  return width, height


@pytest.mark.parametrize("size,resolution,expected", [
    ((1000, 100), 512, (640, 64)),
    ((100, 1000), 512, (64, 640)),
    ((512, 512), 512, (512, 512)),
    ((333, 777), 512, (256, 576)),
    ((777, 333), 512, (576, 256)),
    ((1024, 768), 512, (512, 384)),
    ((451, 300), 512, (576, 384)),  # the short side rounds up, so the long side passes 512
    ((64, 64), 512, (512, 512)),
    ((3000, 2000), 256, (256, 192)),
    ((512, 512), 64, (64, 64)),
])
def test_preprocess_size_table(size, resolution, expected):
  assert edit.preprocess_size(*size, resolution) == expected == reference_size(*size, resolution)


def test_preprocess_size_equals_the_reference_rule_everywhere():
  rng = np.random.RandomState(0)
  sizes = [(w, h) for w in range(1, 200, 7) for h in range(1, 200, 11)]
  sizes += [tuple(int(v) for v in rng.randint(1, 8000, 2)) for _ in range(2000)]
  for resolution in (64, 256, 512, 768):
    for w, h in sizes:
      assert edit.preprocess_size(w, h, resolution) == reference_size(w, h, resolution), (w, h)


def test_preprocess_is_a_lanczos_centre_fit():
  image = Image.fromarray(skdata.chelsea())  # 451×300
  out = edit.preprocess(image, 512)
  assert out.size == (576, 384)
  expected = ImageOps.fit(image, (576, 384), method=Image.Resampling.LANCZOS)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def test_modes_become_rgb_with_alpha_over_white(tmp_path):
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[0, 0] = (255, 0, 0, 255)      # opaque red stays red
  rgba[0, 1] = (0, 0, 255, 0)        # transparent blue becomes white
  rgba[0, 2] = (0, 0, 0, 128)        # half-transparent black becomes grey
  out = np.asarray(edit.prepare_image(Image.fromarray(rgba, "RGBA")))
  assert out.dtype == np.uint8 and out.shape == (4, 4, 3)
  assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 1]) == (255, 255, 255)
  assert abs(int(out[0, 2, 0]) - 127) <= 1

  la = Image.fromarray(np.stack([np.full((2, 2), 40, np.uint8), np.zeros((2, 2), np.uint8)], -1),
                       "LA")
  assert (np.asarray(edit.prepare_image(la)) == 255).all()
  grey = np.asarray(edit.prepare_image(Image.fromarray(np.full((2, 3), 77, np.uint8), "L")))
  assert grey.shape == (2, 3, 3) and (grey == 77).all()

  palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
  palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
  palette.info["transparency"] = 0
  assert np.asarray(edit.prepare_image(palette)).tolist() == [[[255, 255, 255], [200, 100, 50]]]

  cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red ink-wise
  assert tuple(np.asarray(edit.prepare_image(cmyk))[0, 0]) == (255, 0, 0)

  sixteen = np.array([[0, 257 * 100, 65535]], np.uint16)
  path = tmp_path / "sixteen.png"
  Image.fromarray(sixteen).save(path)
  loaded = edit.load_image(path)
  assert np.asarray(loaded)[0, :, 0].tolist() == [0, 100, 255]

  floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
  assert np.asarray(edit.prepare_image(floats))[0, :, 1].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
  image = np.zeros((20, 30, 3), np.uint8)
  image[:, :5] = 255  # a white band on the left
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90° clockwise to display"
  path = tmp_path / "rotated.png"
  Image.fromarray(image).save(path, exif=exif)
  loaded = np.asarray(edit.load_image(path))
  assert loaded.shape == (30, 20, 3)
  assert (loaded[:5] == 255).all() and (loaded[5:] == 0).all()  # the band is now on top


# ------------------------------------------------------------------------------ errors


def png_header(width, height):
  """A PNG whose header claims width × height (only the header is ever read)."""
  def chunk(kind, payload):
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))
  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
          + chunk(b"IDAT", zlib.compress(b"\x00" * 8)) + chunk(b"IEND", b""))


def bad_files(folder):
  """name → (path, words the error must contain): each a way an image file can be unusable."""
  photo = folder / "photo.png"
  Image.fromarray(skdata.astronaut()).save(photo)
  cases = {}
  (folder / "notes.png").write_text("this is not an image\n")
  cases["not an image"] = (folder / "notes.png", "not a readable image")
  (folder / "truncated.png").write_bytes(photo.read_bytes()[:len(photo.read_bytes()) // 2])
  cases["truncated"] = (folder / "truncated.png", "not a readable image")
  (folder / "empty.png").write_bytes(b"")
  cases["empty file"] = (folder / "empty.png", "empty")
  (folder / "zero.png").write_bytes(png_header(0, 10))
  cases["zero width"] = (folder / "zero.png", "not a readable image")
  (folder / "huge.png").write_bytes(png_header(8000, 6000))
  cases["48 megapixels"] = (folder / "huge.png", "megapixels")
  (folder / "bomb.png").write_bytes(png_header(20000, 20000))
  cases["400 megapixels"] = (folder / "bomb.png", "megapixels")
  cases["missing"] = (folder / "missing.png", "no such file")
  return cases


def test_bad_image_files_raise_input_errors_naming_them(tmp_path, editor):
  for what, (path, words) in bad_files(tmp_path).items():
    with pytest.raises(InputError) as e:
      edit.load_image(path)
    assert str(path) in str(e.value) and words in str(e.value), what
    with pytest.raises(InputError, match=str(path)):
      editor([str(path)], ["make it red"], steps=2, resolution=64)


def test_bad_in_memory_inputs_raise_input_errors(editor, photos):
  kw = dict(steps=2, resolution=64)
  for image in (Image.new("RGB", (0, 10)), np.zeros((0, 5, 3), np.uint8)):
    with pytest.raises(InputError, match="empty"):
      editor([image], ["x"], **kw)
  with pytest.raises(InputError, match="megapixels"):
    editor([Image.new("L", (8000, 6000))], ["x"], **kw)
  with pytest.raises(InputError, match="uint8"):
    editor([np.zeros((8, 8, 3), np.float32)], ["x"], **kw)
  for instruction in (5, None, b"bytes", ["nested"]):
    with pytest.raises(InputError, match="instruction must be text"):
      editor(photos, ["fine", instruction], **kw)
  with pytest.raises(InputError, match="2 images and 3 instructions"):
    editor(photos, ["a", "b", "c"], **kw)
  with pytest.raises(InputError, match="megapixels"):  # 1×100000: a 64×6,400,000 edit
    edit.preprocess(Image.new("RGB", (1, 100000)), 512)
  with pytest.raises(InputError, match="noise of shape"):
    editor(photos[:1], ["x"], noise=np.zeros((1, 8, 8, 4), np.float32), **kw)


def test_bad_settings_raise_config_errors(editor, photos):
  for kwargs in ({"steps": 0}, {"resolution": 32}, {"batch_size": 0}, {"sampler": "heun"},
                 {"schedule": "cosine"}, {"text_guidance": float("nan")}, {"seed": -1},
                 {"seed": edit.MAX_SEED}, {"output_type": "tensor"}):
    with pytest.raises(ConfigError):
      editor(photos, "x", **{"steps": 2, "resolution": 64, **kwargs})


def test_text_to_image_model_is_refused_with_the_way_out(tmp_path, t2i_folder, photos):
  with pytest.raises(CheckpointError, match="expand_conv_in") as e:
    edit.Editor.from_pretrained(t2i_folder)(photos, "make it snowy", steps=2, resolution=64)
  assert "4 input channels" in str(e.value) and "InstructPix2Pix" in str(e.value)
  with pytest.raises(CheckpointError, match="model_index.json"):
    edit.Editor.from_pretrained(str(tmp_path))
  with pytest.raises(CheckpointError, match="jip2p-convert"):
    edit.Editor.from_pretrained(f"{t2i_folder}/model_index.json")


# ------------------------------------------------------------------------------ non-finite, warnings


def nan_weights(module) -> None:
  """Sets every parameter of ``module`` to NaN, in place."""
  params = nnx.state(module, nnx.Param)
  nnx.update(module, jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params))


@pytest.mark.parametrize("part,stage", [
    (lambda p: p.text_encoder, "text encoder"), (lambda p: p.vae.encoder, "VAE encoder"),
    (lambda p: p.unet, "UNet/sampler"), (lambda p: p.vae.decoder, "VAE decoder")])
def test_nan_weights_stop_the_edit_naming_the_stage(folder, photos, part, stage):
  """The first stage whose output is not finite is named (later stages only inherit the NaN)."""
  pipeline = checkpoints.load_pipeline(folder)
  nan_weights(part(pipeline))
  broken = edit.Editor(pipeline)
  with pytest.raises(CheckpointError, match=f"the {stage} produced NaN or inf") as e:
    broken(photos, "make it snowy", steps=2, resolution=64, batch_size=2)
  assert "image 0, image 1" in str(e.value)


def test_long_instructions_and_animated_images_warn_once_each(editor, photos, tmp_path):
  frames = [Image.fromarray(np.full((64, 64, 3), v, np.uint8)) for v in (0, 255)]
  gif = tmp_path / "blink.gif"
  frames[0].save(gif, save_all=True, append_images=frames[1:])
  long = "make it " + "very " * 80 + "snowy"
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    [first] = editor([str(gif)], [""], resolution=64, output_type="np")
    editor(photos + photos, [long, "short", long, "short"], steps=1, resolution=64)
  messages = [str(w.message) for w in caught if w.category is Jip2pWarning]
  assert len(messages) == 2, messages
  assert messages[0] == f"{gif}: an animated image of 2 frames; editing its first frame"
  tokens = len(editor.pipeline.tokenizer.encode(long))
  assert tokens > 75 and f"has {tokens} tokens; the text encoder reads the first 75" in messages[1]
  assert first.max() == 0  # the first frame (black), not the second
