"""The InstructPix2Pix editor: images + instructions → edited images (docs/design.md §1, "Editing").

    editor = Editor.from_pretrained("path/to/instruct-pix2pix")
    [out] = editor(["cat.jpg"], ["make it a tiger"], seed=0)

    sdedit = Editor.from_pretrained("path/to/stable-diffusion")   # the paper's baseline
    [out] = sdedit(["cat.jpg"], ["a photo of a tiger"], method="sdedit", strength=0.75, seed=0)

An SDXL InstructPix2Pix folder (``text_encoder_2/``, a ``text_time`` UNet) edits as diffusers'
``StableDiffusionXLInstructPix2PixPipeline``: both text encoders and the pooled text, the
micro-conditioning ``original_size``, ``crops_coords_top_left``, ``target_size`` (options of
`Editor.edits`; by default the edit's (height, width), (0, 0) and its (height, width), as the
pipeline), and for the null text zeros (the pipeline's ``force_zeros_for_empty_prompt``, as the
folder's model_index.json says; true unless it says false, when the encoded "" is used).

``method="sdedit"`` (with a text-to-image model, and the *edited caption* in the instruction's
place, as the paper compares) noises the image latents to the step ``int(steps·strength)`` from the
end of the grid and denoises them towards the caption with plain guidance s = text_guidance
(`jip2p.diffusion.editing.sdedit`); diffusers' StableDiffusionImg2ImgPipeline does the same.

Per edit: the image is read (EXIF orientation applied, any mode → RGB with alpha over white),
resized by the reference rule (`preprocess_size`) with a centre fit, encoded to the VAE *mode*
(unscaled); the instruction goes through the CLIP text encoder and "" gives the null text; the
sampler runs with two-scale guidance on the batch of 3 and the result is decoded with
1/scaling_factor. An empty instruction returns the resized input, as the reference does.

Encoding, the whole sampling loop and decoding are one `jax.jit` program
(`jip2p.diffusion.editing.edit`, which training's validation grid runs too), compiled once per
(batch, image shape, sampler): the step count and the sigma grid are data (the grid is padded to
the model's training timesteps, `schedules.pad`), so moving a steps slider compiles nothing.
Images are batched by their resized shape and the last batch is padded, so a run of many images
compiles each shape once; ``size_buckets`` (`bucket_size`) snaps every aspect ratio to a few
shapes, so that a handful of programs serve any upload (what `jip2p-app` does). Image j of a call is drawn from seed
``seed + j`` alone (initial noise and every ancestral step), so its result does not depend on the
batch it lands in, and ``seed + j`` reproduces it on its own.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import secrets
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, ImageOps

from jip2p import checkpoints, storage
from jip2p.checkpoints import folders
from jip2p.diffusion import editing, samplers, schedules
from jip2p.errors import CheckpointError, ConfigError, InputError, Jip2pWarning

MAX_PIXELS = 40_000_000
SAMPLERS = samplers.METHODS
SCHEDULES = schedules.SCHEDULE_KINDS
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
OUTPUT_TYPES = ("pil", "np")
MAX_SEED = 2 ** 32 - 1
METHODS = ("ip2p", "sdedit")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


# ------------------------------------------------------------------------------ images


def preprocess_size(width: int, height: int, resolution: int = 512,
                    multiple: int = 64) -> tuple[int, int]:
  """The reference's output size (width, height) for an input of ``width × height``.

  The long side is scaled to ``resolution``, the short side rounded *up* to a multiple of
  ``multiple`` (the scale follows it), then both are floored to multiples of it; in the
  reference's float arithmetic, so sizes match it exactly. The reference's multiple is 64 (see
  `size_multiple`).
  """
  if width <= 0 or height <= 0:
    raise InputError(f"an image of {width}×{height} pixels has nothing to edit")
  m = multiple
  factor = resolution / max(width, height)
  factor = math.ceil(min(width, height) * factor / m) * m / min(width, height)
  return int((width * factor) // m) * m, int((height * factor) // m) * m


def size_step(unet_config, vae_config) -> int:
  """The pixels a side must be a multiple of for the model to run at all: its VAE (or codec)
  downscale × its UNet's downsampling, ``2 ** (num_blocks - 1)`` (64 for Stable Diffusion, 4 for
  the world model shipped in data/synthetic-ip2p). Training's resolution obeys it too."""
  return vae_config.downscale * 2 ** (unet_config.num_blocks - 1)


def native_size(unet_config, vae_config) -> int:
  """The image side the model was made for: the UNet's sample size × the VAE downscale (512 for
  Stable Diffusion 1.5, 32 for the shipped world model); the tools' default resolution."""
  return unet_config.sample_size * vae_config.downscale


def size_multiple(unet_config, vae_config) -> int:
  """Pixels an edit's sides (and the ``resolution`` asked for) must be multiples of: the model's
  `size_step`, rounded up to the reference's 64 for a model made for 64 px or more (so Stable
  Diffusion models resize exactly as instruct-pix2pix does; SD's own step is 64 anyway)."""
  step = size_step(unet_config, vae_config)
  if native_size(unet_config, vae_config) >= 64 and 64 % step == 0:
    return 64
  return step


def check_resolution(resolution: Any, multiple: int, name: str = "resolution") -> None:
  """The size rule of every tool: ``resolution`` (the long side asked for) must be a positive
  multiple of the model's `size_multiple`; else one `ConfigError` naming ``name``."""
  if (isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer))
      or resolution < multiple or resolution % multiple):
    raise ConfigError(f"{name} must be a multiple of {multiple} (this model's size step: VAE "
                      f"downscale × UNet downsampling), got {resolution!r}")


def model_sizes(path: str | os.PathLike) -> tuple[int, int]:
  """(`size_multiple`, `native_size`) of a model folder from its config files alone (no weights
  read), so a tool can check sizes before loading the model; the folder's problems are named as
  `Editor.from_pretrained` names them."""
  path = os.fspath(path)
  _check_folder(path)
  if storage.is_remote(path):
    path = storage.local_copy(path)  # The copy the model is then loaded from.
  if not os.path.isdir(path):
    raise CheckpointError(f"missing model folder: {path}")
  configs = []
  for name in ("unet", "vae"):
    where = os.path.join(path, name, "config.json")
    config = folders.read_json(where)
    config_cls = folders.COMPONENT_CLASSES[folders.class_name(config, where)][0]
    try:
      configs.append(config_cls.from_dict(config))
    except ConfigError as e:
      raise CheckpointError(f"{where}: {e}") from None
  return size_multiple(*configs), native_size(*configs)


def _check_pixels(width: int, height: int, name: str) -> None:
  if width <= 0 or height <= 0:
    raise InputError(f"{name}: the image is {width}×{height} pixels (empty)")
  if width * height > MAX_PIXELS:
    raise InputError(f"{name}: the image is {width}×{height} = {width * height / 1e6:.1f} "
                     f"megapixels, more than the {MAX_PIXELS / 1e6:.0f} accepted")


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
  """Any PIL mode → RGB: 16/32-bit integer as 16-bit grey, float as [0, 1] grey (or [0, 255] when
  larger), alpha (and palette transparency) composited over white, the rest by PIL."""
  if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
    values = np.asarray(image, np.float64)
    if image.mode == "F":
      values = np.nan_to_num(values) * (255.0 if values.size and values.max() <= 1.0 else 1.0)
    else:
      values = values / 257.0
    image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")
  if image.mode in _ALPHA_MODES or "transparency" in image.info:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  try:
    return image.convert("RGB")
  except (ValueError, OSError) as e:
    raise InputError(f"{name}: cannot convert an image of mode {image.mode} to RGB: {e}") from None


def load_image(path: str | os.PathLike) -> Image.Image:
  """Reads an image file fully → RGB, EXIF orientation applied; `InputError` naming the file when
  it is missing, not an image, truncated or corrupt, empty or larger than `MAX_PIXELS`."""
  name = os.fspath(path)
  if not os.path.isfile(name):
    raise InputError(f"{name}: no such file")
  if os.path.getsize(name) == 0:
    raise InputError(f"{name}: the file is empty (0 bytes)")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(name) as image:
        _check_pixels(*image.size, name)
        image.load()
        frames = getattr(image, "n_frames", 1)
        if frames > 1:
          warnings.warn(f"{name}: an animated image of {frames} frames; editing its first frame",
                        Jip2pWarning, stacklevel=2)
        return prepare_image(image, name)
  except Image.DecompressionBombError:
    raise InputError(f"{name}: the image is larger than the {MAX_PIXELS / 1e6:.0f} megapixels "
                     "accepted") from None
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    if isinstance(e, InputError):
      raise
    raise InputError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None


def prepare_image(image: Any, name: str = "image") -> Image.Image:
  """A PIL image or uint8 array ``[H, W]``, ``[H, W, 3|4]`` → validated RGB PIL image."""
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
        image.ndim == 3 and image.shape[-1] not in (3, 4)):
      raise InputError(f"{name}: arrays must be uint8 [H, W], [H, W, 3] or [H, W, 4], got "
                       f"{image.dtype} {image.shape}")
    _check_pixels(image.shape[1], image.shape[0], name)
    image = Image.fromarray(image)
  if not isinstance(image, Image.Image):
    raise InputError(f"{name}: expected a file path, a PIL image or a uint8 array, got "
                     f"{type(image).__name__}")
  _check_pixels(*image.size, name)
  image = ImageOps.exif_transpose(image)
  return to_rgb(image, name)


def edit_size(width: int, height: int, resolution: int, name: str = "image",
              multiple: int = 64) -> tuple[int, int]:
  """`preprocess_size`, refusing aspect ratios whose edit would exceed `MAX_PIXELS`."""
  size = preprocess_size(width, height, resolution, multiple)
  if size[0] * size[1] > MAX_PIXELS:
    raise InputError(f"{name}: its aspect ratio ({width}×{height}) would make a {size[0]}×"
                     f"{size[1]} edit, more than {MAX_PIXELS / 1e6:.0f} megapixels")
  return size


def bucket_size(width: int, height: int, resolution: int, multiple: int,
                buckets: int) -> tuple[int, int]:
  """The edit size (width, height) of a ``width × height`` image with sizes bucketed.

  The long side is ``resolution``; the short side is one of ``buckets`` sizes, ``resolution ·
  k / buckets`` for k = 1 … buckets rounded to a multiple of ``multiple`` (at least one), the one
  whose aspect ratio is nearest the image's (in log ratio; a tie goes to the larger). So every
  image maps to one of at most ``2 · buckets − 1`` shapes: at 512 px with 4 buckets, 512×512,
  512×384, 512×256, 512×128 and the three portrait ones. The image is then centre-fitted to it
  (`preprocess`): an aspect ratio between two buckets loses a strip at the sides, where the
  reference's rule (`preprocess_size`) loses at most ``multiple − 1`` pixels but makes one shape,
  and one compiled program, per 1/``multiple`` of aspect ratio.
  """
  if width <= 0 or height <= 0:
    raise InputError(f"an image of {width}×{height} pixels has nothing to edit")
  shorts = {max(multiple, round(resolution * k / buckets / multiple) * multiple)
            for k in range(1, buckets + 1)}
  ratio = math.log(min(width, height) / max(width, height))
  short = min(sorted(shorts, reverse=True),
              key=lambda s: abs(math.log(s / resolution) - ratio))
  return (resolution, short) if width >= height else (short, resolution)


def preprocess(image: Image.Image, resolution: int = 512, name: str = "image",
               multiple: int = 64, size_buckets: int | None = None) -> Image.Image:
  """An RGB image resized to `preprocess_size` by centre fit (LANCZOS), as the reference does;
  with ``size_buckets``, to its `bucket_size` instead."""
  if size_buckets is None:
    size = edit_size(*image.size, resolution, name, multiple)
  else:
    size = bucket_size(*image.size, resolution, multiple, size_buckets)
  if size == image.size:
    return image
  return ImageOps.fit(image, size, method=Image.Resampling.LANCZOS)


def _describe(item: Any, index: int) -> str:
  return os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"image {index}"


def _as_list(x: Any, single: tuple[type, ...]) -> list:
  """One item (a ``single`` type, or anything but a sequence) → [x]; a sequence → its list."""
  if isinstance(x, single) or not isinstance(x, (Sequence, np.ndarray)):
    return [x]
  return list(x)


# ------------------------------------------------------------------------------ the program


@functools.partial(jax.jit, static_argnames=("graphdefs", "method", "scaling_factor",
                                             "prediction_type", "zero_null_text",
                                             "scale_image_latents"))
def _edit_batch(states, images, input_ids, noise, seeds, schedule, text_scale, image_scale,
                sdxl=None, *, graphdefs, method: str, scaling_factor: float, prediction_type: str,
                zero_null_text: bool = True, scale_image_latents: bool = False):
  """`editing.edit` on one padded batch, in [0, 1]; compiled per model architecture (the static
  graphdefs, so editors of one architecture share programs), batch, image shape and sampler
  (``schedule`` padded by `schedules.pad`: any step count, one program). Arrays as
  `editing.edit`'s (scales float32 scalars); an SDXL model's states and graphdefs end with its
  second text encoder's, and ``sdxl`` is (input_ids_2, time_ids). → (float32 [B, H, W, 3] in
  [0, 1], the stages' finite flags bool [len(editing.STAGES)]).
  """
  unet, vae, text_encoder, *second = (nnx.merge(g, s) for g, s in zip(graphdefs, states))
  input_ids_2, time_ids = (None, None) if sdxl is None else sdxl
  pixels, finite = editing.edit(unet, vae, text_encoder, images, input_ids, noise, seeds,
                                schedule, text_scale, image_scale, method=method,
                                scaling_factor=scaling_factor, prediction_type=prediction_type,
                                text_encoder_2=second[0] if second else None,
                                input_ids_2=input_ids_2, time_ids=time_ids,
                                zero_null_text=zero_null_text,
                                scale_image_latents=scale_image_latents)
  return pixels / 2 + 0.5, finite


@functools.partial(jax.jit, static_argnames=("graphdefs", "method", "scaling_factor",
                                             "prediction_type"))
def _sdedit_batch(states, images, input_ids, noise, seeds, schedule, text_scale, *, graphdefs,
                  method: str, scaling_factor: float, prediction_type: str):
  """`editing.sdedit` on one padded batch, as `_edit_batch` (``schedule``: the grid's tail)."""
  unet, vae, text_encoder = (nnx.merge(g, s) for g, s in zip(graphdefs, states))
  pixels, finite = editing.sdedit(unet, vae, text_encoder, images, input_ids, noise, seeds,
                                  schedule, text_scale, method=method,
                                  scaling_factor=scaling_factor, prediction_type=prediction_type)
  return pixels / 2 + 0.5, finite


@dataclasses.dataclass(frozen=True)
class _Job:
  index: int
  name: str  # the file path, or "image <index>"
  image: Image.Image  # RGB, resized
  instruction: str
  seed: int
  noise: np.ndarray | None


class Editor:
  """Edits images with an InstructPix2Pix `checkpoints.Pipeline` (8-channel UNet; SD 1.x/2.x or
  SDXL), or with SDEdit given an SD 1.x/2.x text-to-image one (4-channel UNet).

  An SDXL model is conditioned as diffusers' ``StableDiffusionXLInstructPix2PixPipeline``
  (`editing.text_conditioning`): both text encoders, the pooled text, the micro-conditioning
  (`time_ids`) and, for the null text, zeros when ``zero_null_text`` or else the encoding of "".

  A model whose scheduler is EDM's (CosXL Edit: ``EDMEulerScheduler``, v-prediction) samples on
  the `schedules.edm` grid by default, and with ``is_cosxl_edit`` its image latents are scaled by
  the VAE's scaling factor, as diffusers' pipeline with ``is_cosxl_edit=True`` (other models
  condition on the unscaled latents).

  ``zero_null_text`` and ``is_cosxl_edit`` default (None) to what the folder's model_index.json
  says (``Pipeline.sdxl_options``: ``force_zeros_for_empty_prompt``, true when absent, and
  ``is_cosxl_edit``, false when absent), as diffusers' pipeline reads them.
  """

  def __init__(self, pipeline: checkpoints.Pipeline, *, zero_null_text: bool | None = None,
               is_cosxl_edit: bool | None = None):
    where = pipeline.folder or "the model"
    unet, vae, text = pipeline.unet.config, pipeline.vae.config, pipeline.text_encoder.config
    latent = vae.latent_channels
    if unet.in_channels not in (latent, 2 * latent) or unet.out_channels != latent:
      raise CheckpointError(
          f"{where}: the UNet maps {unet.in_channels} → {unet.out_channels} channels; an "
          f"InstructPix2Pix UNet for this {latent}-channel VAE maps {2 * latent} → {latent} (a "
          f"text-to-image one, for SDEdit, {latent} → {latent})")
    self.text_to_image = unet.in_channels == latent
    self.sdxl = pipeline.is_sdxl
    widths = [text.hidden_size] + ([pipeline.text_encoder_2.config.hidden_size] if self.sdxl
                                   else [])
    if unet.cross_attention_dim != sum(widths):
      raise CheckpointError(
          f"{where}: the UNet attends to {unet.cross_attention_dim}-wide text states but the "
          f"text encoder states are {' + '.join(map(str, widths))} wide")
    options = pipeline.sdxl_options
    self.zero_null_text = (folder_zero_null_text(pipeline) if zero_null_text is None
                           else bool(zero_null_text))
    self.is_cosxl_edit = bool(options.get("is_cosxl_edit", False) if is_cosxl_edit is None
                              else is_cosxl_edit)
    self.pipeline = pipeline
    self.scheduler_config = schedules.from_scheduler_config(pipeline.scheduler_config)
    # The grid `edits` walks unless told: the reference's, or an EDM model's own.
    self.default_schedule = "edm" if self.scheduler_config.edm else "discrete"
    modules = (pipeline.unet, pipeline.vae, pipeline.text_encoder) + (
        (pipeline.text_encoder_2,) if self.sdxl else ())
    graphdefs, self._states = zip(*(nnx.split(m) for m in modules))
    self._graphdefs = tuple(graphdefs)
    self._scaling_factor = float(vae.scaling_factor)
    self._latent_channels = latent
    self._downscale = vae.downscale
    self.size_multiple = size_multiple(unet, vae)
    self.native_size = native_size(unet, vae)
    # Every grid is padded to this many steps (the most a grid of this model may have), so one
    # program serves every step count.
    self.max_steps = self.scheduler_config.num_train_timesteps

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, *, dtype: str = "float32",
                      attention_impl: str = "xla", vae: str | None = None,
                      zero_null_text: bool | None = None,
                      is_cosxl_edit: bool | None = None) -> Editor:
    """Loads a diffusers-format InstructPix2Pix folder; ``dtype`` is the compute dtype
    ("float32" or "bfloat16"; parameters stay float32); ``vae``: a VAE folder in the folder's
    VAE's place (`checkpoints.load_pipeline`); ``zero_null_text``, ``is_cosxl_edit``: an SDXL
    model's, in place of its folder's (see `Editor`)."""
    path = os.fspath(path)
    if dtype not in DTYPES:
      raise ConfigError(f"dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    _check_folder(path)
    return cls(checkpoints.load_pipeline(path, dtype=DTYPES[dtype], attention_impl=attention_impl,
                                         vae=vae),
               zero_null_text=zero_null_text, is_cosxl_edit=is_cosxl_edit)

  def _warn_if_cut(self, instruction: str) -> None:
    """Warns when the text encoder reads only the start of ``instruction`` (as the reference, it
    keeps max_length - 2 tokens between the start and end tokens)."""
    tokenizer = self.pipeline.tokenizer
    tokens = tokenizer.encode(instruction)
    kept = tokenizer.max_length - 2
    if len(tokens) > kept:
      shown = instruction if len(instruction) <= 60 else instruction[:59] + "…"
      warnings.warn(f"the instruction {shown!r} has {len(tokens)} tokens; the text "
                    f"encoder reads the first {kept}, the rest is ignored", Jip2pWarning,
                    stacklevel=4)

  def noise_shape(self, width: int, height: int) -> tuple[int, int, int]:
    """The latent (initial noise) shape [h, w, C] of a resized ``width × height`` image."""
    return height // self._downscale, width // self._downscale, self._latent_channels

  def __call__(self, images, instructions, **kwargs) -> list:
    """Edits ``images`` (file paths, PIL images or uint8 arrays) by ``instructions``.

    One image with many instructions, or many images with one instruction, broadcast. Keyword
    arguments as `edits`. Returns the edits in input order: PIL RGB images, or float32
    ``[H, W, 3]`` arrays in [0, 1] with ``output_type="np"``.
    """
    results = dict(self.edits(images, instructions, **kwargs))
    return [results[i] for i in range(len(results))]

  def edits(self, images, instructions, *, steps: int = 100, text_guidance: float = 7.5,
            image_guidance: float = 1.5, resolution: int | None = 512,
            seed: int | Sequence[int] | None = None,
            sampler: str = "euler_ancestral", schedule: str | None = None, batch_size: int = 1,
            noise=None, output_type: str = "pil", names: Sequence[str] | None = None,
            method: str = "ip2p", strength: float = 0.75,
            size_buckets: int | None = None, original_size: Sequence[int] | None = None,
            crops_coords_top_left: Sequence[int] | None = None,
            target_size: Sequence[int] | None = None) -> Iterator[tuple[int, Any]]:
    """Validates every input now, then yields ``(index, edited image)`` as batches finish.

    Args:
      steps: sampling steps (of the whole grid; SDEdit runs its last ``int(steps·strength)``).
      text_guidance, image_guidance: s_T and s_I of the two-scale guidance; with SDEdit
        text_guidance is the guidance scale and image_guidance is not used.
      resolution: the long side before the short side is rounded up (see `preprocess_size`);
        None edits the images at their own size, which must be multiples of `size_multiple`
        (64 for Stable Diffusion; e.g. images already passed through `preprocess`).
      seed: image j uses ``seed + j`` (``seed`` random when None), or ``seed[j]`` given one per
        image (e.g. to redo some edits of a run); at most `MAX_SEED`.
      sampler: one of `SAMPLERS` (k-diffusion Euler ancestral, the reference, by default).
      schedule: the sigma grid, one of `SCHEDULES`: k-diffusion's "discrete" (the reference), or
        diffusers' grids ("diffusers_euler", "diffusers_ddim", …) to reproduce its schedulers;
        an EDM model (CosXL Edit) has "edm" only. None: `default_schedule` ("discrete", or
        "edm" for an EDM model).
      batch_size: edits per compiled call; the last batch of each image shape is padded.
      noise: optional initial latents, one unit-variance ``[h, w, C]`` array per image (see
        `noise_shape`), in place of the seeds' draws.
      output_type: "pil" or "np".
      names: what errors call each image (default: its path, or "image <j>").
      method: "ip2p" (an InstructPix2Pix model; instructions) or "sdedit" (a text-to-image
        model; the instructions are the edited captions).
      strength: SDEdit's, in (0, 1]: the fraction of the grid run, from its noisy end.
      size_buckets: None resizes by the reference's rule (`preprocess_size`); N centre-fits
        each image to one of at most 2N − 1 shapes (`bucket_size`), so that any mix of aspect
        ratios compiles a handful of programs (needs a ``resolution``).
      original_size, crops_coords_top_left, target_size: an SDXL model's micro-conditioning,
        each (height, width) or (top, left) in pixels, as diffusers' SDXL pipeline: by default
        the size of each edit (after resizing) for both sizes and (0, 0) for the crop.
    """
    self.check_method(method)
    schedule = self.default_schedule if schedule is None else schedule
    micro = self._micro_conditioning(original_size, crops_coords_top_left, target_size)
    start = editing.sdedit_start(steps, strength) if method == "sdedit" else 0
    jobs, empty = self._prepare(images, instructions, steps=steps, text_guidance=text_guidance,
                                image_guidance=image_guidance, resolution=resolution, seed=seed,
                                sampler=sampler, schedule=schedule, batch_size=batch_size,
                                noise=noise, output_type=output_type, names=names,
                                size_buckets=size_buckets)
    grid = schedules.make(schedule, steps, self.scheduler_config)
    if method == "sdedit":
      grid = dataclasses.replace(grid, sigmas=grid.sigmas[start:],
                                 timesteps=grid.timesteps[start:])
    grid = schedules.pad(grid, self.max_steps)
    return self._generate(jobs, empty, grid, sampler, batch_size, text_guidance, image_guidance,
                          output_type, method, micro)

  def check_method(self, method: str) -> None:
    """`CheckpointError` unless the model is of ``method``'s kind (an InstructPix2Pix model for
    "ip2p", a text-to-image one for "sdedit"), with the way to one that is."""
    if method not in METHODS:
      raise ConfigError(f"unknown method {method!r}; choose one of {METHODS}")
    where = self.pipeline.folder or "the model"
    latent = self._latent_channels
    if method == "ip2p" and self.text_to_image:
      raise CheckpointError(
          f"{where} is a text-to-image model (its UNet takes {latent} input channels), not an "
          f"InstructPix2Pix model ({2 * latent}): edit with it by SDEdit (method 'sdedit', the "
          "edited caption as the prompt), or grow its conv_in with "
          f"jip2p.checkpoints.expand_conv_in (or jip2p-convert --expand-conv-in {2 * latent}) and "
          "train it on edit triplets first")
    if method == "sdedit" and self.sdxl:
      raise CheckpointError(f"{where} is an SDXL model; SDEdit runs Stable Diffusion 1.x/2.x "
                            "models only so far")
    if method == "sdedit" and not self.text_to_image:
      raise CheckpointError(
          f"{where} is an InstructPix2Pix model (its UNet takes {2 * latent} input channels); "
          f"SDEdit needs a text-to-image model ({latent}), such as the one it was trained from")

  def _micro_conditioning(self, original_size, crops_coords_top_left, target_size
                          ) -> tuple[tuple[int, int] | None, ...]:
    """The SDXL micro-conditioning options, each checked by `check_micro_conditioning`; given to
    a model without it, a `ConfigError`."""
    given = {"original_size": original_size, "crops_coords_top_left": crops_coords_top_left,
             "target_size": target_size}
    if not self.sdxl:
      named = [k for k, v in given.items() if v is not None]
      if named:
        raise ConfigError(f"{', '.join(named)}: micro-conditioning is for SDXL models; "
                          f"{self.pipeline.folder or 'the model'} is not one")
    return tuple(check_micro_conditioning(k, v) for k, v in given.items())

  def _prepare(self, images, instructions, *, steps, text_guidance, image_guidance, resolution,
               seed, sampler, schedule, batch_size, noise, output_type, names, size_buckets):
    """Checks arguments and inputs; → (jobs to sample, jobs with empty instructions)."""
    _check_int("steps", steps, 1)
    if resolution is not None:
      check_resolution(resolution, self.size_multiple)
    if size_buckets is not None:
      _check_int("size_buckets", size_buckets, 1)
      if resolution is None:
        raise ConfigError("size_buckets resizes to a resolution: give one (not None)")
    _check_int("batch_size", batch_size, 1)
    for key, value in (("text_guidance", text_guidance), ("image_guidance", image_guidance)):
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    for key, value, allowed in (("sampler", sampler, SAMPLERS), ("schedule", schedule, SCHEDULES),
                                ("output_type", output_type, OUTPUT_TYPES)):
      if value not in allowed:
        raise ConfigError(f"unknown {key} {value!r}; choose one of {allowed}")
    if isinstance(images, np.ndarray) and images.ndim <= 3:
      images = [images]
    images = _as_list(images, (str, os.PathLike, Image.Image))
    instructions = _as_list(instructions, (str, bytes))
    if not images:
      raise InputError("no images to edit")
    n = max(len(images), len(instructions))
    if len(images) not in (1, n) or len(instructions) not in (1, n):
      raise InputError(f"{len(images)} images and {len(instructions)} instructions: give as many "
                       "of each, or one of either")
    images, instructions = images * (n // len(images)), instructions * (n // len(instructions))
    seeds = _seeds(seed, n)
    if noise is not None and len(noise) != n:
      raise InputError(f"{len(noise)} noise arrays for {n} edits")
    if names is not None and len(names) != n:
      raise InputError(f"{len(names)} names for {n} edits")
    loaded, checked = {}, set()
    jobs, empty = [], []
    for j, (item, instruction) in enumerate(zip(images, instructions)):
      name = names[j] if names is not None else _describe(item, j)
      if not isinstance(instruction, str):
        raise InputError(f"{name}: the instruction must be text, got "
                         f"{type(instruction).__name__} {instruction!r:.60}")
      if instruction not in checked:
        checked.add(instruction)
        self._warn_if_cut(instruction)
      key = id(item)
      if key not in loaded:
        image = (load_image(item) if isinstance(item, (str, os.PathLike))
                 else prepare_image(item, name))
        m = self.size_multiple
        if resolution is None and (image.size[0] % m or image.size[1] % m):
          raise InputError(f"{name}: with resolution=None the image size must be multiples of "
                           f"{m}, got {image.size[0]}×{image.size[1]}")
        loaded[key] = (image if resolution is None else
                       preprocess(image, resolution, name, multiple=m, size_buckets=size_buckets))
      image = loaded[key]
      job_noise = None
      if noise is not None:
        job_noise = np.asarray(noise[j], np.float32)
        want = self.noise_shape(*image.size)
        if job_noise.shape != want:
          raise InputError(f"{name}: noise of shape {job_noise.shape}; its {image.size[0]}×"
                           f"{image.size[1]} edit needs {want}")
      (empty if instruction == "" else jobs).append(
          _Job(j, name, image, instruction, seeds[j], job_noise))
    return jobs, empty

  def _generate(self, jobs, empty, grid, sampler, batch_size, text_guidance, image_guidance,
                output_type, method, micro):
    for job in empty:
      yield job.index, _output(np.asarray(job.image, np.float32) / 255.0, output_type)
    groups: dict[tuple[int, int], list[_Job]] = {}
    for job in jobs:
      groups.setdefault(job.image.size, []).append(job)
    tokenizer = self.pipeline.tokenizer
    text_scale, image_scale = np.float32(text_guidance), np.float32(image_guidance)
    for (width, height), group in groups.items():
      shape = self.noise_shape(width, height)
      for start in range(0, len(group), batch_size):
        batch = group[start:start + batch_size]
        padded = batch + [batch[-1]] * (batch_size - len(batch))
        images = np.stack([np.asarray(j.image, np.float32) / 127.5 - 1.0 for j in padded])
        input_ids = tokenizer([j.instruction for j in padded] + [""])
        seeds = np.asarray([j.seed for j in padded], np.uint32)
        drawn = (np.asarray(editing.initial_noise(seeds, shape=shape))
                 if any(j.noise is None for j in padded) else None)
        noise = np.stack([drawn[b] if j.noise is None else j.noise for b, j in enumerate(padded)])
        options = dict(graphdefs=self._graphdefs, method=sampler,
                       scaling_factor=self._scaling_factor,
                       prediction_type=self.scheduler_config.prediction_type)
        if method == "sdedit":
          out, finite = jax.device_get(_sdedit_batch(
              self._states, images, input_ids, noise, seeds, grid, text_scale, **options))
        else:
          sdxl = None
          if self.sdxl:
            texts = [j.instruction for j in padded] + [""]
            sdxl = (self.pipeline.tokenizer_2(texts),
                    np.tile(time_ids(height, width, *micro), (len(padded), 1)))
          out, finite = jax.device_get(_edit_batch(
              self._states, images, input_ids, noise, seeds, grid, text_scale, image_scale,
              sdxl, zero_null_text=self.zero_null_text,
              scale_image_latents=self.is_cosxl_edit, **options))
        self._check_finite(finite, batch)
        for b, job in enumerate(batch):
          yield job.index, _output(out[b], output_type)

  def _check_finite(self, finite: np.ndarray, batch: Sequence[_Job]) -> None:
    """Stops at the first stage whose output held NaN or inf (the later ones only inherit it)."""
    if finite.all():
      return
    stage = editing.STAGES[int(np.argmin(finite))]
    where = self.pipeline.folder or "the model"
    raise CheckpointError(
        f"{where}: the {stage} produced NaN or inf (editing {', '.join(j.name for j in batch)}); "
        "its weights may hold NaN/inf: convert or export the model again (in bfloat16, try "
        "float32)")


def folder_zero_null_text(pipeline: checkpoints.Pipeline) -> bool:
  """Whether an SDXL model's null text is zeros, as its folder's model_index.json says
  (``force_zeros_for_empty_prompt``, true when absent, as diffusers reads it): what `Editor` uses
  unless told otherwise, and what training's conditioning dropout uses always."""
  return bool(pipeline.sdxl_options.get("force_zeros_for_empty_prompt", True))


MICRO_CONDITIONING = {"original_size": "(height, width)", "crops_coords_top_left": "(top, left)",
                      "target_size": "(height, width)"}


def check_micro_conditioning(key: str, value: Any, name: str | None = None
                             ) -> tuple[int, int] | None:
  """An SDXL micro-conditioning option ``key`` (one of `MICRO_CONDITIONING`): None, or two
  integers ≥ 0 → a tuple; else a one-line `ConfigError` naming ``name`` (default ``key``)."""
  if value is None:
    return None
  if (isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray))
      or len(value) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer))
                                or v < 0 for v in value)):
    raise ConfigError(f"{name or key} must be {MICRO_CONDITIONING[key]}: two integers ≥ 0, got "
                      f"{value!r:.60}")
  return int(value[0]), int(value[1])


def time_ids(height: int, width: int, original_size: Sequence[int] | None = None,
             crops_coords_top_left: Sequence[int] | None = None,
             target_size: Sequence[int] | None = None) -> np.ndarray:
  """SDXL's micro-conditioning of a ``height × width`` edit, float32 [6]: original size, crop's
  top left corner, target size, defaulting as diffusers' SDXL pipelines to (height, width),
  (0, 0) and (height, width)."""
  size = (height, width)
  return np.asarray([*(original_size or size), *(crops_coords_top_left or (0, 0)),
                     *(target_size or size)], np.float32)


def _output(pixels: np.ndarray, output_type: str):
  """float32 [H, W, 3] in [0, 1] → the caller's type (PIL rounds as diffusers' numpy_to_pil)."""
  if output_type == "np":
    return pixels
  return Image.fromarray(np.round(pixels * 255).astype(np.uint8), "RGB")


def _seeds(seed: int | Sequence[int] | None, n: int) -> list[int]:
  """The seeds of n edits: ``seed + j`` (random ``seed`` when None), or ``seed`` itself when it
  is a sequence of n."""
  if seed is None:
    seed = secrets.randbelow(MAX_SEED + 2 - n)
  if isinstance(seed, (Sequence, np.ndarray)) and not isinstance(seed, str):
    if len(seed) != n:
      raise ConfigError(f"{len(seed)} seeds for {n} edits")
    for value in seed:
      _check_int("seed", value, 0)
    seeds = [int(value) for value in seed]
  else:
    _check_int("seed", seed, 0)
    seeds = [seed + j for j in range(n)]
  if max(seeds) > MAX_SEED:
    raise ConfigError(f"seed {max(seeds)} passes the largest seed {MAX_SEED}")
  return seeds


def _check_folder(path: str) -> None:
  """Refuses what is not a diffusers pipeline folder, with the way to make one."""
  if os.path.isfile(path):
    raise CheckpointError(
        f"{path} is a single file; convert it to a diffusers folder first with "
        f"`jip2p-convert {path} OUT_DIR` (it takes the EMA weights when the file has both)")
  if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model_index.json")):
    raise CheckpointError(
        f"{path} is not a diffusers pipeline folder (no model_index.json); a single-file "
        "checkpoint needs jip2p-convert, a jip2p training run jip2p-export")


def _check_int(key: str, value: Any, least: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
    raise ConfigError(f"{key} must be an integer ≥ {least}, got {value!r}")
