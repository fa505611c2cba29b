"""The training config schema, and the checks that turn a bad config into one clear error at start.

Every file in ``configs/`` starts from `base_config()` (the paper's recipe, docs/design.md §1) and
changes values; `validate` rejects keys the schema does not know (a typo must not be silently
ignored), values of the wrong type or outside their range, and combinations that cannot run on the
devices at hand (a batch that does not split over them, a mesh that does not cover them). A run
saves its config in its work directory (`write_config`), where `jip2p-export` reads it back
(`read_config`).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os

import ml_collections
from etils import epath

from jip2p import files
from jip2p.config_schema import check_keys
from jip2p.errors import CheckpointError, ConfigError
from jip2p.models.attention import IMPLEMENTATIONS

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
NONFINITE_POLICIES = ("stop", "skip")
DATA_SOURCES = ("synthetic", "tfrecord")
TASKS = ("edit", "text_to_image")
FAMILIES = ("", "sd", "sdxl")
EXPORT_WEIGHTS = ("ema", "raw")
RANDOM_INIT_PREFIX = "random:"
CONFIG_FILE = "config.json"  # In a work directory: the config its run was started with.


def base_config() -> ml_collections.ConfigDict:
  """All keys a training config may have, with InstructPix2Pix's values (SD 1.5, 256 px)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 10_000
  c.batch_size = 1024  # Global examples per optimizer step: per device × devices × grad_accum.
  c.grad_accum = 4
  # "edit": InstructPix2Pix (the UNet sees the noisy latent and the input image's latent, the
  # text is the instruction). "text_to_image": the base model it starts from (the UNet sees the
  # noisy latent only, the text is a caption of the image): the same loop and step, for the
  # procedural world's captions (data.source="synthetic"), where no pretrained base exists.
  c.task = "edit"

  # init: a diffusers-format folder (SD 1.5 / 2.1 or an InstructPix2Pix model) or "random:<preset>"
  # (jip2p.checkpoints.PRESETS, seeded by model.seed). The UNet's conv_in grows to
  # unet_in_channels = 2 × the VAE's latent channels (new channels zero); for task
  # "text_to_image" it is the latent channels. text_encoder: replaces init's text encoder and
  # tokenizer (frozen, as SD keeps its CLIP's): a folder with text_encoder/ and tokenizer/, or an
  # open_clip model config JSON with its weights beside it, whose text tower is converted once
  # per host (`jip2p-convert --open-clip-config`, cached); its width must be the UNet's
  # cross-attention width. vae: replaces init's VAE (e.g. an fp16-fix VAE): a VAE folder or a
  # model folder holding vae/ (`checkpoints.load_vae`); its latent channels must be the UNet's.
  # family: the kind of model init must be, "sd" (Stable Diffusion 1.x/2.x), "sdxl" (both text
  # encoders, a text_time UNet: jip2p.train.step's SDXL conditioning), or "" (either); another
  # kind of folder is refused before training starts.
  c.model = ml_collections.ConfigDict(dict(
      init="", text_encoder="", vae="", seed=0, unet_in_channels=8, compute_dtype="bfloat16",
      attention_impl="xla", remat=False, family=""))

  # source "tfrecord": jip2p's triplet shards under `path` (jip2p.data.reader); "synthetic":
  # the first `num_examples` pairs of the procedural edit world (jip2p.data.synthetic), for tests
  # and smoke runs; for task "text_to_image", its first `num_examples` scenes, each drawn with a
  # training wording of its caption at every use. latents=True: `path` is a latent cache written by jip2p-cache-latents from the
  # run's own model (jip2p.data.latents) and the step runs no VAE encoder (nor text encoder, when
  # the cache holds embeddings); the crop is the cache's centre crop at its resize (resize_min and
  # resize_max are not used), res must equal its resolution.
  c.data = ml_collections.ConfigDict(dict(
      source="tfrecord", path="", res=256, resize_min=256, resize_max=288, flip=True,
      num_examples=8, shuffle_buffer=10_000, latents=False))

  # One r ~ U(0, 1) per example: r < 2p drops the text (CLIP("")), p ≤ r < 3p the image latent.
  c.conditioning_dropout = 0.05

  c.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip_norm=0.0))
  c.ema = ml_collections.ConfigDict(dict(decay=0.9999, warmup=True))

  # data=-1: all devices not used by fsdp. Pure data parallelism is fsdp=1. dcn_data > 1: a
  # multi-slice TPU run (v5e/v5p slices joined over the data-center network) with the data axis
  # split into dcn_data slices, so that only gradient reductions cross slices and every fsdp
  # group stays inside one slice.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, dcn_data=1))
  # Tensors with fewer elements than this stay replicated under FSDP.
  c.sharding = ml_collections.ConfigDict(dict(min_fsdp_size=2 ** 14))

  # A non-finite loss or gradient: "stop" raises naming the step (the last checkpoint is good),
  # "skip" leaves the state unchanged for that step and goes on.
  c.nonfinite = "stop"

  # Saves are asynchronous, so frequent ones cost little; a preemption without time to save (a
  # spot VM has ~30 s) loses the steps since the last one: 100 steps of seconds are minutes.
  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=100, keep=3, keep_every=0, async_save=True))
  c.log_every_steps = 50
  # Every `every_steps` (0: never), edit `num_images` fixed validation pairs with the EMA weights.
  c.eval = ml_collections.ConfigDict(dict(
      every_steps=1000, num_images=4, num_steps=20, text_scale=7.5, image_scale=1.5))
  # 0: look the peak up by device kind (jip2p.train.metrics.PEAK_FLOPS).
  c.metrics = ml_collections.ConfigDict(dict(peak_flops_per_device=0.0))
  # steps > 0: a jax.profiler trace of that many steps into <workdir>/profile/, after `skip`
  # steps of this start (compilation and warm-up).
  c.profile = ml_collections.ConfigDict(dict(steps=0, skip=10))
  # Weights written as diffusers folders under <workdir>/export/ when training ends.
  c.export = ml_collections.ConfigDict(dict(at_end="ema"))
  return c


def load(spec: str) -> ml_collections.ConfigDict:
  """``path.py[:arg]`` → the ConfigDict its ``get_config(arg)`` returns (any jip2p config file)."""
  path, _, arg = spec.partition(":")
  if os.path.isdir(path):
    raise ConfigError(f"{path} is a folder: give a config .py file in it")
  if not os.path.isfile(path):
    raise ConfigError(f"config file not found: {path}")
  module_spec = importlib.util.spec_from_file_location("jip2p_config_file", path)
  if module_spec is None:  # not a name Python imports (a .py file)
    raise ConfigError(f"{path} is not a Python file: a config is a .py file with get_config()")
  module = importlib.util.module_from_spec(module_spec)
  try:  # A config file is the user's code: whatever it raises is a problem with the config.
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise ConfigError(f"{path} has no get_config()")
    return module.get_config(arg or None)
  except ConfigError as e:
    raise ConfigError(str(e) if str(e).startswith(path) else f"{path}: {e}") from None
  except Exception as e:  # e.g. a syntax error, a value of another type
    raise ConfigError(f"{path}: {type(e).__name__}: {' '.join(str(e).split())}") from None


def parse_arg(arg: str | None, **defaults):
  """``"res=512,init=/ckpt"`` → dict of the defaults updated with typed values (big_vision style).

  Each value is read as a Python literal when it is one, else kept as a string; a key not in
  ``defaults`` is an error naming it.
  """
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep:
      raise ConfigError(f"config argument {item!r} is not of the form key=value")
    if key not in defaults:
      raise ConfigError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def validate(config: ml_collections.ConfigDict) -> None:
  """Device-independent checks: keys, types, ranges and choices. Raises `ConfigError`."""
  check_keys(config, base_config())
  m, d, o = config.model, config.data, config.optimizer
  _require(bool(m.init), "config.model.init is empty: set it to a diffusers-format Stable "
           "Diffusion folder (--config.model.init=/path/to/sd15) or to 'random:tiny'")
  _require(m.compute_dtype in COMPUTE_DTYPES,
           f"config.model.compute_dtype={m.compute_dtype!r}; choose one of {COMPUTE_DTYPES}")
  _require(m.attention_impl in IMPLEMENTATIONS,
           f"config.model.attention_impl={m.attention_impl!r}; choose one of {IMPLEMENTATIONS}")
  _require(config.task in TASKS, f"config.task={config.task!r}; choose one of {TASKS}")
  _require(m.family in FAMILIES,
           f"config.model.family={m.family!r}; choose one of {FAMILIES} ('': either)")
  text_to_image = config.task == "text_to_image"
  _require(not text_to_image or (d.source == "synthetic" and not d.latents),
           "config.task='text_to_image' trains on the procedural world's captions: set "
           "config.data.source='synthetic' (and config.data.latents=False)")
  _require(not text_to_image or not d.flip, "config.task='text_to_image': captions name places "
           "('on the left'), so set config.data.flip=False")
  _require(not text_to_image or config.eval.every_steps == 0,
           "config.eval edits validation pairs, which a text_to_image run has none of: set "
           "config.eval.every_steps=0")
  _require(text_to_image or (m.unet_in_channels >= 2 and m.unet_in_channels % 2 == 0),
           f"config.model.unet_in_channels={m.unet_in_channels}: InstructPix2Pix conditions on "
           "the noisy latent and the image latent, so it must be 2 × the VAE's latent channels "
           "(8 for Stable Diffusion)")
  _require(d.source in DATA_SOURCES,
           f"config.data.source={d.source!r}; choose one of {DATA_SOURCES}")
  _require(d.source != "tfrecord" or bool(d.path), "config.data.path is empty: set it to the "
           "folder of training shards (--config.data.path=...) or use "
           "config.data.source='synthetic'")
  _require(not d.latents or (d.source == "tfrecord" and bool(d.path)),
           "config.data.latents=True reads a latent cache: set config.data.source='tfrecord' and "
           "config.data.path to the folder jip2p-cache-latents wrote")
  _require(d.res > 0 and d.resize_min >= d.res and d.resize_max >= d.resize_min,
           f"config.data needs 0 < res ≤ resize_min ≤ resize_max, got res={d.res}, "
           f"resize_min={d.resize_min}, resize_max={d.resize_max}")
  _require(d.num_examples > 0, f"config.data.num_examples={d.num_examples} must be positive")
  for key in ("total_steps", "batch_size", "grad_accum", "log_every_steps"):
    _require(config[key] > 0, f"config.{key}={config[key]} must be positive")
  _require(config.batch_size % config.grad_accum == 0,
           f"config.batch_size={config.batch_size} is not divisible by "
           f"config.grad_accum={config.grad_accum}")
  _require(0.0 <= config.conditioning_dropout <= 1 / 3, "config.conditioning_dropout="
           f"{config.conditioning_dropout} must be in [0, 1/3] (3p of the examples are dropped)")
  _require(o.lr > 0, f"config.optimizer.lr={o.lr} must be positive")
  _require(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"config.optimizer b1={o.b1}, b2={o.b2} must be in "
           "[0, 1)")
  _require(o.eps > 0 and o.weight_decay >= 0 and o.grad_clip_norm >= 0,
           "config.optimizer needs eps > 0, weight_decay ≥ 0 and grad_clip_norm ≥ 0 (0: off)")
  _require(0 <= config.ema.decay < 1, f"config.ema.decay={config.ema.decay} must be in [0, 1)")
  _require(config.mesh.fsdp >= 1 and config.mesh.dcn_data >= 1
           and (config.mesh.data >= 1 or config.mesh.data == -1),
           f"config.mesh data={config.mesh.data}, fsdp={config.mesh.fsdp}, dcn_data="
           f"{config.mesh.dcn_data}: sizes must be ≥ 1 (data may be -1: all devices left)")
  _require(config.profile.steps >= 0 and config.profile.skip >= 0,
           "config.profile needs steps ≥ 0 (0: off) and skip ≥ 0")
  _require(config.nonfinite in NONFINITE_POLICIES,
           f"config.nonfinite={config.nonfinite!r}; choose one of {NONFINITE_POLICIES}")
  c = config.checkpoint
  _require(c.every_steps > 0 and c.keep > 0 and c.keep_every >= 0,
           "config.checkpoint needs every_steps > 0, keep > 0 and keep_every ≥ 0 (0: off)")
  e = config.eval
  _require(e.every_steps >= 0 and e.num_images > 0 and e.num_steps > 0,
           "config.eval needs every_steps ≥ 0 (0: off), num_images > 0 and num_steps > 0")
  _require(config.metrics.peak_flops_per_device >= 0,
           "config.metrics.peak_flops_per_device must be ≥ 0 (0: from the device kind)")
  weights = [w for w in config.export.at_end.split(",") if w]
  _require(all(w in EXPORT_WEIGHTS for w in weights), f"config.export.at_end="
           f"{config.export.at_end!r}: a comma-separated subset of {EXPORT_WEIGHTS}, or ''")


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int,
               num_processes: int = 1) -> tuple[int, int]:
  """(data, fsdp) for ``num_devices``; raises `ConfigError` when the batch or mesh do not fit."""
  fsdp, data = config.mesh.fsdp, config.mesh.data
  if data == -1:
    _require(num_devices % fsdp == 0, f"config.mesh.fsdp={fsdp} does not divide the "
             f"{num_devices} devices")
    data = num_devices // fsdp
  _require(data * fsdp == num_devices, f"config.mesh data={data} × fsdp={fsdp} = {data * fsdp} "
           f"devices, but there are {num_devices}")
  _require(data % config.mesh.dcn_data == 0, f"config.mesh.dcn_data={config.mesh.dcn_data} "
           f"slices do not divide the data axis of {data}")
  micro = config.batch_size // config.grad_accum
  _require(micro % num_devices == 0,
           f"config.batch_size={config.batch_size} / grad_accum={config.grad_accum} = {micro} "
           f"examples per micro-step do not split evenly over {num_devices} devices")
  _require(num_devices % num_processes == 0,
           f"{num_devices} devices do not split evenly over {num_processes} processes")
  return data, fsdp


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Saves ``config`` as ``workdir``'s `CONFIG_FILE`, whole (a local one under a temporary name,
  then renamed: a full disk leaves the previous run's file, which export reads, as it was)."""
  path = epath.Path(workdir) / CONFIG_FILE
  text = config.to_json(indent=2, sort_keys=True)
  if files.is_remote(workdir):  # an object store writes an object whole
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return
  with files.replacing(str(path)) as tmp:  # an OSError: an OutputError naming the file
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    with open(tmp, "w") as f:
      f.write(text)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in ``workdir`` was started with, validated."""
  if not epath.Path(workdir).is_dir():
    state = "is not a folder" if epath.Path(workdir).exists() else "does not exist"
    raise CheckpointError(f"the work directory {workdir} {state}")
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise CheckpointError(f"{path} does not exist: is {workdir} a jip2p-train work directory?")
  try:
    saved = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path} is not valid JSON: {e}") from None
  config = ml_collections.ConfigDict(_with_new_keys(saved, base_config().to_dict())
                                     if isinstance(saved, dict) else saved)
  validate(config)
  return config


def _with_new_keys(saved: dict, defaults: dict) -> dict:
  """``saved`` with the keys added to `base_config` since it was written, at their defaults
  (which keep the old behaviour: task "edit", no separate text encoder...)."""
  out = dict(saved)
  for key, default in defaults.items():
    if key not in out:
      out[key] = default
    elif isinstance(default, dict) and isinstance(out[key], dict):
      out[key] = _with_new_keys(out[key], default)
  return out
