"""The Editor on SDXL InstructPix2Pix models: parity with diffusers'
``StableDiffusionXLInstructPix2PixPipeline`` (both text encoders, pooled text, micro-conditioning,
the null text as zeros or as the encoded ""), and the micro-conditioning options' errors. Uses
torch (diffusers), never TensorFlow."""

import json
import os

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from skimage import data as skdata

from jip2p import edit
from jip2p.errors import CheckpointError, ConfigError
from tests.reference import assert_pairwise_different, torch_sdxl_pipeline

STEPS = 3
GUIDANCE = [(7.5, 1.5), (2.0, 1.0), (4.0, 2.5)]
SIZE = (128, 64)  # (width, height): a non-square edit
INSTRUCTIONS = ["make it a watercolour painting", "turn the cat into a tiger"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("sdxl") / "pipe")
  torch_sdxl_pipeline(seed=1).save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def editor(folder):
  return edit.Editor.from_pretrained(folder)


@pytest.fixture(scope="module")
def photos():
  """Two real photos centre-fitted to 128×64."""
  return [ImageOps.fit(Image.fromarray(photo), SIZE, method=Image.Resampling.LANCZOS)
          for photo in (skdata.astronaut(), skdata.chelsea())]


def _reference(folder, **kwargs):
  pipe = diffusers.StableDiffusionXLInstructPix2PixPipeline.from_pretrained(folder, **kwargs)
  pipe.set_progress_bar_config(disable=True)
  return pipe


def _noise(editor):
  return np.random.RandomState(0).standard_normal(
      (2,) + editor.noise_shape(*SIZE)).astype(np.float32)


def _run_both(pipe, editor, photos, text_scale, image_scale, micro=None, reference_only=None,
              schedule="diffusers_euler"):
  micro = micro or {}
  noise = _noise(editor)
  width, height = SIZE
  with torch.no_grad():
    ref = pipe(INSTRUCTIONS, image=photos, num_inference_steps=STEPS, guidance_scale=text_scale,
               image_guidance_scale=image_scale, height=height, width=width, output_type="np",
               latents=torch.from_numpy(noise.transpose(0, 3, 1, 2)), **micro,
               **(reference_only or {})).images
  ours = np.stack(editor(photos, INSTRUCTIONS, steps=STEPS, text_guidance=text_scale,
                         image_guidance=image_scale, resolution=None, sampler="euler",
                         schedule=schedule, batch_size=2, noise=noise,
                         output_type="np", **micro))
  assert ours.shape == ref.shape == (2, height, width, 3)
  return ours, ref


def test_matches_diffusers_sdxl_pipeline(folder, editor, photos):
  """Same folder (EulerDiscreteScheduler, "leading" spacing), same initial latents: images within
  2/255 for several guidance pairs, a non-square size, two images and instructions in a batch."""
  assert editor.sdxl and editor.zero_null_text
  assert json.load(open(os.path.join(folder, "model_index.json")))[
      "force_zeros_for_empty_prompt"] is True
  pipe = _reference(folder)
  results = []
  for text_scale, image_scale in GUIDANCE:
    ours, ref = _run_both(pipe, editor, photos, text_scale, image_scale)
    err = np.abs(ours - ref).max()
    assert err <= 2 / 255, f"s_T={text_scale}, s_I={image_scale}: max error {err * 255:.2f}/255"
    results.append(ours)
  # The guidance pairs lead to visibly different images, so the agreement above is about them.
  assert_pairwise_different(results, GUIDANCE)


def test_micro_conditioning_matches_diffusers(folder, editor, photos):
  """Given original size, crop and target size reach the UNet as diffusers' do, and change the
  image (so the default's agreement above is not by chance)."""
  pipe = _reference(folder)
  micro = dict(original_size=(300, 500), crops_coords_top_left=(16, 8), target_size=(64, 96))
  ours, ref = _run_both(pipe, editor, photos, 7.5, 1.5, micro)
  assert np.abs(ours - ref).max() <= 2 / 255
  default, _ = _run_both(pipe, editor, photos, 7.5, 1.5)
  assert np.abs(ours - default).max() > 4 / 255


def test_encoded_empty_prompt_as_the_null_text(folder, editor, photos, tmp_path):
  """A folder whose model_index.json says force_zeros_for_empty_prompt: false takes the encoded
  "" as its null text, in diffusers and in jip2p alike; the result differs from the zeros'."""
  pipe = _reference(folder, force_zeros_for_empty_prompt=False)
  pipe.save_pretrained(tmp_path / "empty")
  encoded = edit.Editor.from_pretrained(tmp_path / "empty")
  assert not encoded.zero_null_text
  # diffusers refuses its own default negative prompt "" beside a list of prompts: one per prompt.
  ours, ref = _run_both(pipe, encoded, photos, 7.5, 1.5,
                        reference_only={"negative_prompt": [""] * len(INSTRUCTIONS)})
  assert np.abs(ours - ref).max() <= 2 / 255
  zeros, _ = _run_both(_reference(folder), editor, photos, 7.5, 1.5)
  assert np.abs(ours - zeros).max() > 4 / 255


def test_time_ids_defaults():
  np.testing.assert_array_equal(edit.time_ids(64, 128), [64, 128, 0, 0, 64, 128])
  np.testing.assert_array_equal(edit.time_ids(64, 128, (1, 2), (3, 4), (5, 6)), [1, 2, 3, 4, 5, 6])


@pytest.mark.parametrize("key,value", [
    ("original_size", (512,)), ("target_size", (1, 2, 3)), ("crops_coords_top_left", "00"),
    ("original_size", (512.0, 512)), ("crops_coords_top_left", (-1, 0)),
    ("target_size", 1024)])
def test_wrong_micro_conditioning_is_one_line(editor, photos, key, value):
  with pytest.raises(ConfigError, match=f"^{key} must be .*: two integers ≥ 0, got") as info:
    editor(photos, "x", steps=1, resolution=None, **{key: value})
  assert "\n" not in str(info.value)


def test_sd_model_refuses_micro_conditioning_and_sdxl_refuses_sdedit(editor, photos, tmp_path):
  from tests.reference import save_torch_pipeline
  sd = edit.Editor.from_pretrained(save_torch_pipeline(str(tmp_path / "sd"), "tiny"))
  with pytest.raises(ConfigError, match="original_size: micro-conditioning is for SDXL models"):
    sd(photos, "x", steps=1, resolution=64, original_size=(64, 64))
  with pytest.raises(CheckpointError, match="is an SDXL model; SDEdit runs"):
    editor.check_method("sdedit")


COSXL_SCHEDULER = {"sigma_min": 0.002, "sigma_max": 120.0, "sigma_data": 1.0,
                   "prediction_type": "v_prediction", "sigma_schedule": "exponential"}


def test_cosxl_edit_matches_diffusers(folder, photos, tmp_path):
  """CosXL Edit: the tiny SDXL model with CosXL's EDMEulerScheduler (v-prediction, σ_data 1,
  exponential σ) and scaled image latents (``is_cosxl_edit: true`` in model_index.json, which
  diffusers' pipeline passes to its __init__ though its save omits it) — the folder's defaults
  edit within 2/255 of diffusers' pipeline at two guidance pairs; unscaled image latents (the
  folder without the flag, as diffusers) give another image."""
  pipe = _reference(folder, scheduler=diffusers.EDMEulerScheduler(**COSXL_SCHEDULER))
  pipe.save_pretrained(tmp_path / "cosxl")
  index_path = tmp_path / "cosxl" / "model_index.json"
  unscaled = edit.Editor.from_pretrained(tmp_path / "cosxl")
  assert not unscaled.is_cosxl_edit and unscaled.default_schedule == "edm"
  index_path.write_text(json.dumps({**json.loads(index_path.read_text()), "is_cosxl_edit": True}))
  pipe = _reference(tmp_path / "cosxl")
  assert pipe.is_cosxl_edit and type(pipe.scheduler).__name__ == "EDMEulerScheduler"
  cosxl = edit.Editor.from_pretrained(tmp_path / "cosxl")
  assert cosxl.is_cosxl_edit and cosxl.default_schedule == "edm"
  for text_scale, image_scale in [(7.5, 1.5), (4.0, 2.5)]:
    ours, ref = _run_both(pipe, cosxl, photos, text_scale, image_scale, schedule=None)
    err = np.abs(ours - ref).max()
    assert err <= 2 / 255, f"s_T={text_scale}, s_I={image_scale}: max error {err * 255:.2f}/255"
  other, _ = _run_both(pipe, unscaled, photos, 4.0, 2.5, schedule=None)
  assert np.abs(other - ours).max() > 4 / 255
  with pytest.raises(ConfigError, match="its scheduler is EDM's"):
    cosxl(photos, "x", steps=1, resolution=None, schedule="discrete")
