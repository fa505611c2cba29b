"""jip2p's paired generation against a PyTorch reference on one random tiny SD folder and one tiny
SDXL folder (float32, 32 px, 6 steps): diffusers models with attention processors implementing
InstructPix2Pix's self-attention sharing and Prompt-to-Prompt's Replace, Refine and Reweight
(+ LocalBlend), driven by the reference's Euler-ancestral loop with the very noises jip2p draws;
the SDXL one conditioned by diffusers' SDXL pipeline itself (both encoders, pooled text, time
ids, zeros for the empty caption). Same pairs within 2/255 per pixel."""

import jax.numpy as jnp
import numpy as np

from jip2p.diffusion import schedules
from jip2p.p2p import align, sampling
from tests.p2p import torch_reference
from tests.p2p.conftest import STEPS

TOLERANCE = 2  # uint8 levels


def reference_inputs(pipe, generator, pairs, seeds):
  """The reference's inputs: the torch pipeline's conditioning of the pairs and jip2p's noises."""
  captions = [c for pair in pairs for c in pair]
  if hasattr(pipe, "text_encoder_2"):
    conditioning = torch_reference.sdxl_conditioning(pipe, captions, generator.height,
                                                     generator.width)
  else:
    tok = generator.tokenizer
    conditioning = torch_reference.sd_conditioning(pipe, tok(captions), tok([""]))
  seeds_u32 = jnp.asarray(np.asarray(seeds, np.uint32))
  shape = generator.latent_shape
  to_nchw = lambda a: np.ascontiguousarray(np.moveaxis(np.asarray(a), -1, -3))
  schedule = generator.schedule
  return dict(
      conditioning=conditioning,
      noise=to_nchw(sampling.initial_noise(seeds_u32, shape)),
      step_noises=np.stack([to_nchw(sampling.step_noise(seeds_u32, i, shape))
                            for i in range(STEPS)]),
      sigmas=np.asarray(schedule.sigmas), timesteps=np.asarray(schedule.timesteps))


def assert_same_pairs(ours, ref):
  assert ours.shape == ref.shape
  err = np.abs(ours.astype(int) - ref.astype(int)).max()
  assert err <= TOLERANCE, f"max abs pixel error {err}/255"
  assert ((ref > 0) & (ref < 255)).mean() > 0.5  # not saturated, so the comparison means something


def test_the_schedule_is_the_reference_discrete_grid(generator, pipeline):
  config = schedules.from_scheduler_config(pipeline.scheduler_config)
  np.testing.assert_allclose(generator.schedule.timesteps, np.linspace(999, 0, STEPS),
                             rtol=1e-6)
  assert generator.schedule.sigmas[-1] == 0
  np.testing.assert_allclose(generator.schedule.sigmas[0],
                             np.sqrt(1 / config.alphas_cumprod()[-1] - 1), rtol=1e-6)


def test_ip2p_matches_the_reference(sd_folder, pipeline, generator):
  # Six candidates, the batch size of test_generate's, so that the program compiles once.
  pairs = [("a photo of a cat", "a watercolor painting of a cat"),
           ("a red car on a road", "a blue car in the snow"),
           ("a house by a lake", "a house by a lake at night")] * 2
  seeds = [2, 4, 8, 15, 16, 22]  # p from 0.60 to 0.90: sharing for 3 to 5 of the 6 steps.
  result = generator(pairs, seeds)
  p, cfg = sampling.candidate_draws(seeds)
  np.testing.assert_array_equal(result.p, p)
  np.testing.assert_array_equal(result.cfg_scale, cfg)
  pipe = sd_folder[1]
  inputs = reference_inputs(pipe, generator, pairs, seeds)
  controller = torch_reference.Controller(6, STEPS, p=p)
  ref = torch_reference.generate(pipe, controller, cfg_scale=cfg, **inputs)
  assert_same_pairs(result.images, ref)
  # Sharing matters: without it image 1 is another image.
  unshared = generator(pairs, seeds, p=0.0).images
  assert np.abs(unshared[:, 0].astype(int) - ref[:, 0]).max() <= TOLERANCE
  assert np.abs(unshared[:, 1].astype(int) - ref[:, 1]).max() > 10 * TOLERANCE


def test_p2p_replace_and_local_blend_match_the_reference(sd_folder, pipeline, generator):
  """A word swap that changes the token count (cat → hippo·potam·us); candidate 1 also blends,
  with a threshold of 0.9: random weights attend almost evenly, so 0.3 would keep everything."""
  pair = ("a cat on a mat", "a hippopotamus on a mat")
  seeds = [5, 5]
  options = [sampling.P2POptions(cross_replace_steps=0.8, self_replace_steps=0.4),
             sampling.P2POptions(cross_replace_steps=0.8, self_replace_steps=0.4,
                                 blend_words=(["cat"], ["hippopotamus"]), blend_threshold=0.9)]
  result = generator([pair, pair], seeds, mode="p2p", p2p=options)
  _, cfg = sampling.candidate_draws(seeds)

  tok, length = pipeline.tokenizer, pipeline.tokenizer.max_length
  mapper = align.replacement_mapper(tok, *pair)
  # The reference's windows: cross steps [⌊0·(N+1)⌋, ⌊0.8·(N+1)⌋) = [0, 5), self [0, ⌊0.4·N⌋).
  cross_alpha = np.zeros((2, STEPS, length), np.float32)
  cross_alpha[:, :5] = 1.0
  blend_alpha = np.zeros((2, length), np.float32)
  blend_alpha[0, 2], blend_alpha[1, [2, 3, 4]] = 1.0, 1.0
  controller = torch_reference.Controller(
      2, STEPS, mapper=np.stack([mapper, mapper]), cross_alpha=cross_alpha,
      self_window=[(0, 2), (0, 2)], self_max_pixels=8 * 8, blend_alpha=[None, blend_alpha],
      blend_hw=(8, 8), threshold=0.9)
  pipe = sd_folder[1]
  inputs = reference_inputs(pipe, generator, [pair, pair], seeds)
  ref = torch_reference.generate(pipe, controller, cfg_scale=cfg, **inputs)
  assert_same_pairs(result.images, ref)
  # The edits matter: LocalBlend changes image 1 only; without any edit image 1 differs.
  np.testing.assert_array_equal(ref[0, 0], ref[1, 0])
  assert np.abs(ref[0, 1].astype(int) - ref[1, 1]).max() > 10 * TOLERANCE
  no_edit = sampling.P2POptions(edit="none", cross_replace_steps=0.0, self_replace_steps=0.0,
                                blend_words=(["cat"], ["hippopotamus"]), blend_threshold=-1.0)
  plain = generator([pair, pair], seeds, mode="p2p", p2p=no_edit).images
  assert np.abs(plain[0, 1].astype(int) - ref[0, 1]).max() > 10 * TOLERANCE


def test_sdxl_ip2p_matches_the_reference(sdxl_folder, sdxl_generator):
  """Attention sharing at every self-attention layer of SDXL's layout (several transformer layers
  per block, per-block heads, the mid block), conditioned as diffusers' SDXL pipeline."""
  pairs = [("a photo of a cat", "a watercolor painting of a cat"),
           ("a red car on a road", "a blue car in the snow")]
  seeds = [2, 15]  # p 0.60 and 0.88: sharing for 4 and 5 of the 6 steps.
  result = sdxl_generator(pairs, seeds)
  p, cfg = sampling.candidate_draws(seeds)
  pipe = sdxl_folder[1]
  inputs = reference_inputs(pipe, sdxl_generator, pairs, seeds)
  ref = torch_reference.generate(pipe, torch_reference.Controller(2, STEPS, p=p), cfg_scale=cfg,
                                 **inputs)
  assert_same_pairs(result.images, ref)
  unshared = sdxl_generator(pairs, seeds, p=0.0).images
  assert np.abs(unshared[:, 0].astype(int) - ref[:, 0]).max() <= TOLERANCE
  assert np.abs(unshared[:, 1].astype(int) - ref[:, 1]).max() > 10 * TOLERANCE


def test_sdxl_p2p_replace_refine_reweight_and_local_blend_match_the_reference(sdxl_folder,
                                                                           sdxl_generator):
  """One batch: a word swap changing the token count; the same swap reweighted (×3 on the new
  word) and blended (threshold 0.9, see the SD test); a refinement adding words. The maps
  LocalBlend reads are the 4×4 layers of down_blocks.2 and up_blocks.0 (3 transformer layers
  each), not the mid block's beside them."""
  swap = ("a cat on a mat", "a hippopotamus on a mat")
  refine = ("a cat on a mat", "a fluffy cat on a red mat")
  pairs, seeds = [swap, swap, refine], [5, 5, 5]
  windows = dict(cross_replace_steps=0.8, self_replace_steps=0.4)
  options = [sampling.P2POptions(edit="replace", **windows),
             sampling.P2POptions(edit="replace", reweight={"hippopotamus": 3.0},
                                 blend_words=(["cat"], ["hippopotamus"]), blend_threshold=0.9,
                                 **windows),
             sampling.P2POptions(edit="refine", **windows)]
  result = sdxl_generator(pairs, seeds, mode="p2p", p2p=options)
  _, cfg = sampling.candidate_draws(seeds)

  tok = sdxl_generator.tokenizer
  length = tok.max_length
  mapper = align.replacement_mapper(tok, *swap)
  equalizer = np.ones((3, length), np.float32)
  equalizer[1, [2, 3, 4]] = 3.0  # hippo·potam·us
  cross_alpha = np.zeros((3, STEPS, length), np.float32)
  cross_alpha[:, :5] = 1.0  # [⌊0·(N+1)⌋, ⌊0.8·(N+1)⌋)
  blend_alpha = np.zeros((2, length), np.float32)
  blend_alpha[0, 2], blend_alpha[1, [2, 3, 4]] = 1.0, 1.0
  controller = torch_reference.Controller(
      3, STEPS, mapper=np.stack([mapper, mapper, mapper]), cross_alpha=cross_alpha,
      self_window=[(0, 2)] * 3, self_max_pixels=4 * 4, blend_alpha=[None, blend_alpha, None],
      blend_hw=(4, 4), threshold=0.9, refine=[None, None, align.refinement_mapper(tok, *refine)],
      equalizer=equalizer)
  pipe = sdxl_folder[1]
  ref = torch_reference.generate(pipe, controller, cfg_scale=cfg,
                                 **reference_inputs(pipe, sdxl_generator, pairs, seeds))
  assert_same_pairs(result.images, ref)
  # Each edit matters: reweighting and blending change image 1 only; without edits (the same
  # program: blend words, a threshold keeping everything) every image 1 differs.
  np.testing.assert_array_equal(ref[0, 0], ref[1, 0])
  assert np.abs(ref[0, 1].astype(int) - ref[1, 1]).max() > 10 * TOLERANCE
  no_edit = [sampling.P2POptions(edit="none", cross_replace_steps=0.0, self_replace_steps=0.0,
                                 blend_words=(["cat"], [word]), blend_threshold=-1.0)
             for word in ("hippopotamus", "hippopotamus", "cat")]
  plain = sdxl_generator(pairs, seeds, mode="p2p", p2p=no_edit).images
  for k in range(3):
    assert np.abs(plain[k, 1].astype(int) - ref[k, 1]).max() > 10 * TOLERANCE, k
