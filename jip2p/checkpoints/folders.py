"""diffusers-format folders ↔ jip2p models, with no torch in the process.

A pipeline folder holds ``model_index.json`` and the components ``unet/``, ``vae/``,
``text_encoder/`` (each a ``config.json`` plus safetensors weights), ``tokenizer/`` and
``scheduler/``; an SDXL one also ``text_encoder_2/`` (``CLIPTextModelWithProjection``) and
``tokenizer_2/``, and its UNet takes the ``text_time`` added conditioning. `load_pipeline` reads it
straight into Flax NNX modules; `save_pipeline` writes one that diffusers'
``StableDiffusion(XL)InstructPix2PixPipeline.from_pretrained`` loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from typing import Any

import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jip2p import storage
from jip2p.checkpoints.mapping import load_torch_state_dict, to_torch_state_dict
from jip2p.errors import CheckpointError, ConfigError
from jip2p.models import clip_text, pixel_codec, unet, vae
from jip2p.models.layers import abstract_module
from jip2p.tokenizer import CLIPTokenizer, SDXLTokenizers, load_tokenizer

INDEX = "model_index.json"  # written last: a folder without it is not (yet) a model
# model_index.json settings of diffusers' SDXL pipelines that change what they compute (the
# unconditional text: zeros or the encoded empty prompt; CosXL Edit's EDM image-latent scaling),
# kept from the folder read to the folder written. diffusers passes model_index.json's entries
# to the pipeline's __init__, so is_cosxl_edit there is honoured though its own save omits it.
SDXL_INDEX_OPTIONS = ("force_zeros_for_empty_prompt", "is_cosxl_edit")

# diffusers / transformers class name → (config class, jip2p module class, weights file stem).
COMPONENT_CLASSES = {
    "UNet2DConditionModel": (unet.UNetConfig, unet.UNet2DCondition, "diffusion_pytorch_model"),
    "AutoencoderKL": (vae.VAEConfig, vae.AutoencoderKL, "diffusion_pytorch_model"),
    "CLIPTextModel": (clip_text.CLIPTextConfig, clip_text.CLIPTextEncoder, "model"),
    # SDXL's text_encoder_2 (OpenCLIP ViT-bigG with its text projection).
    "CLIPTextModelWithProjection": (clip_text.CLIPTextConfig,
                                    clip_text.CLIPTextEncoderWithProjection, "model"),
    # jip2p's exact pixel-space codec, in the VAE's place (no weights; diffusers cannot load it).
    "PixelCodec": (pixel_codec.PixelCodecConfig, pixel_codec.PixelCodec, "diffusion_pytorch_model"),
}
_LIBRARY = {"UNet2DConditionModel": "diffusers", "AutoencoderKL": "diffusers",
            "CLIPTextModel": "transformers", "CLIPTextModelWithProjection": "transformers",
            "PixelCodec": "diffusers"}

# Key spellings of other library versions (transformers 5 drops ``text_model.``, old diffusers VAEs
# say ``query``/``key``/``value``) → the one jip2p's modules are named after.
CANONICAL_KEYS = {"UNet2DConditionModel": dict, "AutoencoderKL": vae.canonical_state_dict,
                  "CLIPTextModel": clip_text.canonical_state_dict,
                  "CLIPTextModelWithProjection": clip_text.canonical_state_dict, "PixelCodec": dict}


@dataclasses.dataclass
class Pipeline:
  """The models of a Stable Diffusion (InstructPix2Pix) checkpoint, as jip2p modules; SDXL's
  second text encoder and its tokenizer in ``text_encoder_2`` / ``tokenizer_2`` (None for SD
  1.x/2.x)."""

  unet: unet.UNet2DCondition
  vae: vae.AutoencoderKL
  text_encoder: clip_text.CLIPTextEncoder
  tokenizer: CLIPTokenizer
  scheduler_config: dict[str, Any]
  folder: str | None = None
  text_encoder_2: clip_text.CLIPTextEncoderWithProjection | None = None
  tokenizer_2: CLIPTokenizer | None = None
  sdxl_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # SDXL_INDEX_OPTIONS

  @property
  def is_sdxl(self) -> bool:
    return self.text_encoder_2 is not None

  def text_model(self) -> clip_text.CLIPTextEncoder | clip_text.SDXLTextEncoders:
    """The text model training and the latent cache run: the text encoder, or an SDXL model's
    two as one (`clip_text.SDXLTextEncoders`: ids [B, 2, L] → (prompt states, pooled))."""
    if self.is_sdxl:
      return clip_text.SDXLTextEncoders(self.text_encoder, self.text_encoder_2)
    return self.text_encoder

  def text_tokenizer(self) -> CLIPTokenizer | SDXLTokenizers:
    """What makes `text_model`'s ids from texts: the tokenizer, or an SDXL model's two as one
    (`SDXLTokenizers`: ids [B, 2, 77])."""
    if self.is_sdxl:
      return SDXLTokenizers(self.tokenizer, self.tokenizer_2)
    return self.tokenizer


def is_sdxl_unet(config: unet.UNetConfig) -> bool:
  """Whether a UNet takes SDXL's added conditioning (pooled text + time ids)."""
  return config.addition_embed_type == "text_time"


def read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise CheckpointError(f"missing file: {path}")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def class_name(config: dict, where: str) -> str:
  """The component class a config.json describes (diffusers `_class_name` or transformers'
  `architectures`)."""
  name = config.get("_class_name") or (config.get("architectures") or [None])[0]
  if name not in COMPONENT_CLASSES:
    raise CheckpointError(f"{where}: unsupported model class {name!r}; jip2p reads "
                          f"{', '.join(COMPONENT_CLASSES)}")
  return name


def read_weights(folder: str, stem: str) -> dict[str, np.ndarray]:
  """All tensors of a component folder's safetensors file(s) (single or index-sharded)."""
  single = os.path.join(folder, f"{stem}.safetensors")
  index = single + ".index.json"
  if os.path.isfile(single):
    files = [single]
  elif os.path.isfile(index):
    shards = sorted(set(read_json(index)["weight_map"].values()))
    files = [os.path.join(folder, s) for s in shards]
  else:
    pickled = [f for f in os.listdir(folder) if f.endswith((".bin", ".ckpt", ".pt"))]
    hint = (f" (found {pickled[0]}: pickle weights are not read directly; re-save with "
            f"safe_serialization=True or use jip2p-convert)") if pickled else ""
    raise CheckpointError(f"missing weights: {single}{hint}")
  weights = {}
  for path in files:
    if not os.path.isfile(path):
      raise CheckpointError(f"missing weights shard: {path}")
    try:
      with safe_open(path, framework="numpy") as f:
        weights.update({k: f.get_tensor(k) for k in f.keys()})
    except TypeError:
      # numpy has no bfloat16: read such files through jax and widen to float32.
      with safe_open(path, framework="flax") as f:
        weights.update({k: np.asarray(jnp.asarray(f.get_tensor(k), jnp.float32))
                        for k in f.keys()})
    except Exception as e:
      raise CheckpointError(f"cannot read {path}: {e}") from None
  return weights


def build_component(config: dict, *, dtype=jnp.float32, attention_impl: str = "xla",
                    abstract: bool = False, seed: int = 0, where: str = "config",
                    embedding_std: dict[str, float] | None = None, remat: bool = False):
  """A jip2p module from a config.json dict: abstract (shapes only, to be loaded) or randomly
  initialised by `random_init` (``embedding_std`` passed on); ``remat``: a UNet that
  rematerialises its blocks in training."""
  name = class_name(config, where)
  config_cls, module_cls, _ = COMPONENT_CLASSES[name]
  try:
    parsed = config_cls.from_dict(config)
  except ConfigError as e:
    raise ConfigError(f"{where}: {e}") from None
  extra = {"remat": True} if remat else {}
  model = abstract_module(lambda rngs: module_cls(parsed, dtype=dtype,
                                                  attention_impl=attention_impl, rngs=rngs,
                                                  **extra), seed)
  if not abstract:
    random_init(model, seed, embedding_std=embedding_std)
  return model


def random_init(model: nnx.Module, seed: int, *,
                embedding_std: dict[str, float] | None = None) -> None:
  """Fills every parameter on the host: kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 0.02²)
  (transformers' CLIP init; ``embedding_std`` maps an embedding module's name, e.g.
  ``"token_embedding"``, to another standard deviation), norm scales 1, biases 0.

  Flax's eager initialisers compile one XLA kernel per parameter shape (tens of seconds for
  even the tiny preset on a CPU); this is the same kind of random model in milliseconds.
  """
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    shape = var.get_value().shape
    if path[-1] == "kernel":
      value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape)
    elif path[-1] == "embedding":
      value = rng.normal(0.0, (embedding_std or {}).get(str(path[-2]), 0.02), shape)
    elif path[-1] == "scale":
      value = np.ones(shape)
    else:
      value = np.zeros(shape)
    var.set_value(jnp.asarray(value, jnp.float32))


def load_component(folder: str, *, dtype=jnp.float32, attention_impl: str = "xla"):
  """One component folder (``config.json`` + safetensors) → its jip2p module."""
  if not os.path.isdir(folder):
    raise CheckpointError(f"missing folder: {folder}")
  config = read_json(os.path.join(folder, "config.json"))
  where = os.path.join(folder, "config.json")
  model = build_component(config, dtype=dtype, attention_impl=attention_impl, abstract=True,
                          where=where)
  name = class_name(config, where)
  weights = read_weights(folder, COMPONENT_CLASSES[name][2])
  weights = CANONICAL_KEYS[name](weights)
  load_torch_state_dict(model, weights, source=folder)
  return model


def load_pipeline(folder: str, *, dtype=jnp.float32, attention_impl: str = "xla",
                  vae: str | None = None) -> Pipeline:
  """A diffusers-format pipeline folder → `Pipeline` of jip2p modules (float32 parameters).

  An SDXL folder (its UNet takes ``text_time`` conditioning) must hold ``text_encoder_2/`` and
  ``tokenizer_2/``, which become ``text_encoder_2`` / ``tokenizer_2``.

  ``vae``: a separately given VAE in the folder's VAE's place (e.g. SDXL's fp16-fix VAE): a
  component folder (``config.json`` + weights) or a model folder holding ``vae/``; its latent
  channels must be the UNet's. A ``gs://`` folder (either) is read from a local copy, made once
  per host (`storage.local_copy`). The VAE computes in float32 in a half-precision run when its
  config says ``force_upcast`` (`vae.compute_dtype`)."""
  local = _local_folder(folder, INDEX)
  if not os.path.isdir(local):
    raise CheckpointError(f"missing model folder: {folder}")
  index = read_json(os.path.join(local, INDEX))
  load = lambda path: load_component(path, dtype=dtype, attention_impl=attention_impl)
  unet_model = load(os.path.join(local, "unet"))
  vae_model = (load(os.path.join(local, "vae")) if vae is None else
               load_vae(vae, dtype=dtype, attention_impl=attention_impl))
  if vae is not None:
    latent = vae_model.config.latent_channels
    if unet_model.config.in_channels not in (latent, 2 * latent):
      raise CheckpointError(
          f"VAE {vae} has {latent} latent channels; the UNet of {folder} takes "
          f"{unet_model.config.in_channels} input channels (the latents, or twice them for an "
          "edit model)")
  sdxl = {}
  second = os.path.join(local, "text_encoder_2")
  if is_sdxl_unet(unet_model.config) or os.path.isdir(second):
    sdxl = _sdxl_components(folder, local, unet_model, load)
    sdxl["sdxl_options"] = {k: index[k] for k in SDXL_INDEX_OPTIONS if k in index}
  return Pipeline(
      unet=unet_model, vae=vae_model, text_encoder=load(os.path.join(local, "text_encoder")),
      tokenizer=load_tokenizer(local),
      scheduler_config=read_json(os.path.join(local, "scheduler", "scheduler_config.json")),
      folder=folder, **sdxl)


def _sdxl_components(folder: str, local: str, unet_model, load) -> dict[str, Any]:
  """``text_encoder_2`` and ``tokenizer_2`` of an SDXL folder, checked against its UNet."""
  if not is_sdxl_unet(unet_model.config):
    raise CheckpointError(f"{folder} has text_encoder_2/ but its UNet does not take SDXL's "
                          "text_time conditioning (unet/config.json addition_embed_type)")
  for name in ("text_encoder_2", "tokenizer_2"):
    if not os.path.isdir(os.path.join(local, name)):
      raise CheckpointError(f"{folder} is not a complete SDXL folder: its UNet takes SDXL's "
                            f"text_time conditioning but it has no {name}/ (SDXL's second text "
                            "encoder and its tokenizer)")
  second = load(os.path.join(local, "text_encoder_2"))
  if not isinstance(second, clip_text.CLIPTextEncoderWithProjection):
    raise CheckpointError(f"{folder}/text_encoder_2 must be a CLIPTextModelWithProjection (SDXL's "
                          "pooled text is its projection)")
  return {"text_encoder_2": second,
          "tokenizer_2": load_tokenizer(os.path.join(local, "tokenizer_2"))}


def _local_folder(folder: str, marker: str) -> str:
  """``folder`` itself, or the local copy of a ``gs://`` one (whose ``marker`` file must exist:
  it is written last)."""
  if not storage.is_remote(folder):
    return folder
  if not epath.Path(folder, marker).exists():
    raise CheckpointError(f"missing file: {folder}/{marker} (not a model folder, or one still "
                          "being written)")
  return storage.local_copy(folder)


def load_vae(vae: str, *, dtype=jnp.float32, attention_impl: str = "xla"):
  """A separately given VAE (``--vae DIR``, ``config.model.vae``): a component folder
  (``config.json`` of an ``AutoencoderKL`` + weights) or a model folder holding ``vae/``."""
  return load_component(_vae_folder(vae), dtype=dtype, attention_impl=attention_impl)


def _vae_folder(vae: str) -> str:
  """The component folder of a separately given VAE: ``vae`` itself (one with ``config.json``;
  a ``gs://`` one must be such) or its ``vae/``."""
  local = _local_folder(vae, "config.json")
  if not os.path.isdir(local):
    raise CheckpointError(f"missing VAE folder: {vae}")
  for candidate in (local, os.path.join(local, "vae")):
    config = os.path.join(candidate, "config.json")
    if os.path.isfile(config):
      name = read_json(config).get("_class_name")
      if name != "AutoencoderKL":
        raise CheckpointError(f"{vae} is not a VAE folder: {config} describes a {name}, not an "
                              "AutoencoderKL")
      return candidate
  raise CheckpointError(f"{vae} is not a VAE folder: it holds neither config.json nor vae/")


def load_text_encoder(folder: str, *, dtype=jnp.float32, attention_impl: str = "xla"):
  """A folder holding ``text_encoder/`` and ``tokenizer/`` (a pipeline folder, or what
  ``jip2p-convert --open-clip-config`` writes from an open_clip CLIP) → (encoder, tokenizer)."""
  if not os.path.isdir(os.path.join(folder, "text_encoder")):
    raise CheckpointError(f"{folder} has no text_encoder/ folder (expected text_encoder/ and "
                          "tokenizer/, e.g. from jip2p-convert --open-clip-config)")
  return (load_component(os.path.join(folder, "text_encoder"), dtype=dtype,
                         attention_impl=attention_impl), load_tokenizer(folder))


def component_config(model) -> dict:
  """The diffusers / transformers config.json of a jip2p module."""
  name = next(n for n, (_, cls, _) in COMPONENT_CLASSES.items() if type(model) is cls)
  config = model.config.to_dict()
  if _LIBRARY[name] == "diffusers":
    return {"_class_name": name, **config}
  return {"architectures": [name], "model_type": "clip_text_model", **config}


# Weight dtypes a saved folder may hold. float16 halves the folder (diffusers' ``fp16`` weights);
# numpy has no bfloat16 to write.
SAVE_DTYPES = ("float32", "float16")


def check_save_dtype(dtype: str) -> None:
  """A named `ConfigError` for a weight dtype a saved folder cannot hold."""
  if dtype not in SAVE_DTYPES:
    raise ConfigError(f"dtype={dtype!r}; choose one of {SAVE_DTYPES}")


def _cast_weights(weights: dict[str, np.ndarray], dtype: str,
                  where: str) -> dict[str, np.ndarray]:
  """``weights`` (float32) as ``dtype``; a finite value that overflows it is a named error."""
  check_save_dtype(dtype)
  if dtype == "float32":  # already so: no copy, no scan (an SD UNet is 3.4 GB)
    return weights
  cast = {}
  for key, value in weights.items():
    with np.errstate(over="ignore"):  # overflow is reported below, by name
      cast[key] = value.astype(dtype)
    overflow = np.isinf(cast[key]) & np.isfinite(value)
    if overflow.any():
      raise CheckpointError(
          f"{where}: {key} has values up to {np.abs(value[overflow]).max():.4g}, beyond "
          f"{dtype}'s range (±{np.finfo(dtype).max:.4g}); save it as float32")
  return cast


def save_component(model, folder: str, *, dtype: str = "float32") -> None:
  """Writes ``config.json`` + safetensors for one module (torch layout, weights as ``dtype``)."""
  os.makedirs(folder, exist_ok=True)
  config = component_config(model)
  name = class_name(config, folder)
  tensors = _cast_weights(to_torch_state_dict(model), dtype, folder)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  weights = os.path.join(folder, COMPONENT_CLASSES[name][2] + ".safetensors")
  try:
    save_file(tensors, weights, metadata={"format": "pt"})
  except SafetensorError as e:  # its I/O errors (a full disk) as the OSError the callers name
    code = re.search(r"os error (\d+)", str(e))
    if code is None:
      raise
    number = int(code.group(1))
    raise OSError(number, os.strerror(number), weights) from None
  os.chmod(weights, 0o666 & ~storage.umask())  # safetensors creates it owner-only (0600)


def check_output_folder(folder: str, *, overwrite: bool = False) -> None:
  """A named `CheckpointError`, before any work, when `save_pipeline` could not write ``folder``.

  ``overwrite`` replaces only a pipeline folder (one with ``model_index.json``) or an empty one,
  never a folder of other files. Permissions are asked of the OS (`os.access`), which grants root
  everything but a read-only file system.
  """
  folder = os.path.abspath(folder)
  if os.path.exists(folder):
    if not os.path.isdir(folder):
      raise CheckpointError(f"{folder} exists and is a file, not a folder")
    if not overwrite:
      raise CheckpointError(f"{folder} exists; pass overwrite=True (--overwrite) to replace it")
    if os.listdir(folder) and not os.path.isfile(os.path.join(folder, "model_index.json")):
      raise CheckpointError(f"{folder} holds files but no model_index.json: overwrite replaces "
                            "only a diffusers pipeline folder; choose another folder")
  existing = os.path.dirname(folder)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise CheckpointError(f"cannot create {folder}: {existing} is a file, not a folder")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise CheckpointError(f"cannot create {folder}: {existing} is not writable")


def save_pipeline(pipeline: Pipeline, folder: str, *, overwrite: bool = False,
                  dtype: str = "float32") -> None:
  """Writes a diffusers-format pipeline folder, its weights as ``dtype`` (one of `SAVE_DTYPES`;
  loading widens them to float32 again), never half-written: a local folder appears by a rename
  of a temporary sibling; a ``gs://`` one is written locally first and uploaded with
  ``model_index.json`` last (`load_pipeline` reads nothing without it).

  An 8-channel UNet is declared a `StableDiffusionInstructPix2PixPipeline`, a 4-channel one a
  `StableDiffusionPipeline` (``StableDiffusionXL…`` for an SDXL pipeline, with
  ``text_encoder_2/`` and ``tokenizer_2/``).
  """
  remote = storage.is_remote(folder)
  folder = folder if remote else os.path.abspath(folder)
  if remote:
    if epath.Path(folder).exists() and not overwrite:
      raise CheckpointError(f"{folder} exists; pass overwrite=True (--overwrite) to replace it")
  else:
    check_output_folder(folder, overwrite=overwrite)
  parent = tempfile.gettempdir() if remote else os.path.dirname(folder)
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(folder), dir=parent)
  except OSError as e:
    raise CheckpointError(f"cannot write {folder}: {e.strerror or e}") from None
  os.chmod(tmp, 0o777 & ~storage.umask())  # mkdtemp's 0700 would hide the export from a team
  try:
    _write_folder(pipeline, tmp, dtype)
    if remote:
      storage.upload_folder(tmp, folder, last=INDEX)
    else:
      if os.path.exists(folder):
        shutil.rmtree(folder)
      os.replace(tmp, folder)
  except OSError as e:  # a full disk, a quota: the temporary folder goes, as on any failure
    raise CheckpointError(f"cannot write {folder}: {e.strerror or e}") from None
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)


def _write_folder(pipeline: Pipeline, folder: str, dtype: str) -> None:
  """The files of `save_pipeline` into the existing, empty local ``folder``."""
  save_component(pipeline.unet, os.path.join(folder, "unet"), dtype=dtype)
  save_component(pipeline.vae, os.path.join(folder, "vae"), dtype=dtype)
  save_component(pipeline.text_encoder, os.path.join(folder, "text_encoder"), dtype=dtype)
  pipeline.tokenizer.write_folder(os.path.join(folder, "tokenizer"))
  os.makedirs(os.path.join(folder, "scheduler"))
  with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(pipeline.scheduler_config, f, indent=2, sort_keys=True)
  ip2p = pipeline.unet.config.in_channels == 8
  family = "StableDiffusionXL" if pipeline.is_sdxl else "StableDiffusion"
  index = {
      "_class_name": f"{family}InstructPix2PixPipeline" if ip2p else f"{family}Pipeline",
      "_diffusers_version": "0.42.1",
      "unet": ["diffusers", "UNet2DConditionModel"],
      "vae": ["diffusers", "AutoencoderKL"],
      "text_encoder": ["transformers", "CLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"],
      "scheduler": ["diffusers", pipeline.scheduler_config.get("_class_name",
                                                               "EulerAncestralDiscreteScheduler")],
  }
  if pipeline.is_sdxl:
    save_component(pipeline.text_encoder_2, os.path.join(folder, "text_encoder_2"), dtype=dtype)
    pipeline.tokenizer_2.write_folder(os.path.join(folder, "tokenizer_2"))
    index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                 tokenizer_2=["transformers", "CLIPTokenizer"], **pipeline.sdxl_options)
  else:
    index.update(safety_checker=[None, None], requires_safety_checker=False)
  if not ip2p:
    index["image_encoder"] = [None, None]
  if not (ip2p and pipeline.is_sdxl):
    index["feature_extractor"] = [None, None]
  with open(os.path.join(folder, INDEX), "w") as f:
    json.dump(index, f, indent=2, sort_keys=True)
