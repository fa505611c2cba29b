"""One benchmark case on the JAX side, in this process; prints one ``BENCH {json}`` line.

  python -m jip2p.bench.jax_side --case train_full_256_b64 --configs CONFIGS.json [options]

Run by `jip2p-bench` (jip2p/cli/bench.py), which passes both sides the same model configs. What
runs is jip2p's own code: the trainer's jitted step (`jip2p.train.step`, FSDP mesh of one device,
donated state), `jip2p.edit.Editor` and `jip2p.p2p.sampling.PairGenerator`; weights are random
at the configs' shapes (written straight into abstract models: no per-parameter compilation).
SDXL configs (`cases.is_sdxl`) build both text encoders; their ``train_unet`` step is the
trainer's too, its loss fed the text model's pair (states, pooled) and each example's size and
crop, as from an SDXL latent cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from jip2p import runtime
from jip2p.bench import cases, timing

DTYPES = ("bfloat16", "float32")
ATTENTION = ("auto", "xla", "cudnn", "pallas")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m jip2p.bench.jax_side", description=__doc__)
  p.add_argument("--case", required=True)
  p.add_argument("--configs", required=True, help="JSON: unet, vae, text_encoder, scheduler")
  p.add_argument("--warmup", type=int, default=None, help="untimed runs (default: the case's)")
  p.add_argument("--iters", type=int, default=None, help="timed runs (default: the case's)")
  p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="compute dtype")
  p.add_argument("--attention", choices=ATTENTION, default="auto",
                 help="auto: cudnn on GPU (bfloat16), pallas on TPU, xla elsewhere")
  p.add_argument("--remat", action="store_true", help="rematerialise UNet blocks in training")
  p.add_argument("--xla-flags", choices=("tuned", "none"), default="tuned",
                 help="tuned: add jip2p.runtime.TUNED_FLAGS to XLA_FLAGS")
  p.add_argument("--compile-cache", default=None, help="persistent compilation cache folder")
  p.add_argument("--first-only", action="store_true",
                 help="time only the first run (a start with a warm compilation cache)")
  p.add_argument("--compile-only", action="store_true",
                 help="train cases: compile the step, record XLA's buffer sizes (xla_gib) and "
                      "stop before the train state is allocated")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  settings = runtime.configure(xla_flags=args.xla_flags == "tuned", cache_dir=args.compile_cache,
                               min_compile_seconds=0.0)
  case = cases.parse(args.case, warmup=args.warmup, iters=args.iters)
  with open(args.configs) as f:
    configs = json.load(f)
  import jax
  import jax.numpy as jnp
  device = jax.devices()[0]
  attention = args.attention
  if attention == "auto":  # cuDNN's flash kernel takes 16-bit inputs only.
    fast = {"gpu": "cudnn" if args.dtype == "bfloat16" else "xla", "tpu": "pallas"}
    attention = fast.get(device.platform, "xla")
  dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
  run = {"train": _train, "edit": _edit, "p2p": _p2p}[case.kind]
  extra = {"compile_only": args.compile_only} if case.kind == "train" else {}
  record = run(case, configs, dtype=dtype, attention=attention, remat=args.remat,
               first_only=args.first_only, **extra)
  stats = device.memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  import flax
  import jaxlib
  record.update(
      side="jax", variant="jax", case=case.name, kind=case.kind, unit=case.unit,
      first_only=args.first_only, dtype=args.dtype, attention=attention, remat=args.remat,
      peak_gib=None if peak is None else peak / 2**30,
      device=device.device_kind, platform=device.platform,
      versions={"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                "python": sys.version.split()[0]},
      xla_flags=settings["xla_flags"], compilation_cache=settings["compilation_cache"])
  timing.emit(record)
  return 0


# ---------------------------------------------------------------- models


def random_module(config: dict, *, dtype, attention: str, seed: int, remat: bool = False):
  """A jip2p model at ``config``'s shapes with random float32 parameters (numpy draws): kernels
  N(0, 1/fan_in), embeddings N(0, 0.02²), norm scales 1, biases 0."""
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from jip2p.checkpoints.folders import build_component
  model = build_component(config, dtype=dtype, attention_impl=attention, abstract=True, seed=seed,
                          remat=remat)
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    shape, leaf = var.get_value().shape, path[-1]
    if leaf == "bias":
      value = np.zeros(shape, np.float32)
    elif leaf == "scale":
      value = np.ones(shape, np.float32)
    elif leaf == "embedding":
      value = rng.standard_normal(shape, np.float32) * 0.02
    else:
      value = rng.standard_normal(shape, np.float32) / np.sqrt(np.prod(shape[:-1]))
    var.set_value(jnp.asarray(value))
  return model


def _pipeline(configs: dict, *, unet_in_channels: int, dtype, attention: str, remat: bool = False):
  from jip2p.checkpoints import Pipeline
  from jip2p.tokenizer import CLIPTokenizer
  unet_config = dict(configs["unet"], in_channels=unet_in_channels)
  make = lambda cfg, seed, **kw: random_module(cfg, dtype=dtype, attention=attention, seed=seed,
                                               **kw)
  sdxl = ({"text_encoder_2": make(configs["text_encoder_2"], 3),
           "tokenizer_2": CLIPTokenizer.open_clip()} if cases.is_sdxl(configs) else {})
  return Pipeline(unet=make(unet_config, 0, remat=remat), vae=make(configs["vae"], 1),
                  text_encoder=make(configs["text_encoder"], 2),
                  tokenizer=CLIPTokenizer.default(), scheduler_config=configs["scheduler"], **sdxl)


# ---------------------------------------------------------------- cases


def _timed(case: cases.Case, fn, sync, first_only: bool) -> dict:
  first = timing.first_run(fn, sync)
  out = {"first_s": first}
  if not first_only:
    median, times = timing.median_run(fn, sync, warmup=case.warmup, iters=case.iters)
    out.update(time_s=median, times=times, warmup=case.warmup, iters=case.iters)
  return out


def _train(case: cases.Case, configs: dict, *, dtype, attention: str, remat: bool,
           first_only: bool, compile_only: bool = False) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from jip2p.data import latents
  from jip2p.diffusion import schedules
  from jip2p.train import metrics, sharding
  from jip2p.train import step as step_lib

  cases.check_models([case], configs)
  sdxl = cases.is_sdxl(configs)
  pipe = _pipeline(configs, unet_in_channels=8, dtype=dtype, attention=attention, remat=remat)
  b, res = case.batch, case.res
  vae_config = pipe.vae.config
  width = pipe.unet.config.cross_attention_dim  # the text states' (both encoders' for SDXL)
  text_def, text_state = nnx.split(pipe.text_encoder)
  if sdxl:  # The null text: zeros, states and pooled (SDXL base's force_zeros_for_empty_prompt).
    length = configs["text_encoder"]["max_position_embeddings"]
    pooled_width = configs["text_encoder_2"]["projection_dim"]
    null_text = (jnp.zeros((1, length, width), jnp.float32),
                 jnp.zeros((1, pooled_width), jnp.float32))
  else:
    null_text = jax.jit(lambda s, ids: nnx.merge(text_def, s)(ids))(text_state,
                                                                     pipe.tokenizer([""]))
    length = null_text.shape[1]
  rng = np.random.default_rng(0)
  if case.full:
    vae_def, vae_state = nnx.split(pipe.vae)
    batch = {"input": rng.uniform(-1, 1, (b, res, res, 3)).astype(np.float32),
             "edited": rng.uniform(-1, 1, (b, res, res, 3)).astype(np.float32),
             "input_ids": rng.integers(0, 49407, (b, length)).astype(np.int32)}
  else:  # Precomputed latents (posterior moments) and text, as a latent cache gives them.
    vae_def, vae_state = nnx.split(latents.CachedVAE(vae_config))
    text_def, text_state = nnx.split(latents.PrecomputedText())
    h, c = res // vae_config.downscale, vae_config.latent_channels
    moments = lambda: np.concatenate([rng.standard_normal((b, h, h, c)),
                                      np.full((b, h, h, c), -8.0)], -1).astype(np.float32)
    batch = {"input": moments(), "edited": moments(),
             "input_ids": rng.standard_normal((b, length, width)).astype(np.float32)}
  frozen = {"vae": vae_state, "text_encoder": text_state, "null_text": null_text}
  added = {}  # SDXL's added conditioning of the UNet (for the FLOP count)
  if sdxl:  # The text model's pair (states, pooled), and each example's size and crop.
    batch["input_ids"] = (batch["input_ids"],
                          rng.standard_normal((b, pooled_width)).astype(np.float32))
    batch.update(original_size=np.full((b, 2), res, np.int32),
                 crop_top_left=np.zeros((b, 2), np.int32))
    added = {"text_embeds": jax.ShapeDtypeStruct((b, pooled_width), jnp.float32),
             "time_ids": jax.ShapeDtypeStruct((b, 6), jnp.float32)}
  unet_def, params = nnx.split(pipe.unet, nnx.Param)
  del pipe  # Its UNet's arrays become the train state's (donated below), its other parts unused.
  scheduler = schedules.from_scheduler_config(configs["scheduler"])
  loss_fn = step_lib.make_loss_fn(unet_def, vae_def, text_def,
                                  alphas_cumprod=scheduler.alphas_cumprod(),
                                  scaling_factor=vae_config.scaling_factor, dropout=0.05,
                                  prediction_type=scheduler.prediction_type)
  optimizer = step_lib.make_optimizer(1e-4)
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  abstract_state = jax.eval_shape(lambda p: step_lib.init_state(p, optimizer, seed=0), params)
  state_sh = sharding.tree_shardings(abstract_state, mesh)
  frozen_sh = jax.tree.map(lambda _: sharding.replicated(mesh), frozen)
  batch_sh = sharding.batch_sharding(mesh)
  train_step = jax.jit(
      step_lib.make_train_step(loss_fn, optimizer, mesh=mesh, grad_accum=1,
                               ema_decay_rate=0.9999, ema_warmup=True, lr=1e-4),
      in_shardings=(state_sh, frozen_sh, batch_sh),
      out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
  frozen = jax.device_put(frozen, frozen_sh)
  batch = jax.device_put(batch, batch_sh)
  # Compiled before the train state exists: the compiler's memory and the state's are then not
  # held at once (the peak is the larger, not the sum). Its time counts in the first step's.
  start = time.perf_counter()
  train_step = train_step.lower(
      jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                   abstract_state, state_sh), frozen, batch).compile()
  compile_s = time.perf_counter() - start
  runtime.trim_host_memory()  # Before the state exists: the compiler's leftovers, not its room.
  memory = train_step.memory_analysis()
  xla_gib = {part: getattr(memory, f"{part}_size_in_bytes") / 2 ** 30
             for part in ("argument", "output", "alias", "temp")}
  print(f"jax_side: the compiled step's buffers, GiB: {xla_gib}", file=sys.stderr, flush=True)
  if compile_only:
    return {"items": b, "compile_s": compile_s, "xla_gib": xla_gib}
  state = step_lib.initial_state(params, optimizer, 0, state_sh)
  del params  # Donated: the state holds the only copy of the weights.
  jax.block_until_ready((state, frozen, batch))

  # The UNet's training FLOPs per image as XLA counts them (the table prefers PyTorch's count,
  # for the same definition on both sides).
  h = res // vae_config.downscale
  sds = jax.ShapeDtypeStruct
  unet_loss = lambda p, x, t, c, a: jnp.mean(jnp.square(nnx.merge(unet_def, p)(x, t, c, **a)))
  xla_flops = metrics.cost_flops(
      jax.value_and_grad(unet_loss), abstract_state.params, sds((b, h, h, 8), jnp.float32),
      sds((b,), jnp.int32), sds((b, length, width), jnp.float32), added) / b

  holder = {"state": state}

  def run():
    holder["state"], step_metrics = train_step(holder["state"], frozen, batch)
    return holder["state"], step_metrics

  out = _timed(case, run, jax.block_until_ready, first_only)
  loss = float(jax.device_get(run()[1]["loss"]))
  out.update(items=b, xla_unet_flops_per_image=xla_flops, loss=loss, compile_s=compile_s, xla_gib=xla_gib,
             first_s=compile_s + out["first_s"])
  return out


def _edit(case: cases.Case, configs: dict, *, dtype, attention: str, remat: bool,
          first_only: bool) -> dict:
  import numpy as np

  from jip2p.edit import Editor
  editor = Editor(_pipeline(configs, unet_in_channels=8, dtype=dtype, attention=attention))
  image = np.random.default_rng(0).integers(0, 256, (case.res, case.res, 3), np.uint8)
  images, instructions = [image] * case.batch, ["turn it into a watercolour"] * case.batch
  run = lambda: editor(images, instructions, steps=case.steps, resolution=case.res, seed=0,
                       batch_size=case.batch, output_type="np")
  out = _timed(case, run, lambda result: None, first_only)  # numpy results: already synchronised
  out.update(items=case.batch)
  return out


def _p2p(case: cases.Case, configs: dict, *, dtype, attention: str, remat: bool,
         first_only: bool) -> dict:
  from jip2p.p2p.sampling import PairGenerator
  pipe = _pipeline(configs, unet_in_channels=configs["vae"]["latent_channels"], dtype=dtype,
                   attention=attention)
  generator = PairGenerator(pipe, steps=case.steps, height=case.res, width=case.res)
  pairs = [("a photograph of a cat on a sofa", "a photograph of a dog on a sofa")] * case.batch
  seeds = list(range(case.batch))
  run = lambda: generator(pairs, seeds)  # numpy images: already synchronised
  out = _timed(case, run, lambda result: None, first_only)
  out.update(items=case.batch)
  return out


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.exit(main())
