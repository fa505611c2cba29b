"""The controllers as pure functions: batch layout, the ip2p step rule, P2P's cross/self edits,
LocalBlend (against torch_reference's transcription of google/prompt-to-prompt's) and the
attention store.
Uses torch (LocalBlend reference), never TensorFlow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jip2p.checkpoints import preset_configs
from jip2p.models.attention import AttentionInfo
from jip2p.models.unet import UNetConfig
from jip2p.p2p import control
from tests.p2p import torch_reference

SELF = AttentionInfo("down_blocks.1.attentions.0.transformer_blocks.0.attn1", False, (8, 8))
CROSS = AttentionInfo("down_blocks.1.attentions.0.transformer_blocks.0.attn2", True, (8, 8))
MID_CROSS = AttentionInfo("mid_block.attentions.0.transformer_blocks.0.attn2", True, (8, 8))


def rows(k):
  """[4K, 3] rows whose values name (half, candidate, image)."""
  idx = np.arange(4 * k)
  return jnp.asarray(np.stack([idx // (2 * k), idx // 2 % k, idx % 2], axis=1), jnp.float32)


def test_batch_layout_and_copy_image0():
  x = rows(2)
  parts = control.split_halves(x, 2)
  assert parts.shape == (2, 2, 2, 3)
  np.testing.assert_array_equal(parts[1, 0, 1], [1, 0, 1])  # cond, candidate 0, image 1.
  np.testing.assert_array_equal(control.merge_halves(parts), x)
  both = np.asarray(control.copy_image0(x, jnp.array([True, False])))
  np.testing.assert_array_equal(both[[1, 5]], np.asarray(x)[[0, 4]])
  np.testing.assert_array_equal(np.delete(both, [1, 5], 0), np.delete(np.asarray(x), [1, 5], 0))
  cond = np.asarray(control.copy_image0(x, jnp.array([False, True]), halves=(1,)))
  np.testing.assert_array_equal(cond[7], np.asarray(x)[6])
  np.testing.assert_array_equal(np.delete(cond, 7, 0), np.delete(np.asarray(x), 7, 0))


def test_ip2p_rule_and_layers():
  n = 11
  share = control.SelfAttentionSharing(p=jnp.array([0.0, 0.5, 1.0, 0.73]), step=jnp.int32(0),
                                       num_steps=n)
  active_at = jax.jit(lambda c, i: c.at_step(i).active())  # controllers are pytrees
  active = np.stack([np.asarray(active_at(share, i)) for i in range(n)])
  expected = np.array([[p > i / (n - 1) for p in (0.0, 0.5, 1.0, 0.73)] for i in range(n)])
  np.testing.assert_array_equal(active, expected)
  assert active[:, 1].sum() == 5 and active[:, 2].sum() == 10 and not active[:, 0].any()

  logits = jax.random.normal(jax.random.key(0), (16, 2, 5, 5))
  at0 = share.at_step(0)
  shared = np.asarray(at0.edit_logits(logits, SELF)).reshape(2, 4, 2, 2, 5, 5)
  np.testing.assert_array_equal(shared[:, 1:3, 1], shared[:, 1:3, 0])  # both halves.
  np.testing.assert_array_equal(shared[:, 0], np.asarray(logits).reshape(2, 4, 2, 2, 5, 5)[:, 0])
  assert at0.edit_logits(logits, CROSS) is logits
  assert at0.edit_probs(logits, SELF) is logits


def test_single_step_shares_at_step_zero():
  one = control.SelfAttentionSharing(p=jnp.array([0.0, 0.1]), step=jnp.int32(0), num_steps=1)
  np.testing.assert_array_equal(one.active(), [False, True])


def _p2p(k=2, n=4, lq=6, window=((0, 2), (1, 4)), max_pixels=64, seed=0):
  rng = np.random.default_rng(seed)
  length = 7
  return control.PromptToPrompt(
      token_map=jnp.asarray(rng.uniform(size=(k, length, length)), jnp.float32),
      keep=jnp.asarray(rng.uniform(size=(k, length)), jnp.float32),
      equalizer=jnp.asarray(rng.uniform(0.5, 2, size=(k, length)), jnp.float32),
      cross_alpha=jnp.asarray(rng.integers(0, 2, size=(k, n, length)), jnp.float32),
      self_window=jnp.asarray(window, jnp.int32), step=jnp.int32(0),
      self_max_pixels=max_pixels)


def test_cross_attention_edit_formula():
  k, heads, lq, length = 2, 3, 6, 7
  p2p = _p2p()
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(1), (4 * k, heads, lq, length)))
  edit = jax.jit(lambda c, i, x: c.at_step(i).edit_probs(x, CROSS))
  for step in range(4):
    out = np.asarray(edit(p2p, step, probs)).reshape(2, k, 2, heads, lq, length)
    ref = np.asarray(probs).reshape(2, k, 2, heads, lq, length).copy()
    for c in range(k):
      base, own = ref[1, c, 0], ref[1, c, 1]
      m, keep, eq = (np.asarray(a[c]) for a in (p2p.token_map, p2p.keep, p2p.equalizer))
      alpha = np.asarray(p2p.cross_alpha[c, step])
      expected = np.zeros_like(own)
      for n in range(length):
        edited = (sum(base[..., w] * m[w, n] for w in range(length)) + keep[n] * own[..., n])
        expected[..., n] = alpha[n] * eq[n] * edited + (1 - alpha[n]) * own[..., n]
      ref[1, c, 1] = expected
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_self_attention_replacement_window_resolution_and_half():
  k = 2
  p2p = _p2p(max_pixels=64)
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(2), (4 * k, 2, 64, 64)))
  fine = AttentionInfo("down_blocks.0.attentions.0.transformer_blocks.0.attn1", False, (16, 16))
  probs_fine = jax.nn.softmax(jax.random.normal(jax.random.key(3), (4 * k, 2, 256, 256)))
  edit = jax.jit(lambda c, i, x, fine_x: (c.at_step(i).edit_probs(x, SELF),
                                          c.at_step(i).edit_probs(fine_x, fine)))
  for step in range(4):
    assert p2p.at_step(step).edit_logits(probs, SELF) is probs
    out, out_fine = edit(p2p, step, probs, probs_fine)
    np.testing.assert_array_equal(out_fine, probs_fine)
    out = np.asarray(out).reshape(2, k, 2, 2, 64, 64)
    ref = np.asarray(probs).reshape(2, k, 2, 2, 64, 64)
    np.testing.assert_array_equal(out[0], ref[0])  # unconditional half untouched.
    np.testing.assert_array_equal(out[:, :, 0], ref[:, :, 0])
    for c, (start, end) in enumerate(((0, 2), (1, 4))):
      expected = ref[1, c, 0] if start <= step < end else ref[1, c, 1]
      np.testing.assert_array_equal(out[1, c, 1], expected)


@pytest.mark.parametrize("latent_hw,maps_hw", [((16, 16), (8, 8)), ((12, 20), (3, 5))])
def test_local_blend_matches_the_reference(latent_hw, maps_hw):
  rng = np.random.default_rng(0)
  length, k = 77, 2
  # Peaked maps, so that the mask is a region and not everything or nothing.
  maps = rng.uniform(size=(k, 2, *maps_hw, length)).astype(np.float32) ** 8
  weights = np.zeros((k, 2, length), np.float32)
  weights[0, 0, 2], weights[0, 1, [2, 3]], weights[1, 0, 5], weights[1, 1, 5] = 1, 1, 1, 1
  x = rng.normal(size=(2 * k, *latent_hw, 4)).astype(np.float32)
  blend = control.LocalBlend(word_weights=jnp.asarray(weights),
                             threshold=jnp.full((k,), 0.3, jnp.float32))
  ours = np.asarray(blend(jnp.asarray(x), jnp.asarray(maps)))
  for c in range(k):
    ref = torch_reference.local_blend(
        torch.from_numpy(x[2 * c:2 * c + 2]).permute(0, 3, 1, 2),
        torch.from_numpy(maps[c])[:, None, None],  # one layer·head
        torch.from_numpy(weights[c]).reshape(2, 1, 1, 1, 1, length), 0.3)
    np.testing.assert_allclose(ours[2 * c:2 * c + 2], ref.permute(0, 2, 3, 1).numpy(),
                               rtol=1e-6, atol=1e-6)
  mask = np.asarray(blend.mask(jnp.asarray(maps), latent_hw))
  assert 0.05 < mask.mean() < 0.95
  np.testing.assert_array_equal(ours[0::2], x[0::2])


def test_local_blend_without_words_leaves_the_pair_alone():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  blend = control.LocalBlend(word_weights=jnp.zeros((1, 2, 77)), threshold=jnp.array([0.3]))
  np.testing.assert_array_equal(blend(x, jnp.ones((1, 2, 4, 4, 77))), x)


def test_attention_store_keeps_conditional_cross_maps_at_one_resolution():
  k, heads, length = 2, 3, 77
  store = control.AttentionStore(None, (8, 8), k)
  probs = [jax.nn.softmax(jax.random.normal(jax.random.key(i), (4 * k, heads, 64, length)))
           for i in range(3)]
  store.edit_probs(probs[0], CROSS)
  store.edit_probs(probs[1], MID_CROSS)  # the mid block is left out, as in the reference.
  store.edit_probs(probs[2], SELF)  # self-attention is not stored.
  store.edit_probs(probs[2], AttentionInfo("up_blocks.0.attentions.0.transformer_blocks.0.attn2",
                                           True, (8, 8)))
  store.edit_probs(probs[1], AttentionInfo("x.attn2", True, (16, 16)))
  maps = np.asarray(store.maps())
  assert maps.shape == (k, 2, 8, 8, length)
  cond = lambda p: np.asarray(p).reshape(2, k, 2, heads, 8, 8, length)[1].mean(axis=2)
  np.testing.assert_allclose(maps, (cond(probs[0]) + cond(probs[2])) / 2, rtol=1e-6)
  with pytest.raises(ValueError, match="no cross-attention layer"):
    control.AttentionStore(None, (4, 4), k).maps()


def test_attention_store_records_after_the_controller_edit():
  k = 1
  p2p = control.PromptToPrompt(
      token_map=jnp.zeros((k, 77, 77)), keep=jnp.zeros((k, 77)), equalizer=jnp.ones((k, 77)),
      cross_alpha=jnp.ones((k, 2, 77)), self_window=jnp.zeros((k, 2), jnp.int32),
      step=jnp.int32(0), self_max_pixels=64)
  store = control.AttentionStore(p2p, (8, 8), k)
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (4, 2, 64, 77)))
  out = store.edit_probs(probs, CROSS)
  np.testing.assert_array_equal(np.asarray(out)[3], 0.0)  # the zero map replaced image 1's.
  np.testing.assert_array_equal(np.asarray(store.maps())[0, 1], 0.0)


def test_attention_hw_is_the_coarsest_down_up_level():
  sd15 = UNetConfig.from_dict(preset_configs("sd15", unet_in_channels=4)["unet"])
  assert control.attention_hw(sd15, (64, 64)) == (16, 16)
  assert control.attention_hw(sd15, (96, 64)) == (24, 16)
  tiny = UNetConfig.from_dict(preset_configs("tiny", unet_in_channels=4)["unet"])
  assert control.attention_hw(tiny, (16, 16)) == (8, 8)
  # SDXL at 1024 px: attention at 64×64 and 32×32 (and the mid block, also at 32×32).
  sdxl = UNetConfig.from_dict(preset_configs("sdxl", unet_in_channels=4)["unet"])
  assert control.attention_hw(sdxl, (128, 128)) == (32, 32)


def test_sdxl_base_layers_edited_and_recorded():
  """SDXL base's own layout at 1024 px, traced only (abstract weights): its 70 self- and 70
  cross-attention layers (10 transformer layers per block at 32×32 with 20 heads, 2 at 64×64 with
  10) reach the controller with their resolution; Prompt-to-Prompt replaces the self-attention
  maps of the 60 layers at 32×32 (down_blocks.2, the mid block, up_blocks.0) and edits every
  cross-attention map, and the store keeps the 50 cross-attention maps of down_blocks.2 and
  up_blocks.0, not the mid block's."""
  from collections import Counter

  from flax import nnx

  from jip2p.models.layers import abstract_module
  from jip2p.models.unet import UNet2DCondition
  config = UNetConfig.from_dict(preset_configs("sdxl", unet_in_channels=4)["unet"])
  model = abstract_module(lambda rngs: UNet2DCondition(config, rngs=rngs))
  hw = control.attention_hw(config, (128, 128))
  p2p = control.PromptToPrompt(
      token_map=jnp.zeros((1, 77, 77)), keep=jnp.zeros((1, 77)), equalizer=jnp.ones((1, 77)),
      cross_alpha=jnp.ones((1, 1, 77)), self_window=jnp.asarray([[0, 1]], jnp.int32),
      step=jnp.int32(0), self_max_pixels=hw[0] * hw[1])
  calls = []

  class Recording:
    def edit_logits(self, logits, info):
      return p2p.edit_logits(logits, info)

    def edit_probs(self, probs, info):
      out = p2p.edit_probs(probs, info)
      calls.append((info, probs.shape[1], out is not probs))
      return out

  store = control.AttentionStore(Recording(), hw, 1)
  maps = nnx.eval_shape(lambda m: (m(jnp.zeros((4, 128, 128, 4)), 10, jnp.zeros((4, 77, 2048)),
                                     text_embeds=jnp.zeros((4, 1280)),
                                     time_ids=jnp.zeros((4, 6)), control=store),
                                   store.maps())[1], model)
  assert maps.shape == (1, 2, 32, 32, 77)
  assert len(store.layers) == 50
  assert len({info.name for info, _, _ in calls}) == len(calls) == 140
  assert Counter((info.is_cross, info.query_hw, heads, edited)
                 for info, heads, edited in calls) == {
      (False, (64, 64), 10, False): 10, (False, (32, 32), 20, True): 60,
      (True, (64, 64), 10, True): 10, (True, (32, 32), 20, True): 60}
  names = {info.name for info, _, _ in calls}
  assert "down_blocks.2.attentions.1.transformer_blocks.9.attn1" in names
  assert "mid_block.attentions.0.transformer_blocks.9.attn2" in names
