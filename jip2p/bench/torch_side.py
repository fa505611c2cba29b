"""One benchmark case on the PyTorch side (diffusers), in this process; prints ``BENCH {json}``.

  python -m jip2p.bench.torch_side --case train_full_256_b64 --configs CONFIGS.json
      [--variant eager|compile] [--no-ema]

What a user would otherwise run, as docs/design.md §3 defines the baseline: the step of diffusers'
``examples/instruct_pix2pix/train_instruct_pix2pix.py`` (VAE and text encoder frozen in bf16, UNet
float32 under bf16 autocast, SDPA attention, fused AdamW, conditioning dropout, and the script's
``--use_ema`` EMAModel step, foreach) eager or with the UNet under ``torch.compile``;
``StableDiffusionInstructPix2PixPipeline`` in float16 (float32 on CPU, which lacks fast float16
kernels) with precomputed prompt embeddings. SDXL configs (`cases.is_sdxl`): the UNet-only step with
SDXL's added conditioning (pooled text and time ids, the pooled text dropped with the states, as
``train_instruct_pix2pix_sdxl.py``; the null text zeros) and
``StableDiffusionXLInstructPix2PixPipeline`` with precomputed prompt and pooled embeddings.
Random weights at the given configs' shapes. An eager
train case also counts the UNet's training FLOPs per image at its resolution (after its peak
memory is read), so that no extra process is started for the count. This module never imports
JAX or TensorFlow. ``bench/baseline.py`` produces the baseline's figures with it (EMA off);
`jip2p-bench` runs it beside the JAX side.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

from jip2p.bench import cases, timing


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m jip2p.bench.torch_side", description=__doc__)
  p.add_argument("--case", required=True)
  p.add_argument("--configs", required=True, help="JSON: unet, vae, text_encoder, scheduler")
  p.add_argument("--warmup", type=int, default=None, help="untimed runs (default: the case's)")
  p.add_argument("--iters", type=int, default=None, help="timed runs (default: the case's)")
  p.add_argument("--variant", choices=("eager", "compile"), default="eager",
                 help="train cases: the UNet eager or under torch.compile")
  p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                 help="the script's --use_ema step in the train step (the baseline: off)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  import torch
  with open(args.configs) as f:
    configs = json.load(f)
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  case = cases.parse(args.case, warmup=args.warmup, iters=args.iters)
  if dev == "cuda":
    torch.cuda.reset_peak_memory_stats()
  if case.kind == "train":
    record = _train(case, configs, dev, compile_unet=args.variant == "compile", ema=args.ema)
    record.update(variant=args.variant, ema=args.ema, dtype="bf16 autocast")
  elif case.kind == "edit":
    dtype = torch.float16 if dev == "cuda" else torch.float32
    record = _edit(case, configs, dev, dtype)
    record.update(variant=str(dtype).replace("torch.", ""), dtype=str(dtype))
  else:
    raise SystemExit(f"case {case.name}: diffusers has no paired (Prompt-to-Prompt) generator; "
                     "the PyTorch side has no such case")
  peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
  record.update(side="torch", case=case.name, kind=case.kind, unit=case.unit,
                peak_gib=None if peak is None else peak / 2**30)
  if case.kind == "train" and args.variant == "eager":
    record["torch_unet_flops_per_image"] = _unet_flops(configs, case.res, dev)
  record.update(device=torch.cuda.get_device_name(0) if dev == "cuda" else platform.processor()
                or "cpu", platform=dev, versions=_versions())
  timing.emit(record)
  return 0


def _versions() -> dict:
  import diffusers
  import torch
  import transformers
  out = {"torch": torch.__version__, "diffusers": diffusers.__version__,
         "transformers": transformers.__version__, "python": sys.version.split()[0]}
  if torch.cuda.is_available():
    out.update(cuda=torch.version.cuda, cudnn=str(torch.backends.cudnn.version()))
  return out


# ---------------------------------------------------------------- models


def _unet(configs: dict, in_channels: int):
  from diffusers import UNet2DConditionModel
  return UNet2DConditionModel.from_config(dict(configs["unet"], in_channels=in_channels))


def _vae(configs: dict):
  from diffusers import AutoencoderKL
  return AutoencoderKL.from_config(configs["vae"])


def _text_encoder(configs: dict):
  from transformers import CLIPTextConfig, CLIPTextModel
  config = {k: v for k, v in configs["text_encoder"].items()
            if k not in ("architectures", "model_type") and not k.startswith("_")}
  return CLIPTextModel(CLIPTextConfig(**config, attn_implementation="sdpa"))


def _sync(dev: str):
  import torch
  return (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)


def _timed(case: cases.Case, fn, dev: str) -> dict:
  sync = _sync(dev)
  first = timing.first_run(fn, sync)
  median, times = timing.median_run(fn, sync, warmup=case.warmup, iters=case.iters)
  return {"first_s": first, "time_s": median, "times": times, "warmup": case.warmup,
          "iters": case.iters}


# ---------------------------------------------------------------- cases


def _train(case: cases.Case, configs: dict, dev: str, *, compile_unet: bool, ema: bool) -> dict:
  import torch
  import torch.nn.functional as F
  from diffusers import DDPMScheduler
  from diffusers.training_utils import EMAModel

  cases.check_models([case], configs)
  sdxl = cases.is_sdxl(configs)
  torch.manual_seed(0)
  b, res = case.batch, case.res
  unet = _unet(configs, 8).to(dev).train()
  vae = _vae(configs).to(dev, dtype=torch.bfloat16).eval().requires_grad_(False)
  if not sdxl:
    text_encoder = _text_encoder(configs).to(dev, dtype=torch.bfloat16).eval().requires_grad_(
        False)
  optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)
  ema_unet = EMAModel(unet.parameters(), foreach=True) if ema else None
  s = configs["scheduler"]
  scheduler = DDPMScheduler(num_train_timesteps=s["num_train_timesteps"],
                            beta_start=s["beta_start"], beta_end=s["beta_end"],
                            beta_schedule=s["beta_schedule"])
  alphas_cumprod = scheduler.alphas_cumprod.to(dev)
  forward = torch.compile(unet) if compile_unet else unet
  scaling = configs["vae"]["scaling_factor"]
  length = configs["text_encoder"]["max_position_embeddings"]
  width = configs["unet"]["cross_attention_dim"]  # the text states' (both encoders' for SDXL)
  latent = res // 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
  channels = configs["vae"]["latent_channels"]
  edited = torch.randn(b, 3, res, res, device=dev, dtype=torch.bfloat16).clamp(-1, 1)
  original = torch.randn(b, 3, res, res, device=dev, dtype=torch.bfloat16).clamp(-1, 1)
  ids = torch.randint(0, 49407, (b, length), device=dev)
  pre_latents = torch.randn(b, channels, latent, latent, device=dev)
  pre_image = torch.randn(b, channels, latent, latent, device=dev)
  pre_text = torch.randn(b, length, width, device=dev)
  added = _added(configs, b, res, dev)
  if sdxl:
    null_text = torch.zeros(1, length, width, device=dev)
  else:
    with torch.no_grad():
      null_text = text_encoder(torch.full((1, length), 49407, device=dev))[0].float()
  p = 0.05

  def step():
    with torch.no_grad():
      if case.full:
        latents = vae.encode(edited).latent_dist.sample().float() * scaling
        image_latents = vae.encode(original).latent_dist.mode().float()
        text = text_encoder(ids)[0].float()
      else:
        latents, image_latents, text = pre_latents, pre_image, pre_text
    noise = torch.randn_like(latents)
    t = torch.randint(0, len(alphas_cumprod), (b,), device=dev)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    r = torch.rand(b, device=dev)
    text = torch.where((r < 2 * p).view(-1, 1, 1), null_text, text)
    kwargs = {}
    if added is not None:
      pooled = torch.where((r < 2 * p).view(-1, 1), 0.0, added["text_embeds"])
      kwargs["added_cond_kwargs"] = {**added, "text_embeds": pooled}
    keep_image = 1 - ((r >= p) & (r < 3 * p)).float().view(-1, 1, 1, 1)
    x = torch.cat([noisy, image_latents * keep_image], dim=1)
    with torch.autocast(dev, dtype=torch.bfloat16):
      pred = forward(x, t, text, **kwargs).sample
    loss = F.mse_loss(pred.float(), noise)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema_unet is not None:
      ema_unet.step(unet.parameters())
    return loss

  out = _timed(case, step, dev)
  out.update(items=b, loss=float(step().detach()))
  return out


def _added(configs: dict, batch: int, res: int, dev: str):
  """An SDXL UNet's added conditioning for ``batch`` res² images (random pooled text, the time
  ids (res, res, 0, 0, res, res)); None for other models."""
  import torch
  if not cases.is_sdxl(configs):
    return None
  pooled = configs["text_encoder_2"]["projection_dim"]
  time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32, device=dev)
  return {"text_embeds": torch.randn(batch, pooled, device=dev),
          "time_ids": time_ids.repeat(batch, 1)}


def _unet_flops(configs: dict, res: int, dev: str) -> float:
  """The baseline's count: FlopCounterMode over forward + backward under bf16 autocast."""
  import torch
  from torch.utils.flop_counter import FlopCounterMode
  b = cases.FLOP_BATCH.get(res, 2)
  unet = _unet(configs, 8).to(dev)
  latent = res // 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
  text = configs["text_encoder"]
  x = torch.randn(b, 8, latent, latent, device=dev)
  t = torch.randint(0, 1000, (b,), device=dev)
  c = torch.randn(b, text["max_position_embeddings"], configs["unet"]["cross_attention_dim"],
                  device=dev)
  added = _added(configs, b, res, dev)
  kwargs = {} if added is None else {"added_cond_kwargs": added}
  with FlopCounterMode(display=False) as counter:
    with torch.autocast(dev, dtype=torch.bfloat16):
      unet(x, t, c, **kwargs).sample.float().sum().backward()
  return counter.get_total_flops() / b


def _edit(case: cases.Case, configs: dict, dev: str, dtype) -> dict:
  import diffusers
  import torch

  torch.manual_seed(0)
  unet = _unet(configs, 2 * configs["vae"]["latent_channels"])
  scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(configs["scheduler"])
  text = configs["text_encoder"]
  shape = (case.batch, text["max_position_embeddings"], configs["unet"]["cross_attention_dim"])
  image = torch.rand(case.batch, 3, case.res, case.res)
  prompt = torch.randn(shape, dtype=dtype, device=dev)
  negative = torch.zeros(shape, dtype=dtype, device=dev)
  embeddings = dict(prompt_embeds=prompt, negative_prompt_embeds=negative)
  if cases.is_sdxl(configs):  # Precomputed embeddings: the pipeline needs no text encoder.
    pipe = diffusers.StableDiffusionXLInstructPix2PixPipeline(
        vae=_vae(configs), text_encoder=None, text_encoder_2=None, tokenizer=None,
        tokenizer_2=None, unet=unet, scheduler=scheduler, add_watermarker=False)
    pooled = (case.batch, configs["text_encoder_2"]["projection_dim"])
    embeddings.update(pooled_prompt_embeds=torch.randn(pooled, dtype=dtype, device=dev),
                      negative_pooled_prompt_embeds=torch.zeros(pooled, dtype=dtype, device=dev),
                      height=case.res, width=case.res)
  else:
    pipe = diffusers.StableDiffusionInstructPix2PixPipeline(
        vae=_vae(configs), text_encoder=_text_encoder(configs), tokenizer=None, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
  pipe = pipe.to(dev, dtype=dtype)
  pipe.set_progress_bar_config(disable=True)

  def run():
    return pipe(image=image, num_inference_steps=case.steps, guidance_scale=7.5,
                image_guidance_scale=1.5, output_type="np", **embeddings)

  out = _timed(case, run, dev)
  out.update(items=case.batch)
  return out


if __name__ == "__main__":
  sys.exit(main())
