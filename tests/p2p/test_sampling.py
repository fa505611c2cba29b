"""Paired sampling on the tiny random pipeline of conftest.py (32 px, 6 steps): what ip2p
sharing does and when, candidate independence, LocalBlend's wiring, the attention maps and heat
maps. Torch only builds the model folder; never TensorFlow."""

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jip2p.errors import ConfigError, InputError
from jip2p.models.unet import UNetConfig
from jip2p.p2p import control, sampling
from tests.p2p.conftest import STEPS

C0, C1 = "a photo of a cat", "a watercolor painting of a dog"


@pytest.fixture(scope="module")
def ip2p_batch(generator):
  """One batch: (c0, c1) and the captions alone at p = 0, identical captions and (c0, c1) at
  p = 1, all from one seed, plus another seed."""
  pairs = [(C0, C1), (C0, C0), (C1, C1), (C0, C0), (C0, C1), (C0, C1)]
  return generator(pairs, [7, 7, 7, 7, 7, 8], p=[0, 0, 0, 1, 1, 0.5], cfg_scale=9.0)


def test_output_shapes_and_content(ip2p_batch):
  images = ip2p_batch.images
  assert images.shape == (6, 2, 32, 32, 3) and images.dtype == np.uint8
  assert images.std() > 5  # not a constant image.
  np.testing.assert_array_equal(ip2p_batch.p, [0, 0, 0, 1, 1, 0.5])
  np.testing.assert_array_equal(ip2p_batch.cfg_scale, np.full(6, 9.0, np.float32))
  assert ip2p_batch.attention is None


def test_p1_identical_captions_give_identical_images(ip2p_batch):
  np.testing.assert_array_equal(ip2p_batch.images[3, 0], ip2p_batch.images[3, 1])


def test_p0_pair_equals_two_independent_generations(ip2p_batch):
  images = ip2p_batch.images
  np.testing.assert_array_equal(images[0, 0], images[1, 0])  # c0 alone, same noise
  np.testing.assert_array_equal(images[0, 1], images[2, 0])  # c1 alone, same noise
  np.testing.assert_array_equal(images[1, 0], images[1, 1])
  assert np.abs(images[0, 0].astype(int) - images[0, 1]).max() > 20  # the captions matter


def test_sharing_changes_image1_only(ip2p_batch):
  images = ip2p_batch.images.astype(int)
  np.testing.assert_array_equal(images[4, 0], images[0, 0])
  assert np.abs(images[4, 1] - images[0, 1]).max() > 10
  assert np.abs(images[5, 0] - images[0, 0]).max() > 20  # another seed, another image


def test_draws_come_from_the_seed():
  p, cfg = sampling.candidate_draws([7, 8, 7], min_p=0.2, max_p=0.3, min_cfg=5, max_cfg=6)
  assert p[0] == p[2] and p[0] != p[1] and cfg[0] == cfg[2]
  assert ((0.2 <= p) & (p <= 0.3)).all() and ((5 <= cfg) & (cfg <= 6)).all()
  default_p, default_cfg = sampling.candidate_draws(np.arange(200))
  assert 0.1 <= default_p.min() and default_p.max() <= 0.9 and default_p.std() > 0.15
  assert 7.5 <= default_cfg.min() and default_cfg.max() <= 15 and default_cfg.std() > 1.5
  noise = sampling.initial_noise(jnp.array([7, 8, 7], jnp.uint32), (4, 4, 4))
  np.testing.assert_array_equal(noise[0], noise[2])
  steps = sampling.step_noise(jnp.array([7, 7], jnp.uint32), 3, (4, 4, 4))
  assert not np.array_equal(steps[0], noise[0])


@pytest.fixture(scope="module")
def instrumented(pipeline):
  """A run whose sharing controller reports, per call, the step, layer, whether it shared and
  whether image 1's logits equal image 0's before and after its edit."""
  calls = []
  original = control.SelfAttentionSharing.edit_logits

  def recording(self, logits, info):
    out = original(self, logits, info)
    parts_in = control.split_halves(logits, self.p.shape[0])
    parts_out = control.split_halves(out, self.p.shape[0])
    equal = lambda parts: jnp.all(parts[:, :, 0] == parts[:, :, 1], axis=(2, 3, 4))  # [2, K]
    jax.debug.callback(
        lambda step, active, before, after: calls.append(
            (int(step), info.name, info.is_cross, np.asarray(active), np.asarray(before),
             np.asarray(after))),
        self.step, self.active(), equal(parts_in), equal(parts_out))
    return out

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(control.SelfAttentionSharing, "edit_logits", recording)
    generator = sampling.PairGenerator(pipeline, steps=STEPS, height=32, width=32)
    p = np.array([0.0, 0.45, 0.61, 1.0], np.float32)
    result = generator([(C0, C1)] * 4, [7] * 4, p=p, cfg_scale=9.0)
  return calls, p, result


def test_sharing_happens_exactly_while_p_exceeds_the_step_fraction(instrumented):
  calls, p, _ = instrumented
  self_layers = {name for _, name, cross, *_ in calls if not cross}
  cross_layers = {name for _, name, cross, *_ in calls if cross}
  # The UNet's attention: down_blocks.0 and .1 (1 each), the mid block, up_blocks.1 and .2 (2
  # each); every resolution shares.
  assert len(self_layers) == len(cross_layers) == 7
  assert any(name.startswith("mid_block") for name in self_layers)
  assert any(name.startswith("down_blocks.0") for name in self_layers)
  assert sorted({c[0] for c in calls}) == list(range(STEPS))
  assert len(calls) == STEPS * 14
  rule = p[None, :] > np.arange(STEPS)[:, None] / (STEPS - 1)
  assert rule.sum(axis=0).tolist() == [0, 3, 4, 5]
  for step, name, cross, active, before, after in calls:
    if step > 0:
      # From step 1 on the two images' latents differ, and so do their logits.
      assert not before.any(), (step, name)
    if cross:
      np.testing.assert_array_equal(after, before)  # cross-attention untouched
      continue
    np.testing.assert_array_equal(active, rule[step])
    for k in range(4):
      # Both guidance halves share exactly when the rule says.
      expected = [True, True] if rule[step, k] else before[:, k].tolist()
      assert after[:, k].tolist() == expected, (step, name, k)


def test_a_candidate_does_not_depend_on_its_batch(instrumented, ip2p_batch):
  _, _, result = instrumented
  # Same seed, captions, p (0, then 1) and scale as candidates 0 and 4 of the batch of six.
  for ours, theirs in ((0, 0), (3, 4)):
    assert np.abs(result.images[ours].astype(int) - ip2p_batch.images[theirs]).max() <= 1


def test_p2p_local_blend_and_attention_maps(generator):
  """Threshold 1 keeps nothing of image 1 (the mask is empty: image 1 = image 0 exactly); −1
  blends nothing away; the returned maps are distributions over the 77 tokens."""
  options = [sampling.P2POptions(blend_words=(["cat"], ["dog"]), blend_threshold=t)
             for t in (1.0, -1.0)]
  pair = ("a photo of a cat", "a photo of a dog")
  result = generator([pair, pair], [3, 3], mode="p2p", p2p=options, cfg_scale=9.0,
                     return_attention=True)
  np.testing.assert_array_equal(result.images[0, 0], result.images[0, 1])
  np.testing.assert_array_equal(result.images[1, 0], result.images[0, 0])
  assert np.abs(result.images[1, 1].astype(int) - result.images[1, 0]).max() > 10
  assert result.attention.shape == (2, 2, 8, 8, 77)  # the coarsest down/up level
  np.testing.assert_allclose(result.attention.sum(-1), 1.0, rtol=1e-5)


def test_show_attention_writes_heat_maps(pipeline, tmp_path):
  paths = sampling.show_attention(pipeline, "a red car", tmp_path, seed=1, steps=3)
  names = [os.path.basename(p) for p in paths]
  assert names == ["image.png", "00_startoftext.png", "01_a.png", "02_red.png", "03_car.png",
                   "04_endoftext.png", "attention.png"]
  assert Image.open(paths[1]).size == (32, 32)  # the model's default size
  assert Image.open(paths[-1]).size == (5 * 32, 32 + 14)
  heat = [np.asarray(Image.open(p), np.int64) for p in paths[1:-1]]
  assert max(np.abs(heat[0] - h).max() for h in heat[1:]) > 20  # tokens attend differently


def test_bad_inputs_are_named(pipeline, generator):
  with pytest.raises(InputError, match="2 prompt pairs but 1 seeds"):
    generator([(C0, C1)] * 2, [1])
  with pytest.raises(InputError, match="seeds must be in"):
    generator([(C0, C1)], [1 << 32])
  with pytest.raises(InputError, match="prompt pair 0"):
    generator(["just one caption"], [1])
  with pytest.raises(ConfigError, match="mode"):
    generator([(C0, C1)], [1], mode="sdedit")
  with pytest.raises(ConfigError, match="mode='p2p'"):
    generator([(C0, C1)], [1], p2p=sampling.P2POptions())
  with pytest.raises(InputError, match="same number of words"):
    generator([(C0, C1)], [1], mode="p2p")
  with pytest.raises(InputError, match="blend word 'dog'"):
    generator([(C0, C0)], [1], mode="p2p",
              p2p=sampling.P2POptions(blend_words=(["cat"], ["dog"])))
  with pytest.raises(ConfigError, match="Prompt-to-Prompt edit 'swap'"):
    generator([(C0, C0)], [1], mode="p2p", p2p=sampling.P2POptions(edit="swap"))
  with pytest.raises(InputError, match="one per candidate"):
    generator([(C0, C1)], [1], p=[0.1, 0.2])
  with pytest.raises(InputError, match="multiples of 8"):
    sampling.PairGenerator(pipeline, steps=2, height=36, width=32)
  ip2p_model = types.SimpleNamespace(unet=types.SimpleNamespace(config=UNetConfig(in_channels=8)),
                                     vae=pipeline.vae)
  with pytest.raises(ConfigError, match="text-to-image UNet"):
    sampling.PairGenerator(ip2p_model, steps=2)
