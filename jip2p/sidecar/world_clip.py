"""A world CLIP: a small open_clip model trained contrastively on `jip2p.data.synthetic` drawings.

Why it exists: no pretrained weights reach this project, yet CLIP-based metrics (the sidecar's
sim_0/sim_direction, the CLIP filter) and a text-to-image model of the world need a CLIP that
understands world captions ('a red circle in the top left and a blue square in the centre, on a
white background'). This one is trained here, on this world only, with open_clip's own model
(`open_clip.create_model` from a config registered by `open_clip.add_model_config`, exactly as
the sidecar builds it) and open_clip's own loss (`open_clip.loss.ClipLoss`), and saved in
open_clip's format: ``<out>/world-clip.json`` (an open_clip model config) and
``<out>/world-clip.safetensors`` (float16 weights). The sidecar serves it like any checkpoint::

  python -m jip2p.sidecar.server --clip-weights data/world-clip/world-clip.safetensors \\
      --clip-config data/world-clip/world-clip.json

Architecture (`CONFIG`): text tower width 64, 4 heads, 3 layers, GELU, context 77, open_clip's
49408-token vocabulary (its text tower is meant to become the frozen text encoder of a world
text-to-image UNet with cross-attention dim 64: `jip2p.checkpoints.convert.convert_open_clip_text`);
vision tower a ViT with 4-pixel patches at 32x32, width 96, 3 layers.

Preprocessing: images are rendered at 32x32 (the model's input size, so the sidecar's bicubic
resize is the identity), scaled to [0, 1] and normalised with OpenAI's CLIP mean/std, which is
what open_clip gives a model created from a registered config with a weights file (its
``preprocess_cfg`` defaults; a model config JSON cannot carry its own) and so what the sidecar
uses. `preprocess` is that normalisation; training uses it.

Binding: a fraction of each batch (``--twin-fraction``) is scene/twin pairs: the twin
(`twin_scene`) differs only in how attributes bind (two objects swap colours, an object moves to
another cell, or an object changes shape), captioned with the same wording. Both are in the batch,
so a bag of colour words cannot tell the pair apart and the contrastive loss must bind colours to
shapes to places.

Training cost: the text tower is trained on tokens trimmed to the batch's longest caption
(`encode_text_trimmed`, equal to open_clip's ``encode_text`` because the tower is causal and pools
at the end token), which halves its cost.

Training uses the training wordings (``split="train"``) of scenes of seed 0; evaluation
(`evaluate`) uses held-out scenes (seed 1) worded with the held-out templates
(``split="heldout"``): top-1 image→caption and caption→image retrieval among 100 candidates
(averaged over groups of 100), and twin accuracy (an image scores its own caption above its
twin's, both members of each pair counted).

Shipped weights (``data/world-clip/``), made on a 2-core CPU with::

  python -m jip2p.sidecar.world_clip --out data/world-clip --steps 3000 --batch-size 64 \\
      --twin-fraction 0.75 --seed 0 --lr 2e-3 --threads 1

(997 s of training, 2026-12-07.) Measured on held-out scenes and wordings (5 groups of 100):
image→caption top-1 0.852, caption→image top-1 0.876, twin accuracy 0.812. A 750-step run
(245 s) retrieved slightly better (0.906 / 0.914) but bound far worse (twins 0.578): the longer
run is the one shipped, since a text-to-image model and the CLIP filter need the binding.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from jip2p import storage
from jip2p.data import synthetic
from jip2p.errors import ConfigError, run

NAME = "world-clip"
IMAGE_SIZE = 32
TRAIN_SEED = 0  # scenes of training
EVAL_SEED = 1  # held-out scenes
# OpenAI's CLIP mean/std (open_clip.OPENAI_DATASET_MEAN/STD): the sidecar's default preprocessing.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG = {
    "embed_dim": 64,
    "quick_gelu": False,
    "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": 4, "width": 96, "layers": 3,
                   "head_width": 32, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4,
                 "layers": 3, "mlp_ratio": 4.0},
}
TWIN_KINDS = ("swap", "move", "reshape")


# ----------------------------------------------------------------------------- data (numpy only)

def twin_scene(scene: synthetic.Scene, rng: np.random.Generator) -> synthetic.Scene:
  """A scene that differs from ``scene`` only in binding: two objects swap colours, one object
  moves to an empty cell, or one changes shape (the kind drawn at random among those valid for
  the scene; a move always is: at most 4 objects share 9 cells).
  """
  objs = list(scene.objects)
  kinds = list(TWIN_KINDS)
  rng.shuffle(kinds)
  for kind in kinds:
    if kind == "swap":
      pairs = [(i, j) for i in range(len(objs)) for j in range(i + 1, len(objs))
               if objs[i].colour != objs[j].colour]
      rng.shuffle(pairs)
      for i, j in pairs:
        new = list(objs)
        new[i] = dataclasses.replace(objs[i], colour=objs[j].colour)
        new[j] = dataclasses.replace(objs[j], colour=objs[i].colour)
        if _unambiguous(new):
          return synthetic.Scene(scene.background, tuple(new))
    elif kind == "move":
      free = [c for c in synthetic.PLACES if c not in {o.cell for o in objs}]
      if free:
        i = int(rng.integers(len(objs)))
        new = list(objs)
        new[i] = dataclasses.replace(objs[i], cell=free[int(rng.integers(len(free)))])
        return synthetic.Scene(scene.background, tuple(new))
    else:  # reshape: another shape, unless that makes a second object of that colour and shape
      i = int(rng.integers(len(objs)))
      shapes = [s for s in synthetic.SHAPES if s != objs[i].shape]
      rng.shuffle(shapes)
      for shape in shapes:
        new = list(objs)
        new[i] = dataclasses.replace(objs[i], shape=shape)
        if _unambiguous(new):
          return synthetic.Scene(scene.background, tuple(new))
  raise AssertionError(f"no twin for {scene}")  # unreachable: a move is always possible


def _unambiguous(objs) -> bool:
  return len({(o.colour, o.shape) for o in objs}) == len(objs)


def pair_at(index: int, *, seed: int, split: str, size: int = IMAGE_SIZE):
  """(image, caption, twin image, twin caption) of drawing ``index``: the twin is worded with the
  same template; a pure function of the arguments."""
  d = synthetic.drawing_at(index, seed=seed, size=size, split=split)
  twin = twin_scene(d.scene, np.random.default_rng([seed, index, 2]))
  return (d.image, d.caption, synthetic.render(twin, size),
          synthetic.caption(twin, d.template_id))


def batch_at(step: int, batch_size: int, *, seed: int = TRAIN_SEED, split: str = "train",
             twin_fraction: float = 0.5):
  """uint8 images [N, 32, 32, 3] and N captions, ``batch_size`` in all: a ``twin_fraction`` of
  them are scene/twin pairs (adjacent), the rest single scenes; step ``step`` of the stream."""
  pairs = int(batch_size * twin_fraction / 2)
  singles = batch_size - 2 * pairs
  start = step * (pairs + singles)
  images, captions = [], []
  for k in range(pairs):
    image, text, twin_image, twin_text = pair_at(start + k, seed=seed, split=split)
    images += [image, twin_image]
    captions += [text, twin_text]
  for k in range(pairs, pairs + singles):
    d = synthetic.drawing_at(start + k, seed=seed, size=IMAGE_SIZE, split=split)
    images.append(d.image)
    captions.append(d.caption)
  return np.stack(images), captions


# ----------------------------------------------------------------------------- torch

def preprocess(images):
  """uint8 [N, H, W, 3] (numpy) → float32 [N, 3, H, W] torch tensor normalised as the sidecar
  does for this model (32x32 input: its bicubic resize is the identity)."""
  import torch
  x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
  mean = torch.tensor(MEAN)[:, None, None]
  std = torch.tensor(STD)[:, None, None]
  return (x - mean) / std


def encode_text_trimmed(model, tokens):
  """``model.encode_text(tokens)`` (unnormalised) computed on the tokens up to the batch's longest
  caption: the text tower is causal and pools at the end-of-text token, so the padding positions
  after it never reach the features; skipping them halves the text tower's training cost."""
  import torch
  length = int((tokens != 0).sum(1).max())
  tokens = tokens[:, :length]
  x = model.token_embedding(tokens) + model.positional_embedding[:length]
  x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
  x = model.ln_final(x)
  x = x[torch.arange(len(tokens)), tokens.argmax(dim=-1)]  # the end-of-text token has the top id
  return x @ model.text_projection


def write_config(path: str) -> None:
  with open(path, "w") as f:
    json.dump(CONFIG, f, indent=2)


def create_model(config_path: str, weights: str | None = None):
  """The model as the sidecar builds it: registered config, `open_clip.create_model`."""
  import open_clip
  open_clip.add_model_config(config_path)
  name = os.path.splitext(os.path.basename(config_path))[0]
  model = open_clip.create_model(name, pretrained=weights, pretrained_image=False,
                                 pretrained_text=False)
  return model, open_clip.get_tokenizer(name)


def evaluate(model, tokenizer, *, n: int = 100, groups: int = 5, seed: int = EVAL_SEED,
             split: str = "heldout") -> dict:
  """Held-out retrieval: top-1 image→caption and caption→image among ``n`` candidates (mean over
  ``groups`` disjoint groups of scenes), and twin accuracy over the groups' scenes and their
  twins (each image's own caption must score above its twin's)."""
  import torch
  model.eval()
  i2t = t2i = 0.0
  twin_right = twin_total = 0
  with torch.no_grad():
    for g in range(groups):
      rows = [pair_at(g * n + k, seed=seed, split=split) for k in range(n)]
      images = np.stack([r[0] for r in rows] + [r[2] for r in rows])
      texts = [r[1] for r in rows] + [r[3] for r in rows]
      fi = model.encode_image(preprocess(images), normalize=True)
      ft = model.encode_text(tokenizer(texts), normalize=True)
      sim = fi[:n] @ ft[:n].T
      target = torch.arange(n)
      i2t += (sim.argmax(1) == target).float().mean().item() / groups
      t2i += (sim.argmax(0) == target).float().mean().item() / groups
      own = (fi * ft).sum(1)
      other = (fi * torch.cat([ft[n:], ft[:n]])).sum(1)
      twin_right += int((own > other).sum())
      twin_total += 2 * n
  return {"image_to_caption_top1": i2t, "caption_to_image_top1": t2i,
          "twin_accuracy": twin_right / twin_total, "candidates": n, "groups": groups}


def train(out: str, *, steps: int, batch_size: int, seed: int, lr: float, warmup: int | None = None,
          twin_fraction: float = 0.5, log_every: int = 25, eval_n: int = 100, eval_groups: int = 5,
          threads: int = 2) -> dict:
  """Trains, evaluates the float16-rounded weights, writes ``out`` (by renaming a temporary
  sibling folder); returns the measurements."""
  import open_clip
  import torch
  from safetensors.torch import save_file

  torch.set_num_threads(threads)
  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ConfigError(f"{out} exists and is not an empty folder; choose another --out")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(out)}-", dir=parent)
  try:
    config_path = os.path.join(tmp, f"{NAME}.json")
    write_config(config_path)
    torch.manual_seed(seed)
    model, tokenizer = create_model(config_path)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n
             and "positional" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding"
                                                               not in n and "positional" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, steps // 20) if warmup is None else warmup
    schedule = lambda s: (s + 1) / warmup if s < warmup else 0.5 * (
        1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    loss_fn = open_clip.loss.ClipLoss()
    start = time.time()
    losses = []
    for step in range(steps):
      images, captions = batch_at(step, batch_size, seed=TRAIN_SEED, split="train",
                                   twin_fraction=twin_fraction)
      image_f = model.encode_image(preprocess(images), normalize=True)
      text_f = torch.nn.functional.normalize(encode_text_trimmed(model, tokenizer(captions)),
                                             dim=-1)
      loss = loss_fn(image_f, text_f, model.logit_scale.exp())
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      sched.step()
      with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
      losses.append(loss.item())
      if (step + 1) % log_every == 0 or step + 1 == steps:
        elapsed = time.time() - start
        print(f"step {step + 1}/{steps}  loss {np.mean(losses[-log_every:]):.4f}  "
              f"scale {model.logit_scale.exp().item():.1f}  lr {sched.get_last_lr()[0]:.2e}  "
              f"{(step + 1) / elapsed:.2f} steps/s  {elapsed:.0f} s", flush=True)
    train_s = time.time() - start
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    weights = os.path.join(tmp, f"{NAME}.safetensors")
    save_file(state, weights)
    shipped, tokenizer = create_model(config_path, weights)  # measure what is shipped
    result = {"steps": steps, "batch_size": batch_size, "twin_fraction": twin_fraction,
              "seed": seed, "lr": lr,
              "train_seconds": round(train_s, 1),
              "final_loss": float(np.mean(losses[-log_every:])),
              **evaluate(shipped, tokenizer, n=eval_n, groups=eval_groups)}
    print(json.dumps(result), flush=True)
    os.chmod(weights, 0o666 & ~storage.umask())  # safetensors and mkdtemp create them owner-only
    os.chmod(tmp, 0o777 & ~storage.umask())
    if os.path.isdir(out):
      os.rmdir(out)
    os.replace(tmp, out)
    return result
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m jip2p.sidecar.world_clip",
                              description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="folder to create (written under a temporary name, "
                                              "then renamed): world-clip.json + .safetensors")
  p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
  p.add_argument("--batch-size", type=int, default=64, help="images (and captions) per step")
  p.add_argument("--seed", type=int, default=0, help="torch initialisation seed (training scenes "
                 "are always those of seed 0, held-out ones of seed 1)")
  p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (warmup, "
                                                        "cosine decay)")
  p.add_argument("--twin-fraction", type=float, default=0.75,
                 help="fraction of each batch that is scene/twin pairs")
  p.add_argument("--eval-groups", type=int, default=5,
                 help="groups of 100 held-out scenes to measure on")
  p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
  return p.parse_args(argv)


def _main(argv=None) -> int:
  args = parse_args(argv)
  if args.steps < 1 or args.batch_size < 4 or not 0 <= args.twin_fraction <= 1:
    raise ConfigError("--steps must be ≥ 1, --batch-size ≥ 4 and --twin-fraction in [0, 1]")
  train(args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed, lr=args.lr,
        twin_fraction=args.twin_fraction, eval_groups=args.eval_groups, threads=args.threads)
  return 0


def main(argv=None) -> int:
  return run(_main, argv, "python -m jip2p.sidecar.world_clip")


if __name__ == "__main__":
  sys.exit(main())
