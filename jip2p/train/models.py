"""The models of a run: the pipeline ``config.model`` names, and what the train step runs.

`build_pipeline` is the one place that turns ``config.model`` into modules, so the trainer and
`jip2p-export` (which rebuilds the frozen VAE and text encoder from the run's saved config) agree.
The trained UNet is split into a graph and its parameters (`split_unet`); the frozen VAE and text
encoder become a `Frozen` graphs + state pair (`frozen_models`), replicated on the mesh. An SDXL
model's text model is its two encoders as one (`Pipeline.text_model`, fed by
`Pipeline.text_tokenizer`'s ids [B, 2, 77]) and its null text the editor's
(`edit.folder_zero_null_text`). A run from a latent cache (``config.data.latents``) trains the
same UNet, but its step runs stand-ins for them (`step_models`): the cached moments' posterior in
the VAE's place and, when the cache holds text embeddings, the identity in the text encoder's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jip2p import checkpoints, edit
from jip2p.diffusion import editing
from jip2p.errors import ConfigError
from jip2p.models.layers import abstract_module
from jip2p.models.unet import UNet2DCondition
from jip2p.train import config as config_lib


def build_pipeline(config: ml_collections.ConfigDict) -> checkpoints.Pipeline:
  """The initial models of a run: ``config.model.init`` loaded (or random), its VAE replaced by
  ``config.model.vae`` and its text encoder and tokenizer by ``config.model.text_encoder``'s if
  given, the UNet's conv_in
  grown to 2 × latent channels (an edit run), remat and the compute dtype applied. Parameters
  are float32."""
  m = config.model
  dtype = jnp.dtype(m.compute_dtype)
  images = 2 if config.task == "edit" else 1  # images the UNet's input stacks: noisy (+ input)
  if m.init.startswith(config_lib.RANDOM_INIT_PREFIX):
    preset = m.init[len(config_lib.RANDOM_INIT_PREFIX):]
    pipeline = checkpoints.random_pipeline(preset, unet_in_channels=m.unet_in_channels // images,
                                           seed=m.seed, dtype=dtype)
  else:
    pipeline = checkpoints.load_pipeline(m.init, dtype=dtype, attention_impl=m.attention_impl,
                                         vae=m.vae or None)
  _check_family(config, pipeline)
  if m.vae and m.init.startswith(config_lib.RANDOM_INIT_PREFIX):
    pipeline.vae = checkpoints.load_vae(m.vae, dtype=dtype, attention_impl=m.attention_impl)
  if m.text_encoder:
    folder = (checkpoints.open_clip_text_folder(m.text_encoder) if m.text_encoder.endswith(".json")
              else m.text_encoder)
    pipeline.text_encoder, pipeline.tokenizer = checkpoints.load_text_encoder(
        folder, dtype=dtype, attention_impl=m.attention_impl)
  width = pipeline.text_encoder.config.hidden_size + (
      pipeline.text_encoder_2.config.hidden_size if pipeline.is_sdxl else 0)
  cross = pipeline.unet.config.cross_attention_dim
  if width != cross:
    raise ConfigError(f"the text encoder ({m.text_encoder or m.init}) is {width} wide, but the "
                      f"UNet's cross-attention expects {cross}")
  latent = pipeline.vae.config.latent_channels
  if m.unet_in_channels != images * latent:
    raise ConfigError(f"config.model.unet_in_channels={m.unet_in_channels}, but the model's "
                      f"VAE has {latent} latent channels: set it to {images * latent} for "
                      f"config.task={config.task!r}")
  unet = pipeline.unet
  if unet.config.in_channels != m.unet_in_channels:
    unet = checkpoints.expand_conv_in(unet, m.unet_in_channels)
  if unet.remat != m.remat or unet.attention_impl != m.attention_impl:
    rebuilt = abstract_module(lambda rngs: UNet2DCondition(
        unet.config, dtype=dtype, attention_impl=m.attention_impl, remat=m.remat, rngs=rngs))
    nnx.update(rebuilt, nnx.state(unet))
    unet = rebuilt
  pipeline.unet = unet
  return pipeline


def _check_family(config: ml_collections.ConfigDict, pipeline: checkpoints.Pipeline) -> None:
  """The model must be of the family ``config.model.family`` names (an SD config trains SD 1.x/2.x
  models, configs/ip2p_sdxl.py SDXL ones); SDXL trains InstructPix2Pix (task "edit") only."""
  family = "sdxl" if pipeline.is_sdxl else "sd"
  want = config.model.family
  if want and want != family:
    names = {"sd": "a Stable Diffusion 1.x/2.x model", "sdxl": "an SDXL model"}
    raise ConfigError(f"config.model.init={config.model.init} is {names[family]}, but this "
                      f"config trains {names[want]} (config.model.family={want!r}): use "
                      f"{'configs/ip2p_sdxl.py' if family == 'sdxl' else 'configs/ip2p_sd15.py'}"
                      " or another model")
  if pipeline.is_sdxl and config.task != "edit":
    raise ConfigError(f"config.task={config.task!r}: an SDXL model ({config.model.init}) trains "
                      "as an InstructPix2Pix editor only (config.task='edit')")


def split_unet(pipeline: checkpoints.Pipeline, res: int) -> tuple[nnx.GraphDef, nnx.State]:
  """The UNet as (graph, parameters), checked to be trainable on ``res``-pixel images."""
  factor = edit.size_step(pipeline.unet.config, pipeline.vae.config)
  if res % factor:
    raise ConfigError(f"config.data.res={res} must be a multiple of {factor} for this model "
                      "(VAE downscale × UNet downsampling)")
  unet_def, params, other = nnx.split(pipeline.unet, nnx.Param, ...)
  if jax.tree.leaves(other):
    raise ConfigError("the UNet holds state other than parameters, which training cannot carry")
  return unet_def, params


@dataclasses.dataclass(frozen=True)
class Frozen:
  """Frozen models as graphs and one state tree ``{"vae", "text_encoder", "null_text"}``, what
  `step.make_loss_fn` and `evaluate.make_edit_fn` merge; null_text is CLIP("") [1, L, D], or an
  SDXL model's (states [1, L, D], pooled [1, P]) as its editor's (`editing.sdxl_null_text`)."""
  vae_def: nnx.GraphDef
  text_def: nnx.GraphDef
  state: dict[str, Any]


def frozen_models(pipeline: checkpoints.Pipeline,
                  sharding: jax.sharding.Sharding) -> Frozen:
  """The pipeline's VAE and text model (`Pipeline.text_model`) and the null text, their state
  placed by ``sharding``."""
  vae_def, vae_state = nnx.split(pipeline.vae)
  text_def, text_state = nnx.split(pipeline.text_model())
  null_ids = np.asarray(pipeline.text_tokenizer()([""]), np.int32)
  null_text = jax.jit(lambda state, ids: nnx.merge(text_def, state)(ids))(text_state, null_ids)
  if pipeline.is_sdxl:
    null_text = editing.sdxl_null_text(null_text, edit.folder_zero_null_text(pipeline))
  state = {"vae": vae_state, "text_encoder": text_state, "null_text": null_text}
  return Frozen(vae_def, text_def, jax.device_put(state, sharding))


def step_models(config: ml_collections.ConfigDict, source, pipeline: checkpoints.Pipeline,
                frozen: Frozen, sharding: jax.sharding.Sharding
                ) -> tuple[Frozen, dict[str, jax.ShapeDtypeStruct]]:
  """The frozen models the train step runs, and the arrays of one micro-batch it is fed.

  From images, ``frozen`` itself. From a latent cache (``source`` a `LatentSource`, checked to
  fit this model): `latents.CachedVAE` in the VAE's place and, when the cache holds embeddings,
  `latents.PrecomputedText` in the text encoder's (token ids still go through the real one).
  """
  micro = config.batch_size // config.grad_accum
  if not config.data.latents:
    res = config.data.res
    image = jax.ShapeDtypeStruct((micro, res, res, 3), jnp.float32)
    ids = (micro, 2, 77) if pipeline.is_sdxl else (micro, 77)
    shapes = {"edited": image, "input_ids": jax.ShapeDtypeStruct(ids, jnp.int32),
              **micro_conditioning_shapes(pipeline, micro)}
    return frozen, shapes if config.task == "text_to_image" else {"input": image, **shapes}
  from jip2p.data import latents  # TensorFlow: only a run from a cache imports it.
  _check_cache(source.info, config, pipeline.vae.config, frozen.state["null_text"])
  vae_def, vae_state = nnx.split(latents.CachedVAE(pipeline.vae.config))
  text_def, text_state = (nnx.split(latents.PrecomputedText())
                          if source.info.text == "embeddings" else
                          (frozen.text_def, frozen.state["text_encoder"]))
  state = {"vae": vae_state, "text_encoder": text_state, "null_text": frozen.state["null_text"]}
  return (Frozen(vae_def, text_def, jax.device_put(state, sharding)),
          latents.latent_batch_shapes(source.info, micro))


def micro_conditioning_shapes(pipeline: checkpoints.Pipeline, micro: int
                              ) -> dict[str, jax.ShapeDtypeStruct]:
  """The batch arrays of an SDXL model's per-example micro-conditioning (`step.micro_conditioning`):
  ``original_size`` and ``crop_top_left`` int32 [micro, 2]; none for SD."""
  if not pipeline.is_sdxl:
    return {}
  pair = jax.ShapeDtypeStruct((micro, 2), jnp.int32)
  return {"original_size": pair, "crop_top_left": pair}


def _check_cache(info, config: ml_collections.ConfigDict, vae_config,
                 null_text: jax.Array) -> None:
  """A latent cache must come from this run's VAE (and text encoder) at ``config.data.res``."""
  res, f = config.data.res, vae_config.downscale
  sdxl = isinstance(null_text, tuple)  # (states, pooled)
  states = null_text[0] if sdxl else null_text
  ids_shape = ((2,) if sdxl else ()) + states.shape[1:2]
  text_shape = ids_shape if info.text == "ids" else states.shape[1:]
  pooled_shape = null_text[1].shape[1:] if sdxl and info.text == "embeddings" else ()
  want = {"resolution": (info.resolution, res),
          "VAE scaling factor": (info.scaling_factor, vae_config.scaling_factor),
          "latent shape": (info.latent_shape, (res // f, res // f, vae_config.latent_channels)),
          f"text shape ({info.text})": (info.text_shape, text_shape),
          "pooled text shape": (info.pooled_shape, pooled_shape),
          "SDXL micro-conditioning": (info.micro_conditioning, sdxl)}
  wrong = [f"{name} {got} (this run: {expected})" for name, (got, expected) in want.items()
           if got != expected]
  if wrong:
    raise ConfigError(f"the latent cache {config.data.path} does not fit this run's model "
                      f"({config.model.init}) at config.data.res={res}: its {'; '.join(wrong)}. "
                      "Write the cache with this model and resolution (jip2p-cache-latents "
                      "--model … --resolution …)")
