"""PyTorch references for paired generation, written from the original code's semantics (torch
side only): a diffusers attention processor computing explicit logits with InstructPix2Pix's
self-attention sharing or Prompt-to-Prompt's Replace, Refine and Reweight,
google/prompt-to-prompt's LocalBlend, and the k-diffusion Euler-ancestral loop of
``generate_img_dataset.py`` with caller-given noises, conditioned as diffusers' SD pipelines
(`sd_conditioning`) or its SDXL pipeline (`sdxl_conditioning`: its own ``encode_prompt`` and
``_get_add_time_ids``).

Batch layout of the UNet, as the reference for one pair: [uncond·c0, uncond·c1, cond·c0, cond·c1],
here for K candidates [half, candidate, image].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def row(half: int, k: int, image: int, num_candidates: int) -> int:
  return half * 2 * num_candidates + 2 * k + image


class Controller:
  """What every processor consults; ``step`` is set by the loop.

  ip2p: ``p`` [K] — self-attention logits of image 1 := image 0's while p > i/(N−1), both halves.
  p2p: ``mapper`` [K, L, L], ``cross_alpha`` [K, N, L], ``self_window`` [K, 2],
    ``self_max_pixels`` — cross maps of image 1 := einsum(image 0's, mapper) blended by alpha,
    self maps := image 0's inside the window at ≤ self_max_pixels queries, conditional half only.
    ``refine`` (None, or per candidate None or the reference's (mapper indices [L], alphas [L])):
    that candidate's cross maps := image 0's gathered by the indices · alphas + its own ·
    (1 − alphas) instead (AttentionRefine); ``equalizer`` (None or [K, L]) then scales them per
    token (AttentionReweight over its previous controller).
  blend: ``blend_alpha`` [K, 2, L] (None for a candidate without LocalBlend), ``blend_hw``.
  """

  def __init__(self, num_candidates: int, num_steps: int, *, p=None, mapper=None,
               cross_alpha=None, self_window=None, self_max_pixels=None, blend_alpha=None,
               blend_hw=None, threshold=0.3, refine=None, equalizer=None):
    self.k, self.n, self.step = num_candidates, num_steps, 0
    self.p, self.mapper, self.cross_alpha = p, mapper, cross_alpha
    self.refine, self.equalizer = refine or [None] * num_candidates, equalizer
    self.self_window, self.self_max_pixels = self_window, self_max_pixels
    self.blend_alpha, self.blend_hw, self.threshold = blend_alpha, blend_hw, threshold
    self.store = {}  # layer name → conditional maps summed over steps [2·heads, Lq, L] per k

  def edit_logits(self, logits, is_cross):
    if self.p is None or is_cross:
      return logits
    logits = logits.clone()
    for k in range(self.k):
      if float(self.p[k]) > self.step / (self.n - 1):
        for half in (0, 1):
          logits[row(half, k, 1, self.k)] = logits[row(half, k, 0, self.k)]
    return logits

  def edit_probs(self, probs, is_cross, name):
    if self.mapper is not None:
      probs = probs.clone()
      for k in range(self.k):
        base, own = probs[row(1, k, 0, self.k)], probs[row(1, k, 1, self.k)]
        if is_cross:
          alpha = torch.as_tensor(self.cross_alpha[k, self.step])
          if self.refine[k] is None:
            replaced = torch.einsum("hpw,wn->hpn", base, torch.as_tensor(self.mapper[k]))
          else:
            indices, alphas = (torch.as_tensor(a) for a in self.refine[k])
            replaced = base[:, :, indices] * alphas + own * (1 - alphas)
          if self.equalizer is not None:
            replaced = replaced * torch.as_tensor(self.equalizer[k])
          probs[row(1, k, 1, self.k)] = replaced * alpha + (1 - alpha) * own
        elif (probs.shape[2] <= self.self_max_pixels
              and self.self_window[k][0] <= self.step < self.self_window[k][1]):
          probs[row(1, k, 1, self.k)] = base
    h, w = self.blend_hw or (0, 0)
    if is_cross and probs.shape[2] == h * w and not name.startswith("mid_block"):
      cond = probs[2 * self.k:]
      self.store[name] = self.store.get(name, 0) + cond
    return probs

  def local_blend(self, x):
    """The reference's step_callback on latents [2K, C, H, W]."""
    if self.blend_alpha is None:
      return x
    out = x.clone()
    layers = list(self.store.values())
    h, w = self.blend_hw
    for k in range(self.k):
      if self.blend_alpha[k] is None:
        continue
      maps = [m.reshape(self.k, 2, -1, h * w, m.shape[-1])[k] for m in layers]
      maps = torch.cat([m.reshape(2, -1, 1, h, w, m.shape[-1]) for m in maps], dim=1)
      alpha = torch.as_tensor(self.blend_alpha[k]).reshape(2, 1, 1, 1, 1, -1)
      out[2 * k:2 * k + 2] = local_blend(x[2 * k:2 * k + 2], maps, alpha, self.threshold)
    return out


def local_blend(x_t, maps, alpha_layers, threshold):
  """google/prompt-to-prompt's LocalBlend.__call__ for one pair: latents [2, C, H, W]; maps
  [2, heads·layers, 1, h, w, L] (summed over steps); alpha_layers [2, 1, 1, 1, 1, L]."""
  k = 1
  maps = (maps * alpha_layers).sum(-1).mean(1)
  mask = F.max_pool2d(maps, (k * 2 + 1, k * 2 + 1), (1, 1), padding=(k, k))
  mask = F.interpolate(mask, size=(x_t.shape[2:]))
  mask = mask / mask.max(2, keepdims=True)[0].max(3, keepdims=True)[0]
  mask = mask.gt(threshold)
  mask = (mask[:1] + mask[1:]).float()
  return x_t[:1] + mask * (x_t - x_t[:1])


class Processor:
  """A diffusers attention processor with explicit logits and probabilities."""

  def __init__(self, controller: Controller, name: str):
    self.controller, self.name = controller, name

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
               temb=None):
    is_cross = encoder_hidden_states is not None
    context = encoder_hidden_states if is_cross else hidden_states
    b, lq, _ = hidden_states.shape
    heads = attn.heads
    split = lambda t: t.reshape(b, t.shape[1], heads, -1).transpose(1, 2)
    q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(context)), split(attn.to_v(context))
    logits = (q @ k.transpose(-1, -2)) * attn.scale
    logits = self.controller.edit_logits(logits, is_cross)
    probs = self.controller.edit_probs(logits.softmax(dim=-1), is_cross, self.name)
    out = (probs @ v).transpose(1, 2).reshape(b, lq, -1)
    return attn.to_out[1](attn.to_out[0](out))


def install(unet, controller: Controller) -> None:
  unet.set_attn_processor({name: Processor(controller, name.removesuffix(".processor"))
                           for name in unet.attn_processors})


@torch.no_grad()
def sd_conditioning(pipe, tokens, null_tokens):
  """(context [4K, L, D], None): the text encoder's states of the empty caption, then of the
  captions' tokens [2K, L] ([candidate, image])."""
  cond = pipe.text_encoder(torch.as_tensor(tokens, dtype=torch.long))[0]
  null = pipe.text_encoder(torch.as_tensor(null_tokens, dtype=torch.long))[0].expand_as(cond)
  return torch.cat([null, cond]), None


@torch.no_grad()
def sdxl_conditioning(pipe, captions, height: int, width: int):
  """(context [4K, L, D], added_cond_kwargs) of 2K captions as diffusers' SDXL pipeline makes
  them for a height × width image without a negative prompt: ``encode_prompt`` (both encoders,
  pooled text, the empty caption as zeros when the folder forces them) and ``_get_add_time_ids``
  of (original size, (0, 0), target size) = the image's size."""
  cond, null, pooled, null_pooled = pipe.encode_prompt(list(captions), device="cpu",
                                                       do_classifier_free_guidance=True)
  time_ids = pipe._get_add_time_ids(
      (height, width), (0, 0), (height, width), dtype=cond.dtype,
      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
  return torch.cat([null, cond]), {"text_embeds": torch.cat([null_pooled, pooled]),
                                   "time_ids": time_ids.repeat(2 * len(captions), 1)}


@torch.no_grad()
def generate(pipe, controller: Controller, conditioning, cfg_scale, noise, step_noises, sigmas,
             timesteps) -> np.ndarray:
  """The reference's CFG Euler-ancestral loop; returns uint8 [K, 2, H, W, 3].

  conditioning: `sd_conditioning`'s or `sdxl_conditioning`'s; noise [K, C, h, w]; step_noises
  [N, K, C, h, w].
  """
  install(pipe.unet, controller)
  context, added = conditioning
  scale = torch.as_tensor(np.repeat(cfg_scale, 2))[:, None, None, None]
  x = torch.as_tensor(noise).repeat_interleave(2, 0) * float(sigmas[0])
  for i in range(len(timesteps)):
    controller.step = i
    s, s_next = float(sigmas[i]), float(sigmas[i + 1])
    x_in = x / (s ** 2 + 1) ** 0.5
    t = torch.tensor(float(timesteps[i]), dtype=torch.float32)
    eps = pipe.unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=context,
                    added_cond_kwargs=added).sample
    uncond, cond_eps = eps.chunk(2)
    eps = uncond + (cond_eps - uncond) * scale
    sigma_up = min(s_next, (s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2) ** 0.5)
    sigma_down = (s_next ** 2 - sigma_up ** 2) ** 0.5
    x = x + eps * (sigma_down - s)
    if s_next > 0:
      x = x + torch.as_tensor(step_noises[i]).repeat_interleave(2, 0) * sigma_up
    x = controller.local_blend(x)
  image = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
  image = (255.0 * ((image + 1.0) / 2.0).clamp(0, 1)).to(torch.uint8)  # truncates, as to_pil
  image = image.permute(0, 2, 3, 1).numpy()
  return image.reshape(-1, 2, *image.shape[1:])
