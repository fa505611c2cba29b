"""Trained weights written back as diffusers-format folders: at the end of a run, or later from
its checkpoints (`jip2p-export`).

An exported folder holds the trained UNet (EMA or raw weights) with the run's VAE, text encoder,
tokenizer and scheduler: it loads in `jip2p-edit` and in diffusers'
``StableDiffusionInstructPix2PixPipeline``.
"""

from __future__ import annotations

import dataclasses

import jax
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from jip2p import checkpoints, storage
from jip2p.errors import CheckpointError, ConfigError
from jip2p.train import config as config_lib
from jip2p.train import models
from jip2p.train.checkpointing import Checkpointer


def save_trained(pipeline: checkpoints.Pipeline, unet_def, params, out: str, *,
                 overwrite: bool = False, dtype: str = "float32") -> None:
  """Writes ``pipeline`` with its UNet rebuilt from ``unet_def`` and ``params`` (host arrays),
  the weights stored as ``dtype`` (`checkpoints.SAVE_DTYPES`)."""
  unet = nnx.merge(unet_def, params)
  checkpoints.save_pipeline(dataclasses.replace(pipeline, unet=unet), out, overwrite=overwrite,
                            dtype=dtype)


def export_at_end(state, pipeline: checkpoints.Pipeline, unet_def, workdir: str, which: str,
                  writer) -> None:
  """Writes the weights ``which`` names (comma-separated "ema", "raw"; config.export.at_end) of a
  finished run's ``state`` to ``<workdir>/export/<ema|raw>``. Every process gathers the
  weights; process 0 writes them."""
  for weights in filter(None, which.split(",")):
    params = multihost_utils.process_allgather(
        state.ema if weights == "ema" else state.params, tiled=True)
    if jax.process_index() == 0:
      out = str(epath.Path(workdir) / "export" / weights)
      save_trained(pipeline, unet_def, params, out, overwrite=True)
      writer.text(f"exported {weights} weights to {out}")


def export_from_workdir(workdir: str, out: str, *, weights: str = "ema", step: int | None = None,
                        overwrite: bool = False, dtype: str = "float32") -> int:
  """Writes the ``weights`` ("ema" or "raw") of checkpoint ``step`` (default: latest) to ``out``
  as a diffusers-format folder with ``dtype`` weights (float32 or float16, half the size);
  returns the step exported."""
  if weights not in config_lib.EXPORT_WEIGHTS:
    raise ConfigError(f"weights={weights!r}; choose one of {config_lib.EXPORT_WEIGHTS}")
  checkpoints.check_save_dtype(dtype)  # before the checkpoint is read, not after
  if epath.Path(out).exists() and not overwrite:
    raise CheckpointError(f"{out} exists; pass --overwrite to replace it")
  storage.check_writable(out, "--out")
  config = config_lib.read_config(workdir)
  pipeline = models.build_pipeline(config)
  checkpointer = Checkpointer(workdir, read_only=True)
  step = checkpointer.resolve_step(step)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          nnx.state(pipeline.unet, nnx.Param))
  params = checkpointer.restore_weights("params" if weights == "raw" else "ema", abstract, step)
  checkpointer.close()
  try:
    save_trained(pipeline, nnx.graphdef(pipeline.unet), params, out, overwrite=overwrite,
                 dtype=dtype)
  except OSError as e:  # e.g. a full disk; save_pipeline leaves no part of the folder behind
    raise CheckpointError(f"writing {out} failed: {e.strerror or e}; nothing was written") from None
  return step
