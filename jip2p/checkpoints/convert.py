"""Single-file checkpoints in the original CompVis / LDM layout → diffusers-format folders.

Covers ``v1-5-pruned-emaonly.ckpt``-style SD 1.x files, SD 2.x (OpenCLIP text encoder) files,
the released ``instruct-pix2pix-00-22000.ckpt`` (8 input channels, EMA and raw weights) and SDXL
files in the SGM layout (``sd_xl_base_1.0.safetensors``): ``model.diffusion_model.*`` (the
UNet, its ``label_emb`` the text_time ``add_embedding``), ``first_stage_model.*``,
``conditioner.embedders.0.transformer.*`` (CLIP ViT-L in transformers' layout) and
``conditioner.embedders.1.model.*`` (OpenCLIP ViT-bigG in open_clip's layout: ``in_proj``
split into q/k/v, ``text_projection`` transposed). The key renaming is diffusers' own
(``diffusers.loaders.single_file_utils``); the configurations come from jip2p's presets with the
input channels read off the weights, so nothing is fetched from a hub. This needs torch, so
`convert_single_file` runs `convert_file` in a separate process, the ``jip2p-convert`` console
script (`jip2p.cli.convert`).

Pickle files (``.ckpt``/``.pt``/``.pth``/``.bin``) are opened with
``torch.load(weights_only=True)``: a file that holds anything but tensors and plain containers is
refused, never executed. Every problem with the file or the output folder is a one-line
`CheckpointError`; the paths are checked before the file is read, and the folder is written under
a temporary name, so an interrupted conversion leaves no ``dst`` behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
import warnings

from jip2p import storage
from jip2p.checkpoints import conv_in
from jip2p.checkpoints.folders import (Pipeline, build_component, check_output_folder,
                                      save_component, save_pipeline)
from jip2p.checkpoints.mapping import load_torch_state_dict
from jip2p.checkpoints.presets import preset_configs
from jip2p.errors import CheckpointError
from jip2p.models import clip_text
from jip2p.tokenizer import CLIPTokenizer

_UNET_PREFIX = "model.diffusion_model."
_OPEN_CLIP_KEY = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
_CLIP_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
# SDXL (SGM layout): CLIP ViT-L in embedder 0, OpenCLIP bigG in embedder 1 (the keys diffusers'
# single-file loader tells SDXL by); the refiner has bigG alone, in embedder 0.
_SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
_SDXL_KEY = _SDXL_OPEN_CLIP_PREFIX + "positional_embedding"
_SDXL_REFINER_KEY = "conditioner.embedders.0.model.text_projection"
_COMPONENT_PREFIXES = {"UNet": (_UNET_PREFIX,), "VAE": ("first_stage_model.",),
                       "text encoder": ("cond_stage_model.", "conditioner.embedders.")}
_CHILD_ERROR = "jip2p-convert: error: "  # how `jip2p.cli.run` prints a named error
# .safetensors, or a torch.save pickle under the names the released checkpoints use.
SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def convert_single_file(src: str, dst: str, *, preset: str | None = None, extract_ema: bool = True,
                        expand_conv_in: int | None = None, overwrite: bool = False,
                        dtype: str = "float32") -> str:
  """Converts ``src`` to a diffusers pipeline folder ``dst`` (weights as ``dtype``, one of
  `SAVE_DTYPES`) in a child process; returns ``dst``.

  Raises `CheckpointError` (the paths are checked here first, then the child's one-line message
  comes back), or RuntimeError with the child's last output when it failed for another reason.
  """
  check_paths(src, dst, overwrite=overwrite)
  cmd = [sys.executable, "-m", "jip2p.cli.convert", src, dst]
  cmd += ["--preset", preset] if preset else []
  cmd += [] if extract_ema else ["--no-ema"]
  cmd += ["--expand-conv-in", str(expand_conv_in)] if expand_conv_in else []
  cmd += ["--overwrite"] if overwrite else []
  cmd += ["--dtype", dtype]
  _run_child(cmd, src)
  return dst


def _run_child(cmd: list[str], src: str) -> None:
  """Runs a ``jip2p-convert`` child; its one named error comes back as `CheckpointError`."""
  result = subprocess.run(cmd, capture_output=True, text=True)
  if result.returncode == 0:
    return
  named = [line[len(_CHILD_ERROR):] for line in result.stderr.splitlines()
           if line.startswith(_CHILD_ERROR)]
  if result.returncode == 2 and named:
    raise CheckpointError(named[-1])
  raise RuntimeError(f"converting {src} failed (exit status {result.returncode}):\n"
                     f"{result.stderr[-4000:]}")


def open_clip_text_folder(config: str) -> str:
  """The text tower of the open_clip model whose config JSON is ``config`` (its weights beside it,
  same name with a `SUFFIXES` ending) as a folder of ``text_encoder/`` + ``tokenizer/``
  (`folders.load_text_encoder` reads it). Converted once per host and version of the files (the
  key is their paths, sizes and modification times) in a torch child process, into the model
  cache (``$JIP2P_MODEL_CACHE``); processes of one host may call it at once."""
  stem = os.path.splitext(config)[0]
  weights = next((stem + s for s in SUFFIXES if os.path.isfile(stem + s)), None)
  if not os.path.isfile(config) or weights is None:
    raise CheckpointError(f"{config}: expected an open_clip model config JSON with its weights "
                          f"beside it ({os.path.basename(stem)}.safetensors or .pt)")
  key = hashlib.sha256()
  for path in (config, weights):
    stat = os.stat(path)
    key.update(f"\0{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
  root = storage.cache_root()
  final = os.path.join(root, "open_clip-text-" + key.hexdigest()[:32])
  if os.path.isdir(final):
    return final
  os.makedirs(root, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
  try:
    _run_child([sys.executable, "-m", "jip2p.cli.convert", "--open-clip-config", config, weights,
                os.path.join(tmp, "text")], weights)
    try:
      os.rename(os.path.join(tmp, "text"), final)
    except OSError:  # another process of this host finished first
      if not os.path.isdir(final):
        raise
  finally:
    shutil.rmtree(tmp)
  return final


def check_paths(src: str, dst: str, *, overwrite: bool = False) -> None:
  """Named errors for a source that cannot be a single-file checkpoint or a ``dst`` that cannot
  be written, before the file is read (a torch-free check: the parent runs it too)."""
  check_source(src)
  check_output_folder(dst, overwrite=overwrite)


def check_source(src: str) -> None:
  """A named error for a path that cannot be a single-file checkpoint (no file is read)."""
  if not os.path.exists(src):
    raise CheckpointError(f"{src} does not exist")
  if os.path.isdir(src):
    raise CheckpointError(f"{src} is a folder; give one single-file checkpoint (a diffusers "
                          "folder needs no conversion)")
  if not src.lower().endswith(SUFFIXES):
    raise CheckpointError(f"{src}: not a single-file checkpoint; expected one of "
                          f"{', '.join(SUFFIXES)}")
  if os.path.getsize(src) == 0:
    raise CheckpointError(f"{src} is empty (0 bytes)")


def read_single_file(path: str) -> dict:
  """The flat tensor dict of a single-file checkpoint (``state_dict`` unwrapped); entries that
  are not named tensors (a step counter, ...) are dropped."""
  state = read_state_dict(path)
  for component, prefixes in _COMPONENT_PREFIXES.items():
    if not any(k.startswith(prefixes) for k in state):
      raise CheckpointError(f"{path} is not a complete Stable Diffusion checkpoint in the original "
                            f"layout: it has no {component} weights "
                            f"({' or '.join(repr(p + '*') for p in prefixes)})")
  return state


def read_state_dict(path: str) -> dict:
  """The named torch tensors of a ``.safetensors`` file or a torch.save pickle (opened weights
  only; a ``state_dict`` entry unwrapped)."""
  import torch
  if path.lower().endswith(".safetensors"):
    state = _read_safetensors(path)
  else:
    with warnings.catch_warnings():  # torch's pickle-protocol notice; a refusal is named below
      warnings.simplefilter("ignore", UserWarning)
      try:
        state = torch.load(path, map_location="cpu", weights_only=True)
      except Exception as e:  # noqa: BLE001 - torch.load's errors on arbitrary bytes are unbounded
        raise _pickle_error(path, e) from None
  if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
    state = state["state_dict"]
  if not isinstance(state, dict):
    raise CheckpointError(f"{path} holds a {type(state).__name__}, not a dict of named weights")
  return {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _read_safetensors(path: str) -> dict:
  from safetensors import SafetensorError
  from safetensors.torch import load_file
  try:
    return load_file(path)
  except SafetensorError as e:
    raise CheckpointError(f"{path} is not a readable .safetensors file (corrupt, truncated or "
                          f"another format): {str(e).strip().splitlines()[0]}") from None
  except OSError as e:
    raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None


def _pickle_error(path: str, error: Exception) -> CheckpointError:
  """The one-line reason torch.load(weights_only=True) failed, never suggesting to unpickle code."""
  unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
  if unsafe:
    return CheckpointError(f"{path}: refusing to unpickle it: it holds {unsafe.group(1)}, which "
                           "unpickling would run code to build (only tensors and plain "
                           "containers are loaded)")
  return CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt, truncated, or not "
                         f"written by torch.save; {type(error).__name__} while loading weights "
                         "only)")


def _torch_to_numpy(state: dict) -> dict:
  import torch
  return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()
          if isinstance(v, torch.Tensor)}


def detect_preset(state: dict) -> str:
  """sd15, sd21 or sdxl, by the text encoders the file carries."""
  if _SDXL_REFINER_KEY in state:
    raise CheckpointError("this is an SDXL refiner checkpoint (OpenCLIP bigG alone, in "
                          "conditioner.embedders.0): jip2p converts SDXL base-layout files only")
  if _SDXL_KEY in state:
    return "sdxl"
  if _OPEN_CLIP_KEY in state:
    return "sd21"
  if _CLIP_KEY in state:
    return "sd15"
  raise CheckpointError("unrecognised text encoder: neither the CLIP ViT-L/14 (SD 1.x), the "
                        "OpenCLIP ViT-H (SD 2.x) nor SDXL's two encoders' weights are present")


def _check_family(state: dict, preset: str, configs: dict) -> None:
  """A named error where the file's family (SDXL or SD 1.x/2.x) is not ``preset``'s."""
  sdxl_file, sdxl_preset = _SDXL_KEY in state, "text_encoder_2" in configs
  if sdxl_file and not sdxl_preset:
    raise CheckpointError(f"the file is an SDXL checkpoint ({_SDXL_OPEN_CLIP_PREFIX}*) but "
                          f"--preset {preset} is not an SDXL preset: use sdxl (or omit --preset)")
  if sdxl_preset and not sdxl_file:
    raise CheckpointError(f"--preset {preset} is SDXL's but the file is not an SDXL checkpoint "
                          f"(no {_SDXL_KEY}): use sd15 / sd21 (or omit --preset)")


def convert_state(state: dict, *, preset: str | None = None, extract_ema: bool = True):
  """A single-file state dict → jip2p `Pipeline`.

  ``preset`` names the architecture (see `jip2p.checkpoints.PRESETS`); by default SD 1.x or 2.x is
  detected from the text encoder. The UNet's input channels are read off the weights.
  """
  from diffusers.loaders import single_file_utils as sfu  # torch: this process only

  preset = preset or detect_preset(state)
  try:  # a weight the renaming needs is missing; one the model needs is named further down
    in_channels = int(state[_UNET_PREFIX + "input_blocks.0.0.weight"].shape[1])
    configs = preset_configs(preset, unet_in_channels=in_channels)
    _check_family(state, preset, configs)
    unet_sd = sfu.convert_ldm_unet_checkpoint(state, configs["unet"], extract_ema=extract_ema)
    vae_sd = sfu.convert_ldm_vae_checkpoint(state, configs["vae"])
    sds = {}
    if "text_encoder_2" in configs:
      sds["text_encoder_2"] = _open_clip_text(configs["text_encoder_2"]["hidden_size"], state,
                                              _SDXL_OPEN_CLIP_PREFIX)
    if _OPEN_CLIP_KEY in state:
      text_sd = _open_clip_text(configs["text_encoder"]["hidden_size"], state,
                                "cond_stage_model.model.")
    else:
      text_sd = clip_text.canonical_state_dict(sfu.convert_ldm_clip_checkpoint(state))
  except KeyError as e:
    raise CheckpointError(f"incomplete checkpoint: the weight {e.args[0]!r} is missing") from None
  modules = {}
  sds = {"unet": unet_sd, "vae": vae_sd, "text_encoder": text_sd, **sds}
  for name, sd in sds.items():
    modules[name] = build_component(configs[name], abstract=True, where=f"{preset}/{name}")
    load_torch_state_dict(modules[name], _torch_to_numpy(sd), source=f"converted {name}")
  tokenizer = CLIPTokenizer.open_clip() if _OPEN_CLIP_KEY in state else CLIPTokenizer.default()
  sdxl = ({"text_encoder_2": modules["text_encoder_2"], "tokenizer_2": CLIPTokenizer.open_clip()}
          if "text_encoder_2" in modules else {})
  return Pipeline(unet=modules["unet"], vae=modules["vae"], text_encoder=modules["text_encoder"],
                  tokenizer=tokenizer, scheduler_config=configs["scheduler"], **sdxl)


def _open_clip_text(hidden_size: int, state: dict, prefix: str) -> dict:
  """An open_clip text tower under ``prefix`` in transformers' layout (diffusers' renaming:
  ``in_proj`` split into q/k/v, ``text_projection`` transposed; SD 2.x's skipped last layer
  dropped under its own prefix only)."""
  from diffusers.loaders import single_file_utils as sfu  # torch: this process only
  # diffusers reads only text_model.config.hidden_size from its model argument.
  model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=hidden_size))
  return sfu.convert_open_clip_checkpoint(model, state, prefix=prefix)


def convert_file(src: str, dst: str, *, preset: str | None = None, extract_ema: bool = True,
                 expand_conv_in: int | None = None, overwrite: bool = False,
                 dtype: str = "float32") -> Pipeline:
  """`convert_single_file`'s work, in this process (which needs torch); returns the pipeline
  written to ``dst``."""
  check_paths(src, dst, overwrite=overwrite)
  pipeline = convert_state(read_single_file(src), preset=preset, extract_ema=extract_ema)
  if expand_conv_in and expand_conv_in != pipeline.unet.config.in_channels:
    pipeline.unet = conv_in.expand_conv_in(pipeline.unet, expand_conv_in)
  save_pipeline(pipeline, dst, overwrite=overwrite, dtype=dtype)
  return pipeline


# open_clip text_cfg keys whose non-default values jip2p's CLIPTextEncoder cannot express.
_OPEN_CLIP_TEXT_DEFAULTS = {"hf_model_name": None, "ls_init_value": None, "embed_cls": False,
                            "no_causal_mask": False, "attn_pooler_heads": None,
                            "act_kwargs": None, "norm_kwargs": None, "pad_id": 0}


def open_clip_text_config(config: dict, where: str = "open_clip config") -> clip_text.CLIPTextConfig:
  """The transformers-style config of an open_clip model config's text tower (``text_cfg``,
  ``quick_gelu``); `CheckpointError` for a text tower CLIPTextModel cannot express."""
  text = config.get("text_cfg") if isinstance(config, dict) else None
  if not isinstance(text, dict):
    raise CheckpointError(f"{where} is not an open_clip model config: it has no text_cfg")
  unsupported = sorted(k for k, default in _OPEN_CLIP_TEXT_DEFAULTS.items()
                       if text.get(k, default) != default)
  if unsupported:
    raise CheckpointError(f"{where}: the text tower's {', '.join(unsupported)} cannot be "
                          "converted to a CLIPTextModel (a plain causal transformer)")
  width = int(text.get("width", 512))
  return clip_text.CLIPTextConfig(
      vocab_size=int(text.get("vocab_size", 49408)), hidden_size=width,
      intermediate_size=int(width * float(text.get("mlp_ratio", 4.0))),
      num_hidden_layers=int(text.get("layers", 12)), num_attention_heads=int(text.get("heads", 8)),
      max_position_embeddings=int(text.get("context_length", 77)),
      hidden_act="quick_gelu" if config.get("quick_gelu", False) else "gelu",
      pad_token_id=0, bos_token_id=49406, eos_token_id=49407)


def convert_open_clip_text(weights: str, config: str):
  """An open_clip CLIP's text tower → (jip2p `CLIPTextEncoder`, its `CLIPTokenizer`).

  ``weights``: the model's state dict (``.safetensors`` or a torch.save pickle, open_clip's own
  key layout: ``token_embedding.weight``, ``transformer.resblocks.N.*``, ``ln_final.*`` ...);
  ``config``: its open_clip model config JSON. The encoder's hidden states are open_clip's
  per-token text states after ``ln_final`` (before pooling and ``text_projection``, which a
  CLIPTextModel does not have). The renaming is diffusers' ``convert_open_clip_checkpoint``, as
  for SD 2.x single files, called with no key prefix so that its SD 2 rule (drop
  ``cond_stage_model.model.transformer.resblocks.23``, the layer SD 2.x skips) matches nothing:
  every layer of the file is kept. Needs torch.
  """
  for path in (weights, config):
    if not os.path.isfile(path):
      raise CheckpointError(f"{path} does not exist")
  try:
    with open(config) as f:
      cfg = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read the open_clip config {config}: {e}") from None
  text_config = open_clip_text_config(cfg, where=config)
  state = {k: v.float() for k, v in read_state_dict(weights).items()}
  if "token_embedding.weight" not in state:
    raise CheckpointError(f"{weights} is not an open_clip CLIP state dict: it has no "
                          "'token_embedding.weight' (a text tower in open_clip's layout)")
  text_sd = _open_clip_text(text_config.hidden_size, state, prefix="")
  text_sd.pop("text_projection.weight", None)
  config_dict = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                 **text_config.to_dict()}
  encoder = build_component(config_dict, abstract=True, where=config)
  load_torch_state_dict(encoder, _torch_to_numpy(text_sd), source=f"text tower of {weights}")
  return encoder, CLIPTokenizer.open_clip()


def save_text_encoder(encoder, tokenizer: CLIPTokenizer, folder: str, *, overwrite: bool = False,
                      dtype: str = "float32") -> None:
  """Writes ``folder/text_encoder/`` (transformers ``CLIPTextModel`` config.json + safetensors)
  and ``folder/tokenizer/``, the two components of a diffusers pipeline folder; ``folder``
  appears by renaming a temporary sibling. ``overwrite`` replaces only a folder that holds
  nothing but those two."""
  folder = os.path.abspath(folder)
  if os.path.exists(folder):
    if not overwrite:
      raise CheckpointError(f"{folder} exists; pass overwrite=True to replace it")
    if not os.path.isdir(folder) or set(os.listdir(folder)) - {"text_encoder", "tokenizer"}:
      raise CheckpointError(f"{folder} holds other files than text_encoder/ and tokenizer/; "
                            "choose another folder")
  parent = os.path.dirname(folder)
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(folder), dir=parent)
  except OSError as e:
    raise CheckpointError(f"cannot write {folder}: {e.strerror or e}") from None
  os.chmod(tmp, 0o777 & ~storage.umask())  # mkdtemp's 0700 would hide the folder from a team
  try:
    save_component(encoder, os.path.join(tmp, "text_encoder"), dtype=dtype)
    tokenizer.write_folder(os.path.join(tmp, "tokenizer"))
    if os.path.exists(folder):
      shutil.rmtree(folder)
    os.replace(tmp, folder)
  except OSError as e:
    raise CheckpointError(f"cannot write {folder}: {e.strerror or e}") from None
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
