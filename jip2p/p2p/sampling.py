"""Paired sampling: two images per candidate, image 1 an attention-controlled edit of image 0.

The reference is InstructPix2Pix's ``generate_img_dataset.py`` (docs/design.md §1, stage 2):

  * per candidate a seed; from it the initial noise, p ~ U(min_p, max_p) (0.1, 0.9), the guidance
    scale ~ U(min_cfg, max_cfg) (7.5, 15) and the noise of every ancestral step;
  * Euler ancestral on k-diffusion's discrete grid (100 steps); both images start from the same
    noise and share every step's noise;
  * the UNet batch [uncond·caption0, uncond·caption1, cond·caption0, cond·caption1] per candidate,
    ``uncond + s·(cond − uncond)``, uncond the text embedding of "";
  * ``mode="ip2p"``: self-attention logit sharing while ``p > i/(N−1)``
    (`control.SelfAttentionSharing`); ``mode="p2p"``: Prompt-to-Prompt (`P2POptions`);
  * decoding to ``255·clamp((x + 1)/2, 0, 1)`` truncated to uint8, as the reference's ``to_pil``.

An SDXL text-to-image folder (``text_encoder_2/``, a ``text_time`` UNet) is conditioned as
diffusers' ``StableDiffusionXLPipeline`` conditions a prompt (`editing.text_conditioning`, which
the editor uses too): both encoders' states and the pooled text, the micro-conditioning of a
generated image (`jip2p.edit.time_ids`: (H, W, 0, 0, H, W)) in every row, and for the empty
caption zeros (the folder's ``force_zeros_for_empty_prompt``, true unless it says false) or the
encoding of "". The controllers act on SDXL's attention layers as on SD's (`control`): every
transformer layer of a block, whatever its head count.

K candidates (of any captions, e.g. many prompts' candidates together) run as one jitted program:
text encoding, the whole sampling loop and decoding. `PairGenerator` compiles once per batch shape
and reuses the program; `generate_pairs` is the one-call form. Per-candidate Prompt-to-Prompt
options are data (the controller's arrays), so candidates with different options share a program;
only whether any candidate of the batch uses LocalBlend selects one of two programs.

With several local devices the candidate axis is sharded over a 1-D mesh (axis "candidates"),
the weights replicated. A batch of K candidates uses the largest number of devices that divides
K — all of them when K is a multiple of the device count (choose the batch size so), never
padding: no device computes a candidate that is thrown away, and a candidate's images stay those
of its seed on any mesh.

Seeds are uint32. A candidate's images depend only on its seed, captions, p, scale and options,
never on the other candidates of its batch: all its randomness comes from ``jax.random.key(seed)``
split into (initial noise, p, scale, step noise) keys; step i's noise is
``normal(fold_in(step_key, i))``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jip2p import files
from jip2p.diffusion import editing, guidance, samplers, schedules
from jip2p.edit import time_ids
from jip2p.errors import ConfigError, InputError
from jip2p.p2p import align, control
from jip2p.tokenizer import bytes_to_unicode

MODES = ("ip2p", "p2p")
EDITS = ("replace", "refine", "auto", "none")
CANDIDATES = "candidates"  # the mesh axis of the candidate batch

StepWindow = float | tuple[float, float]


@dataclasses.dataclass(frozen=True)
class P2POptions:
  """Prompt-to-Prompt for one caption pair (google/prompt-to-prompt's controller arguments).

  edit: "replace" (word swap; same number of words), "refine" (words added or removed), "auto"
    (replace when the captions have the same number of words, else refine) or "none" (only
    reweighting / blending).
  cross_replace_steps: the steps during which cross-attention is edited, as a fraction f of the
    steps (= (0, f)), a (start, end) pair of fractions, or a dict from words of the edited
    caption to such windows, with the key "default_" for all other tokens (default (0, 1)).
    Words absent from the caption are ignored.
  self_replace_steps: the steps (fraction or (start, end)) with image 1's self-attention maps
    replaced by image 0's at coarse resolutions.
  reweight: words (or 0-based word indices) of the edited caption → attention scale.
  blend_words: (words of caption 0, words of caption 1) whose cross-attention decides where
    image 1 may differ from image 0 (LocalBlend); None: no blending.
  blend_threshold: LocalBlend's threshold on the max-normalised maps.
  """

  edit: str = "replace"
  cross_replace_steps: StepWindow | Mapping[str, StepWindow] = 0.8
  self_replace_steps: StepWindow = 0.4
  reweight: Mapping[str | int, float] | None = None
  blend_words: tuple[Sequence[str], Sequence[str]] | None = None
  blend_threshold: float = 0.3


P2P_KEYS = tuple(f.name for f in dataclasses.fields(P2POptions))


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _words_of(value, name: str) -> tuple[str, ...]:
  words = (value,) if isinstance(value, str) else value
  if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) and w for w in words):
    raise ConfigError(f"{name}={value!r} must be a word or a list of words")
  return tuple(words)


def _p2p_value(key: str, value):
  """One option from JSON or a config (lists for pairs) → its `P2POptions` form, checked."""
  if key == "edit":
    if value not in EDITS:
      raise ConfigError(f"unknown Prompt-to-Prompt edit {value!r}; choose one of {EDITS}")
    return value
  if key == "cross_replace_steps":
    if isinstance(value, Mapping):
      if not all(isinstance(w, str) and w for w in value):
        raise ConfigError(f"cross_replace_steps={value!r}: per-word windows need word keys")
      return {w: _window(v, f"cross_replace_steps[{w!r}]") for w, v in value.items()}
    return _window(value, "cross_replace_steps")
  if key == "self_replace_steps":
    return _window(value, "self_replace_steps")
  if key == "reweight":
    if value is None:
      return None
    if (not isinstance(value, Mapping)
        or not all(isinstance(w, (str, int)) and _number(v) for w, v in value.items())):
      raise ConfigError(f"reweight={value!r} must map words to scales")
    return {w: float(v) for w, v in value.items()} or None
  if key == "blend_words":
    if value is None:
      return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or len(value) != 2:
      raise ConfigError(f"blend_words={value!r} must be (words of caption 0, words of caption 1)")
    return tuple(_words_of(v, "blend_words") for v in value)
  if key == "blend_threshold":
    if not _number(value):
      raise ConfigError(f"blend_threshold={value!r} must be a number")
    return float(value)
  raise ConfigError(f"unknown p2p option {key!r}; choose from {', '.join(P2P_KEYS)}")


def p2p_options(values: Mapping, base: P2POptions = P2POptions()) -> P2POptions:
  """``base`` with the given fields replaced: a config group's ``to_dict()`` or a prompt line's
  ``"p2p"`` object. Raises `ConfigError` naming an unknown key or a bad value."""
  if not isinstance(values, Mapping):
    raise ConfigError(f"p2p options must be an object of {', '.join(P2P_KEYS)}, got "
                      f"{values!r:.80}")
  return dataclasses.replace(base, **{k: _p2p_value(k, v) for k, v in values.items()})


def check_p2p(tokenizer, pair: tuple[str, str], options: P2POptions) -> None:
  """Raises `InputError` (or `ConfigError`) unless ``options`` fit the caption pair: a word swap
  needs equal word counts, reweighted and blend words must occur. Run on the host, per prompt,
  before any generation."""
  _p2p_arrays(tokenizer, pair, 1, options)


@dataclasses.dataclass(frozen=True)
class GeneratedPairs:
  """The result of one batch of K candidates.

  images: uint8 ``[K, 2, H, W, 3]`` (NumPy, or a jax.Array sharded over the candidate mesh).
  p, cfg_scale: float32 ``[K]``, the sharing fraction (drawn but unused in "p2p" mode) and the
    guidance scale of each candidate.
  attention: float32 ``[K, 2, h, w, L]``, the conditional cross-attention maps at ``h×w``
    queries averaged over heads, down/up layers and steps, or None unless asked for.
  """

  images: np.ndarray
  p: np.ndarray
  cfg_scale: np.ndarray
  attention: np.ndarray | None = None


# ---------------------------------------------------------------------------- per-candidate draws


def candidate_keys(seed: jax.Array) -> jax.Array:
  """The (initial noise, p, scale, step noise) keys of a uint32 seed: a key array ``[4]``."""
  return jax.random.split(jax.random.key(seed), 4)


def _check_seeds(seeds) -> np.ndarray:
  raw = np.asarray(seeds)
  if raw.ndim != 1 or not np.issubdtype(raw.dtype, np.integer):
    raise InputError(f"seeds must be a 1-D sequence of integers, got {raw.dtype} {raw.shape}")
  if raw.size and (raw.min() < 0 or raw.max() >= 1 << 32):
    raise InputError(f"seeds must be in [0, 2**32), got the range [{raw.min()}, {raw.max()}]")
  return raw.astype(np.uint32)


@jax.jit
@jax.vmap
def _uniform_draws(seed: jax.Array) -> tuple[jax.Array, jax.Array]:
  keys = candidate_keys(seed)
  return jax.random.uniform(keys[1]), jax.random.uniform(keys[2])


def candidate_draws(seeds: Sequence[int], *, min_p: float = 0.1, max_p: float = 0.9,
                    min_cfg: float = 7.5, max_cfg: float = 15.0) -> tuple[np.ndarray, np.ndarray]:
  """(p, guidance scale), float32 ``[K]`` each, drawn uniformly from each candidate's seed."""
  if not (0.0 <= min_p <= max_p and min_cfg <= max_cfg):
    raise ConfigError(f"need 0 ≤ min_p ≤ max_p and min_cfg ≤ max_cfg, got p in [{min_p}, "
                      f"{max_p}] and cfg in [{min_cfg}, {max_cfg}]")
  u_p, u_cfg = _uniform_draws(_check_seeds(seeds))
  p = min_p + np.asarray(u_p, np.float64) * (max_p - min_p)
  cfg = min_cfg + np.asarray(u_cfg, np.float64) * (max_cfg - min_cfg)
  return p.astype(np.float32), cfg.astype(np.float32)


def initial_noise(seeds: jax.Array, latent_shape: tuple[int, ...]) -> jax.Array:
  """Unit normal noise ``[K, *latent_shape]`` from each candidate's seed (uint32 ``[K]``)."""
  return jax.vmap(lambda s: jax.random.normal(candidate_keys(s)[0], latent_shape))(seeds)


def step_noise(seeds: jax.Array, i: jax.Array, latent_shape: tuple[int, ...]) -> jax.Array:
  """Step i's ancestral noise ``[K, *latent_shape]``, shared by the two images of a pair."""
  return jax.vmap(lambda s: samplers.step_noise(candidate_keys(s)[3], i, latent_shape))(seeds)


# ---------------------------------------------------------------------------- P2P arrays (host)


def _window(spec, name: str) -> tuple[float, float]:
  window = (0.0, spec) if _number(spec) else spec
  if (not isinstance(window, (tuple, list)) or len(window) != 2
      or not all(_number(v) for v in window) or not 0.0 <= window[0] <= window[1] <= 1.0):
    raise ConfigError(f"{name}={spec!r} must be a fraction in [0, 1] or a pair of fractions "
                      "0 ≤ start ≤ end ≤ 1")
  return float(window[0]), float(window[1])


def cross_replace_alpha(tokenizer, caption: str, num_steps: int,
                        spec: StepWindow | Mapping[str, StepWindow]) -> np.ndarray:
  """float32 ``[N, L]``: 1 where token n's cross-attention is edited at step i.

  As the reference: a window (start, end) covers steps ⌊start·(N+1)⌋ ≤ i < ⌊end·(N+1)⌋.
  """
  windows = dict(spec) if isinstance(spec, Mapping) else {"default_": spec}
  windows.setdefault("default_", (0.0, 1.0))
  alpha = np.zeros((num_steps, tokenizer.max_length), np.float32)

  rows = np.arange(num_steps)
  for word in ["default_", *(w for w in windows if w != "default_")]:
    positions = (slice(None) if word == "default_"
                 else align.word_token_indices(tokenizer, caption, word))
    start, end = _window(windows[word], f"cross_replace_steps[{word!r}]")
    inside = (rows >= int(start * (num_steps + 1))) & (rows < int(end * (num_steps + 1)))
    alpha[:, positions] = inside[:, None]
  return alpha


def self_replace_window(num_steps: int, spec: StepWindow) -> tuple[int, int]:
  """The steps [⌊start·N⌋, ⌊end·N⌋) with self-attention maps replaced, as the reference."""
  start, end = _window(spec, "self_replace_steps")
  return int(num_steps * start), int(num_steps * end)


def _p2p_arrays(tokenizer, pair: tuple[str, str], num_steps: int, options: P2POptions) -> dict:
  """One candidate's `control.PromptToPrompt` and `control.LocalBlend` arrays."""
  source, target = pair
  length = tokenizer.max_length
  edit = options.edit
  if edit == "auto":
    edit = "replace" if len(source.split(" ")) == len(target.split(" ")) else "refine"
  if edit == "replace":
    token_map, keep = align.replacement_mapper(tokenizer, source, target), np.zeros(length)
  elif edit == "refine":
    token_map, keep = align.refinement_map(tokenizer, source, target)
  elif edit == "none":
    token_map, keep = np.eye(length), np.zeros(length)
  else:
    raise ConfigError(f"unknown Prompt-to-Prompt edit {options.edit!r}; choose one of {EDITS}")
  weights = np.zeros((2, length), np.float32)
  if options.blend_words is not None:
    if len(options.blend_words) != 2 or isinstance(options.blend_words, str):
      raise ConfigError("blend_words must be (words of caption 0, words of caption 1), got "
                        f"{options.blend_words!r}")
    for image, (caption, words) in enumerate(zip(pair, options.blend_words)):
      for word in ([words] if isinstance(words, str) else words):
        positions = align.word_token_indices(tokenizer, caption, word)
        if not len(positions):
          raise InputError(f"blend word {word!r} does not occur in {caption!r}")
        weights[image, positions] = 1.0
  return {
      "token_map": np.asarray(token_map, np.float32),
      "keep": np.asarray(keep, np.float32),
      "equalizer": (align.equalizer(tokenizer, target, options.reweight) if options.reweight
                    else np.ones(length, np.float32)),
      "cross_alpha": cross_replace_alpha(tokenizer, target, num_steps,
                                         options.cross_replace_steps),
      "self_window": np.asarray(self_replace_window(num_steps, options.self_replace_steps),
                                np.int32),
      "word_weights": weights,
      "threshold": np.float32(options.blend_threshold),
  }


# ---------------------------------------------------------------------------- the generator


class PairGenerator:
  """Compiled paired sampling for one pipeline, step count and image size.

  Args:
    pipeline: a `jip2p.checkpoints.Pipeline` with a text-to-image UNet (``in_channels`` equal to
      the VAE's latent channels), e.g. Stable Diffusion 1.5 or SDXL base.
    steps: N, the Euler-ancestral steps on the discrete grid (100 in the reference).
    height, width: image size in pixels; default the UNet's ``sample_size`` × VAE downscale
      (512 for SD 1.5, 1024 for SDXL).
    devices: the devices the candidate axis is sharded over (default all local devices); a
      batch of K candidates uses the first gcd(K, len(devices)) of them.
  """

  def __init__(self, pipeline, *, steps: int = 100, height: int | None = None,
               width: int | None = None, devices=None):
    unet_config, vae_config = pipeline.unet.config, pipeline.vae.config
    if unet_config.in_channels != vae_config.latent_channels:
      raise ConfigError(f"paired generation needs a text-to-image UNet: in_channels is "
                        f"{unet_config.in_channels}, the VAE has {vae_config.latent_channels} "
                        "latent channels")
    factor = vae_config.downscale
    sample = unet_config.sample_size
    default = (sample, sample) if isinstance(sample, int) else sample
    if (height is None or width is None) and default is None:
      raise ConfigError("the UNet config has no sample_size: pass height and width")
    height = default[0] * factor if height is None else height
    width = default[1] * factor if width is None else width
    multiple = factor * 2 ** (unet_config.num_blocks - 1)
    if height % multiple or width % multiple or height <= 0 or width <= 0:
      raise InputError(f"image size {height}×{width} must be positive multiples of {multiple} "
                       "for this model")
    self.height, self.width, self.steps = height, width, steps
    self.tokenizer = pipeline.tokenizer
    self.latent_shape = (height // factor, width // factor, vae_config.latent_channels)
    self.default_attention_hw = control.attention_hw(unet_config, self.latent_shape[:2])
    scheduler = schedules.from_scheduler_config(pipeline.scheduler_config)
    self.schedule = schedules.discrete(scheduler.alphas_cumprod(), steps)
    self.tokenizer_2 = pipeline.tokenizer_2
    defs, self._states = {}, {}
    for name in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if pipeline.is_sdxl else ()):
      defs[name], self._states[name] = nnx.split(getattr(pipeline, name))
    self._null_tokens = np.asarray(self.tokenizer([""]))
    sdxl = None
    if pipeline.is_sdxl:
      self._null_tokens_2 = np.asarray(self.tokenizer_2([""]))
      zeros = bool(pipeline.sdxl_options.get("force_zeros_for_empty_prompt", True))
      sdxl = (time_ids(height, width), zeros)
    self._sample = functools.partial(_sample_pairs, defs, self.latent_shape,
                                     vae_config.scaling_factor, scheduler.prediction_type, sdxl)
    self.devices = list(jax.local_devices() if devices is None else devices)
    if not self.devices:
      raise ConfigError("no devices to generate on")
    self._programs = {}

  def _program(self, k: int):
    """(mesh, weights replicated on it, jitted program) for a batch of K candidates, per mesh
    size (each mesh size keeps its own replica of the weights)."""
    n = math.gcd(k, len(self.devices))
    if n not in self._programs:
      mesh = Mesh(np.asarray(self.devices[:n]), (CANDIDATES,))
      states = jax.device_put(self._states, NamedSharding(mesh, PartitionSpec()))
      run = jax.jit(self._sample, out_shardings=NamedSharding(mesh, PartitionSpec(CANDIDATES)),
                    static_argnames=("record", "attention_hw"))
      self._programs[n] = mesh, states, run
    return self._programs[n]

  def __call__(self, prompt_pairs: Sequence[tuple[str, str]], seeds: Sequence[int], *,
               mode: str = "ip2p", p=None, cfg_scale=None, min_p: float = 0.1,
               max_p: float = 0.9, min_cfg: float = 7.5, max_cfg: float = 15.0,
               p2p: P2POptions | Sequence[P2POptions] | None = None,
               attention_hw: tuple[int, int] | None = None,
               self_replace_max_pixels: int | None = None,
               return_attention: bool = False, to_host: bool = True) -> GeneratedPairs:
    """Generates one pair per (caption pair, seed).

    Args:
      prompt_pairs: K (caption 0, caption 1) pairs (the input and edited captions).
      seeds: K uint32 seeds.
      mode: "ip2p" (self-attention sharing) or "p2p" (Prompt-to-Prompt).
      p, cfg_scale: override the seed's draws (a number or one per candidate); p is ip2p's only.
      min_p, max_p, min_cfg, max_cfg: the ranges of the seed's draws.
      p2p: Prompt-to-Prompt options, one for all pairs or one per pair (default `P2POptions()`).
      attention_hw: query resolution of the maps LocalBlend reads and ``return_attention``
        returns; default `control.attention_hw` (16×16 for SD 1.5 at 512 px).
      self_replace_max_pixels: P2P replaces self-attention maps in layers with at most this many
        query positions (the reference: 16·16 at 512 px); default attention_hw's product.
      return_attention: also return the averaged cross-attention maps.
      to_host: return images and attention as NumPy arrays; False leaves them as jax.Arrays
        sharded over the candidate mesh.
    """
    pairs = _check_pairs(prompt_pairs)
    seeds = _check_seeds(seeds)
    k = len(pairs)
    if len(seeds) != k:
      raise InputError(f"{k} prompt pairs but {len(seeds)} seeds")
    if mode not in MODES:
      raise ConfigError(f"unknown pair generation mode {mode!r}; choose one of {MODES}")
    drawn_p, drawn_cfg = candidate_draws(seeds, min_p=min_p, max_p=max_p, min_cfg=min_cfg,
                                         max_cfg=max_cfg)
    p = drawn_p if p is None else _per_candidate(p, k, "p")
    cfg_scale = drawn_cfg if cfg_scale is None else _per_candidate(cfg_scale, k, "cfg_scale")
    hw = tuple(attention_hw or self.default_attention_hw)

    blend = None
    if mode == "ip2p":
      if p2p is not None:
        raise ConfigError("Prompt-to-Prompt options were given with mode='ip2p'; use mode='p2p'")
      controller = control.SelfAttentionSharing(p=jnp.asarray(p), step=jnp.int32(0),
                                                num_steps=self.steps)
    else:
      options = [p2p or P2POptions()] * k if isinstance(p2p, (P2POptions, type(None))) else p2p
      if len(options) != k:
        raise ConfigError(f"{len(options)} Prompt-to-Prompt options for {k} prompt pairs")
      arrays = _stack_p2p(self.tokenizer, pairs, self.steps, options)
      max_pixels = hw[0] * hw[1] if self_replace_max_pixels is None else self_replace_max_pixels
      controller = control.PromptToPrompt(
          token_map=arrays["token_map"], keep=arrays["keep"], equalizer=arrays["equalizer"],
          cross_alpha=arrays["cross_alpha"], self_window=arrays["self_window"],
          step=jnp.int32(0), self_max_pixels=int(max_pixels))
      if any(o.blend_words is not None for o in options):
        blend = control.LocalBlend(word_weights=arrays["word_weights"],
                                   threshold=arrays["threshold"])

    captions = [c for pair in pairs for c in pair]
    tokens = np.asarray(self.tokenizer(captions))
    # SDXL's second tokenizer: the same words at the same positions (its padding differs).
    tokens_2 = (None if self.tokenizer_2 is None else
                (np.asarray(self.tokenizer_2(captions)), self._null_tokens_2))
    mesh, states, run = self._program(k)
    replicated = NamedSharding(mesh, PartitionSpec())
    by_candidate = NamedSharding(mesh, PartitionSpec(CANDIDATES))
    # Rows of every per-candidate input lead with the candidate axis (tokens: [candidate, image]);
    # scalars (the controllers' step) and the shared inputs are replicated.
    shard = lambda x: jax.device_put(x, by_candidate if np.ndim(x) else replicated)
    images, maps = run(states, jax.device_put(self.schedule, replicated),
                       shard(tokens), jax.device_put(self._null_tokens, replicated),
                       shard(seeds), shard(np.asarray(cfg_scale, np.float32)),
                       jax.tree.map(shard, controller), jax.tree.map(shard, blend),
                       None if tokens_2 is None else (shard(tokens_2[0]),
                                                      jax.device_put(tokens_2[1], replicated)),
                       record=return_attention or blend is not None, attention_hw=hw)
    convert = np.asarray if to_host else (lambda x: x)
    return GeneratedPairs(images=convert(images), p=np.asarray(p, np.float32),
                          cfg_scale=np.asarray(cfg_scale, np.float32),
                          attention=convert(maps) if return_attention else None)


def _sample_pairs(defs, latent_shape, scaling_factor, prediction_type, sdxl, states, schedule,
                  tokens, null_tokens, seeds, cfg_scale, controller, blend, tokens_2, *, record,
                  attention_hw):
  """The jitted program: tokens ``[2K, L]`` → (uint8 images ``[K, 2, H, W, 3]``, maps or None).

  An SDXL pipeline's ``tokens_2`` are (the captions' ``[2K, L]``, the empty caption's ``[1, L]``)
  from its second tokenizer and ``sdxl`` is (the generated images' time ids float32 [6], whether
  the empty caption is zeros); both None otherwise.
  """
  unet = nnx.merge(defs["unet"], states["unet"])
  vae = nnx.merge(defs["vae"], states["vae"])
  text_encoder = nnx.merge(defs["text_encoder"], states["text_encoder"])
  k = seeds.shape[0]
  # The empty caption's tokens last, as `editing.text_conditioning` takes them.
  input_ids = jnp.concatenate([tokens, null_tokens])
  extra = {}
  if sdxl is not None:
    extra = dict(text_encoder_2=nnx.merge(defs["text_encoder_2"], states["text_encoder_2"]),
                 input_ids_2=jnp.concatenate(tokens_2),
                 time_ids=jnp.broadcast_to(sdxl[0], (tokens.shape[0], len(sdxl[0]))),
                 zero_null_text=sdxl[1])
  unet_fn, text, null = editing.text_conditioning(unet, text_encoder, input_ids, **extra)
  context = jax.tree.map(lambda c, n: jnp.concatenate([jnp.broadcast_to(n, c.shape), c]), text,
                         null)
  scale = jnp.repeat(cfg_scale.astype(jnp.float32), 2)[:, None, None, None]
  noise = jnp.repeat(initial_noise(seeds, latent_shape), 2, axis=0)
  # The attention maps of step i pass from the UNet call to post_step within one traced step.
  step_maps = {}

  def eps_fn(x_in, t, i):
    hook = controller.at_step(i)
    if record:
      hook = control.AttentionStore(hook, attention_hw, k)
    eps = unet_fn(jnp.concatenate([x_in, x_in]), t, context, control=hook)
    if record:
      step_maps["maps"] = hook.maps()
    uncond, cond = jnp.split(eps, 2)
    return guidance.cfg(uncond, cond, scale)

  def noise_fn(key, i, shape):
    del key  # Each candidate's noise comes from its own seed.
    return jnp.repeat(step_noise(seeds, i, latent_shape), 2, axis=0)

  def post_step(x, i, maps_sum):
    maps_sum = maps_sum + step_maps["maps"]
    return (x if blend is None else blend(x, maps_sum)), maps_sum

  kwargs = {}
  if record:
    kwargs = dict(post_step=post_step,
                  post_state=jnp.zeros((k, 2, *attention_hw, tokens.shape[-1]), jnp.float32))
  out = samplers.sample(eps_fn, noise, schedule, key=seeds, method="euler_ancestral",
                        noise_fn=noise_fn, prediction_type=prediction_type, **kwargs)
  latents, maps = out if record else (out, None)
  x = vae.decode(latents / scaling_factor)
  images = jnp.floor(255.0 * jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)).astype(jnp.uint8)
  if maps is not None:
    maps = maps / schedule.num_steps
  return images.reshape(k, 2, *images.shape[1:]), maps


def _check_pairs(prompt_pairs) -> list[tuple[str, str]]:
  pairs = list(prompt_pairs)
  if not pairs:
    raise InputError("no prompt pairs were given")
  for n, pair in enumerate(pairs):
    if (isinstance(pair, str) or len(pair) != 2
        or not all(isinstance(c, str) for c in pair)):
      raise InputError(f"prompt pair {n} must be two captions (strings), got {pair!r:.80}")
  return [tuple(pair) for pair in pairs]


def _per_candidate(value, k: int, name: str) -> np.ndarray:
  array = np.asarray(value, np.float32)
  if array.ndim == 0:
    return np.full((k,), array, np.float32)
  if array.shape != (k,):
    raise InputError(f"{name} must be a number or one per candidate ({k}), got shape "
                     f"{array.shape}")
  return array


def _stack_p2p(tokenizer, pairs, num_steps, options) -> dict[str, jnp.ndarray]:
  cache = {}
  rows = []
  for pair, option in zip(pairs, options):
    if not isinstance(option, P2POptions):
      raise ConfigError(f"p2p options must be P2POptions, got {type(option).__name__}")
    key = (pair, repr(option))
    if key not in cache:
      cache[key] = _p2p_arrays(tokenizer, pair, num_steps, option)
    rows.append(cache[key])
  return {name: jnp.asarray(np.stack([r[name] for r in rows])) for name in rows[0]}


def generate_pairs(pipeline, prompt_pairs: Sequence[tuple[str, str]], seeds: Sequence[int], *,
                   steps: int = 100, height: int | None = None, width: int | None = None,
                   **options) -> GeneratedPairs:
  """`PairGenerator` (pipeline, steps, size) called once with the remaining options."""
  generator = PairGenerator(pipeline, steps=steps, height=height, width=width)
  return generator(prompt_pairs, seeds, **options)


# ---------------------------------------------------------------------------- visualisation


@functools.lru_cache(maxsize=4)
def _inverse_vocab(tokenizer) -> dict[int, str]:
  return {v: k for k, v in tokenizer.vocab.items()}


def token_text(tokenizer, token_id: int) -> str:
  """A token id as readable text (byte-level BPE decoded, the end-of-word mark dropped)."""
  symbol = _inverse_vocab(tokenizer).get(int(token_id), "?")
  if symbol in (tokenizer.bos_token, tokenizer.eos_token):
    return symbol
  byte_of = {u: b for b, u in bytes_to_unicode().items()}
  symbol = symbol.removesuffix("</w>")
  return bytes(byte_of[c] for c in symbol if c in byte_of).decode("utf-8", errors="replace")


def show_attention(pipeline, prompt: str, out_dir: str | os.PathLike, *, seed: int = 0,
                   steps: int = 50, cfg_scale: float = 7.5, height: int | None = None,
                   width: int | None = None, attention_hw: tuple[int, int] | None = None
                   ) -> list[str]:
  """Generates ``prompt`` and saves what each of its tokens attends to: Prompt-to-Prompt's
  AttentionStore view (cross-attention at 16×16 for SD 1.5, averaged over heads, down/up layers
  and steps).

  Writes ``image.png``, one ``{position:02d}_{token}.png`` heat map over the image per token
  (bos and eos included) and ``attention.png``, all of them in a labelled row. Returns the paths.
  """
  from matplotlib import colormaps  # Only the colour map; no plotting backend.
  from PIL import Image, ImageDraw

  if not isinstance(prompt, str) or not prompt.strip():
    raise InputError(f"the prompt to show attention for is empty: {prompt!r}")
  generator = PairGenerator(pipeline, steps=steps, height=height, width=width)
  result = generator([(prompt, prompt)], [seed], p=0.0, cfg_scale=cfg_scale,
                     attention_hw=attention_hw, return_attention=True)
  image = result.images[0, 0]
  maps = result.attention[0, 0]
  tokenizer = pipeline.tokenizer
  ids = [tokenizer.bos_id, *tokenizer.encode(prompt)[:tokenizer.max_length - 2],
         tokenizer.eos_id]
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, "image.png")]
  files.save_png(image, paths[0])
  size = (image.shape[1], image.shape[0])
  tiles = []
  for position, token_id in enumerate(ids):
    heat = maps[..., position]
    heat = heat / max(float(heat.max()), 1e-12)
    heat = np.asarray(Image.fromarray(np.uint8(255 * heat)).resize(size, Image.BICUBIC))
    colour = np.uint8(255 * colormaps["jet"](heat)[..., :3])
    overlay = np.uint8(0.5 * image + 0.5 * colour)
    text = token_text(tokenizer, token_id)
    name = "".join(c if c.isalnum() else "_" for c in text.strip("<|>")) or "token"
    paths.append(os.path.join(out_dir, f"{position:02d}_{name}.png"))
    files.save_png(overlay, paths[-1])
    tile = Image.new("RGB", (size[0], size[1] + 14), "white")
    tile.paste(Image.fromarray(overlay), (0, 0))
    ImageDraw.Draw(tile).text((2, size[1]), text, fill="black")
    tiles.append(tile)
  grid = Image.new("RGB", (size[0] * len(tiles), size[1] + 14), "white")
  for n, tile in enumerate(tiles):
    grid.paste(tile, (n * size[0], 0))
  paths.append(os.path.join(out_dir, "attention.png"))
  files.save_png(grid, paths[-1])
  return paths
