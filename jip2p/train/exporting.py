"""The models a run trains from, and trained weights written back as diffusers-format folders.

`build_pipeline` is the one place that turns ``config.model`` into modules, so the trainer and
`jip2p-export` (which rebuilds the frozen VAE and text encoder from the run's saved config) agree.
An exported folder holds the trained UNet (EMA or raw weights) with the run's VAE, text encoder,
tokenizer and scheduler: it loads in `jip2p-edit` and in diffusers'
``StableDiffusionInstructPix2PixPipeline``.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from flax import nnx

from jip2p import checkpoints
from jip2p.errors import CheckpointError, ConfigError
from jip2p.models.unet import UNet2DCondition
from jip2p.train import config as config_lib
from jip2p.train.checkpointing import Checkpointer

CONFIG_FILE = "config.json"


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


def save_trained(pipeline: checkpoints.Pipeline, unet_def, params, out: str, *,
                 overwrite: bool = False, dtype: str = "float32") -> None:
  """Writes ``pipeline`` with its UNet rebuilt from ``unet_def`` and ``params`` (host arrays),
  the weights stored as ``dtype`` (`checkpoints.SAVE_DTYPES`)."""
  unet = nnx.merge(unet_def, params)
  checkpoints.save_pipeline(dataclasses.replace(pipeline, unet=unet), out, overwrite=overwrite,
                            dtype=dtype)


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  path = epath.Path(workdir) / CONFIG_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(config.to_json(indent=2, sort_keys=True))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in ``workdir`` was started with."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise CheckpointError(f"{path} does not exist: is {workdir} a jip2p-train work directory?")
  try:
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path} is not valid JSON: {e}") from None
  config_lib.validate(config)
  return config


def export_from_workdir(workdir: str, out: str, *, weights: str = "ema", step: int | None = None,
                        overwrite: bool = False, dtype: str = "float32") -> int:
  """Writes the ``weights`` ("ema" or "raw") of checkpoint ``step`` (default: latest) to ``out``
  as a diffusers-format folder with ``dtype`` weights (float32 or float16, half the size);
  returns the step exported."""
  if weights not in config_lib.EXPORT_WEIGHTS:
    raise ConfigError(f"weights={weights!r}; choose one of {config_lib.EXPORT_WEIGHTS}")
  checkpoints.check_save_dtype(dtype)  # before the checkpoint is read, not after
  config = read_config(workdir)
  pipeline = build_pipeline(config)
  checkpointer = Checkpointer(workdir, read_only=True)
  step = checkpointer.resolve_step(step)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          nnx.state(pipeline.unet, nnx.Param))
  params = checkpointer.restore_weights("params" if weights == "raw" else "ema", abstract, step)
  checkpointer.close()
  save_trained(pipeline, nnx.graphdef(pipeline.unet), params, out, overwrite=overwrite,
               dtype=dtype)
  return step
