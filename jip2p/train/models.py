"""The models of a run: the pipeline ``config.model`` names.

`build_pipeline` is the one place that turns ``config.model`` into modules, so the trainer and
`jip2p-export` (which rebuilds the frozen VAE and text encoder from the run's saved config) agree.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx

from jip2p import checkpoints
from jip2p.errors import ConfigError
from jip2p.models.unet import UNet2DCondition
from jip2p.train import config as config_lib


def build_pipeline(config: ml_collections.ConfigDict) -> checkpoints.Pipeline:
  """The initial models of a run: ``config.model.init`` loaded (or random), the UNet's conv_in
  grown to 2 × latent channels, remat and the compute dtype applied. Parameters are float32."""
  m = config.model
  dtype = jnp.dtype(m.compute_dtype)
  if m.init.startswith(config_lib.RANDOM_INIT_PREFIX):
    preset = m.init[len(config_lib.RANDOM_INIT_PREFIX):]
    pipeline = checkpoints.random_pipeline(preset, unet_in_channels=m.unet_in_channels // 2,
                                           seed=m.seed, dtype=dtype)
  else:
    pipeline = checkpoints.load_pipeline(m.init, dtype=dtype, attention_impl=m.attention_impl)
  latent = pipeline.vae.config.latent_channels
  if m.unet_in_channels != 2 * latent:
    raise ConfigError(f"config.model.unet_in_channels={m.unet_in_channels}, but the model's "
                      f"VAE has {latent} latent channels: set it to {2 * latent}")
  unet = pipeline.unet
  if unet.config.in_channels != m.unet_in_channels:
    unet = checkpoints.expand_conv_in(unet, m.unet_in_channels)
  if unet.remat != m.remat or unet.attention_impl != m.attention_impl:
    rebuilt = nnx.eval_shape(lambda: UNet2DCondition(
        unet.config, dtype=dtype, attention_impl=m.attention_impl, remat=m.remat,
        rngs=nnx.Rngs(0)))
    nnx.update(rebuilt, nnx.state(unet))
    unet = rebuilt
  pipeline.unet = unet
  return pipeline
