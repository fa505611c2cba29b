"""jip2p's paired generation against a PyTorch reference on one random tiny SD folder (float32,
32 px, 6 steps): diffusers models with attention processors implementing InstructPix2Pix's
self-attention sharing and Prompt-to-Prompt's Replace (+ LocalBlend), driven by the reference's
Euler-ancestral loop with the very noises jip2p draws. Same pairs within 2/255 per pixel."""

import jax.numpy as jnp
import numpy as np

from jip2p.diffusion import schedules
from jip2p.p2p import align, sampling
from tests.p2p import torch_reference
from tests.p2p.conftest import STEPS

TOLERANCE = 2  # uint8 levels


def reference_inputs(pipeline, generator, pairs, seeds):
  tok = pipeline.tokenizer
  seeds_u32 = jnp.asarray(np.asarray(seeds, np.uint32))
  shape = generator.latent_shape
  to_nchw = lambda a: np.ascontiguousarray(np.moveaxis(np.asarray(a), -1, -3))
  schedule = generator.schedule
  return dict(
      tokens=tok([c for pair in pairs for c in pair]), null_tokens=tok([""]),
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
  inputs = reference_inputs(pipeline, generator, pairs, seeds)
  pipe = sd_folder[1]
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
  inputs = reference_inputs(pipeline, generator, [pair, pair], seeds)
  pipe = sd_folder[1]
  ref = torch_reference.generate(pipe, controller, cfg_scale=cfg, **inputs)
  assert_same_pairs(result.images, ref)
  # The edits matter: LocalBlend changes image 1 only; without any edit image 1 differs.
  np.testing.assert_array_equal(ref[0, 0], ref[1, 0])
  assert np.abs(ref[0, 1].astype(int) - ref[1, 1]).max() > 10 * TOLERANCE
  no_edit = sampling.P2POptions(edit="none", cross_replace_steps=0.0, self_replace_steps=0.0,
                                blend_words=(["cat"], ["hippopotamus"]), blend_threshold=-1.0)
  plain = generator([pair, pair], seeds, mode="p2p", p2p=no_edit).images
  assert np.abs(plain[0, 1].astype(int) - ref[0, 1]).max() > 10 * TOLERANCE
