"""Per-device memory of a training config's compiled train step: what fits on which chip.

  jip2p-bench --memory configs/ip2p_sd15.py:res=512 [--preset sd15] [--fsdp 1,4,8,64]

For each setting (UNet rematerialisation off / on × FSDP over N devices) the trainer's own step
(`jip2p.train.step` with the config's optimizer, EMA, grad_accum, compute dtype, attention and
sharding rules) is lowered and compiled for a (data 1, fsdp N) mesh, on abstract inputs
(`nnx.eval_shape` models, `jax.ShapeDtypeStruct` batches): no weight is read and nothing is
allocated. The per-device micro-batch b is what one device holds at a time; a step runs
grad_accum of them. Per device:

  parameters, optimizer state, EMA   the train state's shards under the config's sharding rules
  frozen + batch                     the other inputs: VAE, text encoder, CLIP(""), the batch
  temporaries                        XLA's temporary buffers (activations, gradients, …)
  total                              arguments + outputs − donated (aliased) + temporaries

b = 1 and b = 2 are compiled and a line through them predicts the largest b that fits each chip.
One more compile at the largest prediction checks it, and the table's batches come from the line
through b = 1 and that compile, never beyond it: interpolation between compiled programs (at SD
1.5 shapes the line through 1 and 2 runs a few percent under the compiled bytes at b ≈ 60).

**These are the CPU compiler's estimates.** The mesh is N fake CPU devices
(``--xla_force_host_platform_device_count``), so the program is the same sharded program the
trainer runs on N accelerators, but fusion and buffer assignment are XLA:CPU's: an accelerator's
temporaries differ (cuDNN or Pallas flash attention holds no attention matrix where the "xla"
attention does), and a GPU adds allocator fragmentation, and by default lets XLA take only 75% of
its memory (``XLA_PYTHON_CLIENT_MEM_FRACTION``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jip2p.checkpoints import build_component, preset_configs
from jip2p.checkpoints.folders import read_json
from jip2p.diffusion import schedules
from jip2p.errors import ConfigError
from jip2p.models import clip_text
from jip2p.train import config as config_lib
from jip2p.train import sharding
from jip2p.train import step as step_lib

GIB = 2 ** 30
# Device memory per chip, GiB.
CHIPS = (("TPU v5e", 16.0), ("TPU v4", 32.0), ("H100", 80.0), ("TPU v5p", 95.0))
# Code generation's optimisation changes no buffer (checked at the tiny preset) and costs most of
# a CPU compile's time.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
STATE_PARTS = ("params", "opt_state", "ema")


@dataclasses.dataclass(frozen=True)
class Models:
  """The abstract models of a run: graph definitions and `jax.ShapeDtypeStruct` states."""

  unet_def: nnx.GraphDef
  params: nnx.State
  vae_def: nnx.GraphDef
  vae: nnx.State
  text_def: nnx.GraphDef
  text: nnx.State
  null_text: Any  # CLIP("") [1, L, D]; SDXL: (states [1, L, D], pooled [1, P])
  scheduler_config: dict
  scaling_factor: float


def load(spec: str, preset: str | None) -> tuple[ml_collections.ConfigDict, dict[str, dict]]:
  """The training config ``path.py[:args]``, checked, and its model's component configs."""
  config = config_lib.load(spec)
  configs = model_configs(config, preset)
  if config.data.latents:
    raise ConfigError(f"{spec} trains from a latent cache (config.data.latents); --memory "
                      "compiles the step from images")
  # Neither weights nor data are read: a config that names none is checked as if it did.
  checked = ml_collections.ConfigDict(config.to_dict())
  checked.model.init = checked.model.init or config_lib.RANDOM_INIT_PREFIX + "tiny"
  checked.data.source = "synthetic"
  config_lib.validate(checked)
  return config, configs


def model_configs(config: ml_collections.ConfigDict, preset: str | None) -> dict[str, dict]:
  """The component configs of ``preset``, else of ``config.model.init`` ("random:<preset>" or a
  diffusers folder, of which only the config files are read)."""
  init = config.model.init
  in_channels = config.model.unet_in_channels
  if preset is None and init.startswith(config_lib.RANDOM_INIT_PREFIX):
    preset = init[len(config_lib.RANDOM_INIT_PREFIX):]
  if preset is not None:
    return preset_configs(preset, unet_in_channels=in_channels)
  if not init:
    raise ConfigError("the config names no model (config.model.init is empty): pass --preset "
                      "(sd15, sd21, …) for the model's shapes")
  read = lambda *parts: read_json(os.path.join(init, *parts))
  second = ({"text_encoder_2": read("text_encoder_2", "config.json")}
            if os.path.isdir(os.path.join(init, "text_encoder_2")) else {})
  return {"unet": dict(read("unet", "config.json"), in_channels=in_channels),
          "vae": read("vae", "config.json"), "text_encoder": read("text_encoder", "config.json"),
          "scheduler": read("scheduler", "scheduler_config.json"), **second}


def abstract_models(configs: dict[str, dict], config: ml_collections.ConfigDict, *,
                    remat: bool) -> Models:
  m = config.model
  build = lambda name, **kw: build_component(
      configs[name], dtype=jnp.dtype(m.compute_dtype), attention_impl=m.attention_impl,
      abstract=True, where=f"{name} config", **kw)
  unet, vae, text_encoder = build("unet", remat=remat), build("vae"), build("text_encoder")
  res, factor = config.data.res, vae.config.downscale * 2 ** (unet.config.num_blocks - 1)
  if res % factor:
    raise ConfigError(f"config.data.res={res} must be a multiple of {factor} for this model "
                      "(VAE downscale × UNet downsampling)")
  unet_def, params = nnx.split(unet, nnx.Param)
  vae_def, vae_state = nnx.split(vae)
  length = text_encoder.config.max_position_embeddings
  if "text_encoder_2" in configs:  # SDXL: both encoders as one (`Pipeline.text_model`)
    text_encoder = clip_text.SDXLTextEncoders(text_encoder, build("text_encoder_2"))
  text_def, text_state = nnx.split(text_encoder)
  sdxl = "text_encoder_2" in configs
  ids = jax.ShapeDtypeStruct((1,) + (2,) * sdxl + (length,), jnp.int32)
  null_text = jax.eval_shape(lambda s, i: nnx.merge(text_def, s)(i), text_state, ids)
  return Models(unet_def, params, vae_def, vae_state, text_def, text_state, null_text,
                configs["scheduler"], vae.config.scaling_factor)


def _shard_bytes(tree, shardings) -> int:
  return sum(math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def compile_step(models: Models, config: ml_collections.ConfigDict, devices: int,
                 micro_batch: int) -> dict[str, float]:
  """Compiles the train step for an FSDP mesh of ``devices`` at per-device ``micro_batch``;
  returns bytes per device: the `STATE_PARTS`, ``frozen_batch``, ``temp``, ``total``, and the
  compile's ``seconds``."""
  mesh = sharding.make_mesh(1, devices, jax.devices()[:devices])
  o = config.optimizer
  optimizer = step_lib.make_optimizer(o.lr, b1=o.b1, b2=o.b2, eps=o.eps,
                                      weight_decay=o.weight_decay,
                                      grad_clip_norm=o.grad_clip_norm)
  state = jax.eval_shape(lambda p: step_lib.init_state(p, optimizer, config.seed), models.params)
  state_sh = sharding.tree_shardings(state, mesh, min_size=config.sharding.min_fsdp_size)
  frozen = {"vae": models.vae, "text_encoder": models.text, "null_text": models.null_text}
  frozen_sh = jax.tree.map(lambda _: sharding.replicated(mesh), frozen)
  scheduler = schedules.from_scheduler_config(models.scheduler_config)
  loss_fn = step_lib.make_loss_fn(models.unet_def, models.vae_def, models.text_def,
                                  alphas_cumprod=scheduler.alphas_cumprod(),
                                  scaling_factor=models.scaling_factor,
                                  dropout=config.conditioning_dropout,
                                  prediction_type=scheduler.prediction_type)
  train_step = jax.jit(
      step_lib.make_train_step(loss_fn, optimizer, mesh=mesh, grad_accum=config.grad_accum,
                               ema_decay_rate=config.ema.decay, ema_warmup=config.ema.warmup,
                               lr=o.lr),
      in_shardings=(state_sh, frozen_sh, sharding.batch_sharding(mesh)),
      out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
  b, res = micro_batch * devices * config.grad_accum, config.data.res
  image = jax.ShapeDtypeStruct((b, res, res, 3), jnp.float32)
  batch = {"input": image, "edited": image}
  if isinstance(models.null_text, tuple):  # SDXL: both tokenizers' ids, the micro-conditioning
    pair = jax.ShapeDtypeStruct((b, 2), jnp.int32)
    batch.update(input_ids=jax.ShapeDtypeStruct((b, 2, models.null_text[0].shape[1]), jnp.int32),
                 original_size=pair, crop_top_left=pair)
  else:
    batch["input_ids"] = jax.ShapeDtypeStruct((b, models.null_text.shape[1]), jnp.int32)
  start = time.perf_counter()
  stats = train_step.lower(state, frozen, batch).compile(COMPILER_OPTIONS).memory_analysis()
  out = {part: _shard_bytes(getattr(state, part), getattr(state_sh, part))
         for part in STATE_PARTS}
  out["frozen_batch"] = stats.argument_size_in_bytes - sum(out.values())
  out["temp"] = stats.temp_size_in_bytes
  out["total"] = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                  - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
  out["seconds"] = time.perf_counter() - start
  return out


def largest_batch(total_1: float, total_2: float, capacity: float) -> int:
  """The largest micro-batch b with total_1 + (b − 1)(total_2 − total_1) ≤ capacity (0: not even
  b = 1 fits)."""
  if total_1 > capacity:
    return 0
  per_example = total_2 - total_1
  if per_example <= 0:
    raise ConfigError(f"the compiled step's memory did not grow from micro-batch 1 to 2 "
                      f"({total_1} → {total_2} bytes): no line to extrapolate")
  return 1 + int((capacity - total_1) // per_example)


def analyse(config: ml_collections.ConfigDict, configs: dict[str, dict], *,
            fsdp: Sequence[int], remat: Sequence[bool],
            chips: Sequence[tuple[str, float]] = CHIPS,
            log: Callable[[str], None] = lambda _: None) -> list[dict]:
  """One row per (remat, fsdp): bytes per device at b = 1 and 2, ``check``: the compile at the
  largest b the line through them predicts (b, its bytes, the line's), and ``fits``: the largest
  b per chip on the line through b = 1 and the check, at most the check's b."""
  rows = []
  for on in remat:
    models = abstract_models(configs, config, remat=on)
    for n in fsdp:
      at = {}
      for b in (1, 2):
        at[b] = compile_step(models, config, n, b)
        log(f"remat {'on' if on else 'off'}, {n} device(s), micro-batch {b}: "
            f"{at[b]['total'] / GIB:.3f} GiB per device (compiled in {at[b]['seconds']:.0f} s)")
      t1, per_example = at[1]["total"], at[2]["total"] - at[1]["total"]
      fits = {chip: largest_batch(t1, t1 + per_example, gib * GIB) for chip, gib in chips}
      check = None
      top = max(fits.values())
      if top > 2:
        compiled = compile_step(models, config, n, top)
        log(f"  check at micro-batch {top}: {compiled['total'] / GIB:.3f} GiB per device")
        check = {"batch": top, "total": compiled["total"], "line": t1 + (top - 1) * per_example}
        per_example = (compiled["total"] - t1) / (top - 1)
        fits = {chip: min(top, largest_batch(t1, t1 + per_example, gib * GIB))
                for chip, gib in chips}
      rows.append({"remat": on, "devices": n, "b1": at[1], "b2": at[2],
                   "per_example": per_example, "fits": fits, "check": check})
  return rows


def _gib(value: float) -> str:
  return f"{value / GIB:.3g}"


def markdown(rows: Sequence[dict], *, title: str, command: str,
             chips: Sequence[tuple[str, float]] = CHIPS) -> str:
  """The table: GiB per device, and the largest micro-batch per chip."""
  chip_heads = " | ".join(f"{name} {gib:g}" for name, gib in chips)
  lines = [f"### {title}", "", f"`{command}`", "",
           "GiB per device, **the CPU compiler's estimate** (XLA:CPU buffer assignment of the "
           "same sharded program, on fake CPU devices); b = per-device micro-batch; check: one "
           "compile at the largest b the line through b = 1 and 2 predicts (and that line's "
           "GiB there); chip columns: the largest b that fits the chip's GiB on the line through "
           "b = 1 and the check.", "",
           f"| remat | FSDP devices | params | optimizer | EMA | frozen + batch (b=1) "
           f"| temporaries b=1 | total b=1 | + per example | {chip_heads} | check |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(chips) + "---|"]
  for r in rows:
    b1, check = r["b1"], r["check"]
    fits = " | ".join(str(r["fits"][name]) for name, _ in chips)
    checked = ("—" if check is None else f"b={check['batch']}: {_gib(check['total'])} "
               f"(line {_gib(check['line'])})")
    lines.append(
        f"| {'on' if r['remat'] else 'off'} | {r['devices']} | {_gib(b1['params'])} "
        f"| {_gib(b1['opt_state'])} | {_gib(b1['ema'])} | {_gib(b1['frozen_batch'])} "
        f"| {_gib(b1['temp'])} | {_gib(b1['total'])} | {_gib(r['per_example'])} | {fits} "
        f"| {checked} |")
  return "\n".join(lines)


def parse_chips(text: str) -> list[tuple[str, float]]:
  """``"TPU v5e=16,H100=80"`` → [(name, GiB), …]."""
  chips = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, _, gib = item.rpartition("=")
    try:
      chips.append((name.strip(), float(gib)))
    except ValueError:
      chips.append(("", 0.0))
    if not chips[-1][0] or not chips[-1][1] > 0:
      raise ConfigError(f"--chips: {item!r} is not NAME=GiB with GiB > 0")
  if not chips:
    raise ConfigError("--chips names no chip")
  return chips


def check_devices(needed: int) -> None:
  """The fake CPU devices must have been asked for before JAX started its backend."""
  have = len(jax.devices())
  if have < needed or jax.devices()[0].platform != "cpu":
    raise ConfigError(f"--memory compiles for {needed} CPU devices but JAX has {have} "
                      f"{jax.devices()[0].platform} device(s): set XLA_FLAGS="
                      f"--xla_force_host_platform_device_count={needed} and JAX_PLATFORMS=cpu "
                      "before JAX starts (jip2p-bench --memory does)")
