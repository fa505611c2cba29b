"""What `jip2p-bench` measures, with the PyTorch baseline's definitions (docs/design.md §3).

Cases are named by their shapes, so a run at other sizes is just other names:

  train_full_{res}_b{B}      the train step from pixels: VAE encode of both images, text encode,
                             conditioning dropout, UNet forward + backward (8 input channels), MSE,
                             AdamW, EMA — diffusers' train_instruct_pix2pix.py with --use_ema
  train_unet_{res}_b{B}      the same step from precomputed latents and text (UNet, AdamW, EMA)
  edit_{res}_s{N}_b{B}       InstructPix2Pix edit latency: B images of res², N Euler-a steps
                             (three-way guidance), encode + sampling + decode, output as numpy
  p2p_{res}_s{N}_k{K}        paired generation (Prompt-to-Prompt data, attention sharing): K
                             candidates of two res² images, N steps; the JAX side only

A name may end in ``@S``: each of that case's processes may run S seconds (its time budget, so
that one slow case cannot eat a short run's time; `jip2p-bench --timeout` otherwise).

SDXL model configs (``text_encoder_2`` among them, e.g. ``--preset sdxl``) run the same kinds with
SDXL's conditioning — both text encoders' 77×2048 states, the 1280-wide pooled text, the time ids
(H, W, 0, 0, H, W) — except ``train_full`` (the trainer's step from pixels is SD's only):
``train_unet`` from precomputed latents, states and pooled text (the null text zeros, as SDXL
base's pipeline), ``edit`` as diffusers' ``StableDiffusionXLInstructPix2PixPipeline`` on the PyTorch
side, ``p2p`` on the JAX side. Their default list is `SDXL_CASES` (batch sizes chosen, not yet
measured against a GPU's memory).

Figures: step/edit time is the median of `ITERS` device-synchronised runs after `WARMUP` more;
the first run (compilation included) is timed alone. FLOPs are the UNet's training FLOPs per image
(forward + backward), counted by PyTorch's FlopCounterMode as the baseline counts them (matmul,
convolution and attention FLOPs only); achieved TFLOP/s = images/s × that, MFU = achieved / the
device's dense bf16 peak. VAE and text-encoder FLOPs are not counted, for either side.
"""

from __future__ import annotations

import dataclasses
import re

from jip2p.errors import ConfigError

KINDS = ("train", "edit", "p2p")
# (warm-up runs, timed runs) per kind, as the baseline times them.
WARMUP = {"train": 3, "edit": 1, "p2p": 1}
ITERS = {"train": 10, "edit": 3, "p2p": 3}
# FlopCounterMode's batch per resolution in the baseline (FLOPs per image do not depend on it).
FLOP_BATCH = {256: 8, 512: 2}

DEFAULT_CASES = (
    "train_full_256_b32", "train_full_256_b64", "train_full_256_b128",
    "train_unet_256_b32", "train_unet_256_b64", "train_unet_256_b128",
    "train_full_512_b32",
    "edit_512_s20_b1", "edit_512_s100_b1", "edit_512_s20_b8", "edit_512_s100_b8",
    "p2p_512_s100_k8",
)
SDXL_CASES = ("train_unet_768_b4", "train_unet_1024_b2", "edit_1024_s20_b1")
# Cases PyTorch also runs under torch.compile by default (its first step takes minutes).
COMPILE_CASES = ("train_full_256_b64", "train_unet_256_b64")

_PATTERNS = {
    "train": re.compile(r"^train_(full|unet)_(\d+)_b(\d+)$"),
    "edit": re.compile(r"^edit_(\d+)_s(\d+)_b(\d+)$"),
    "p2p": re.compile(r"^p2p_(\d+)_s(\d+)_k(\d+)$"),
}


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  kind: str
  res: int
  batch: int
  full: bool = True  # train: encoders inside the step
  steps: int = 0  # edit, p2p: sampling steps
  warmup: int = 0  # untimed runs after the first
  iters: int = 1  # timed runs
  limit_s: float | None = None  # seconds each of the case's processes may run (``name@S``)

  @property
  def unit(self) -> str:
    return {"train": "img/s", "edit": "s/edit", "p2p": "pairs/s"}[self.kind]


def parse(name: str, *, warmup: int | None = None, iters: int | None = None) -> Case:
  """A case name (see the module docstring) → `Case`, timed ``warmup``/``iters`` times (default
  the kind's `WARMUP`/`ITERS`); `ConfigError` naming a malformed name."""
  for kind, pattern in _PATTERNS.items():
    m = pattern.match(name)
    if not m:
      continue
    runs = dict(warmup=WARMUP[kind] if warmup is None else warmup,
                iters=ITERS[kind] if iters is None else iters)
    if kind == "train":
      full, res, batch = m.group(1) == "full", int(m.group(2)), int(m.group(3))
      case = Case(name, kind, res, batch, full=full, **runs)
    else:
      res, steps, batch = (int(g) for g in m.groups())
      case = Case(name, kind, res, batch, steps=steps, **runs)
    if case.res <= 0 or case.batch <= 0 or (kind != "train" and case.steps <= 0):
      break
    if case.warmup < 0 or case.iters < 1:
      raise ConfigError(f"case {name}: need warmup ≥ 0 and iters ≥ 1, got {case.warmup}, "
                        f"{case.iters}")
    return case
  raise ConfigError(f"unknown benchmark case {name!r}: expected train_full_<res>_b<batch>, "
                    "train_unet_<res>_b<batch>, edit_<res>_s<steps>_b<batch> or "
                    "p2p_<res>_s<steps>_k<candidates>")


def parse_list(names: str, **runs) -> list[Case]:
  """Comma-separated case names (each optionally ``name@seconds``), in order, duplicates dropped;
  ``runs`` as `parse`'s."""
  out: list[Case] = []
  for item in filter(None, (n.strip() for n in names.split(","))):
    name, at, limit = item.partition("@")
    if name in [c.name for c in out]:
      continue
    case = parse(name, **runs)
    if at:
      try:
        seconds = float(limit)
      except ValueError:
        seconds = 0.0
      if not seconds > 0:
        raise ConfigError(f"case {item!r}: the time budget after @ must be seconds > 0")
      case = dataclasses.replace(case, limit_s=seconds)
    out.append(case)
  if not out:
    raise ConfigError("no benchmark cases given")
  return out


def is_sdxl(configs: dict) -> bool:
  """Whether model configs are SDXL's (a second text encoder)."""
  return "text_encoder_2" in configs


def check_models(selected: list[Case], configs: dict) -> None:
  """`ConfigError` naming the cases that the configs' model family cannot run (SDXL: no
  ``train_full``), before any process starts."""
  if is_sdxl(configs):
    full = [c.name for c in selected if c.kind == "train" and c.full]
    if full:
      raise ConfigError(f"{', '.join(full)}: SDXL models run train_unet_<res>_b<batch> (from "
                        "latents), edit and p2p cases; train_full is Stable Diffusion 1.x/2.x's")
