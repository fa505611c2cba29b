"""A tiny random DINO ViT on disk, and its features computed by hand (torch side).

`reference_features` is DINO's ``vision_transformer.py`` forward (class token after the final
norm) written out from the state dict, behind MagicBrush's preprocessing written out with PIL
(torchvision's ``Resize(size)`` short-side rule and ``CenterCrop`` rounding), so that it checks
the sidecar's timm model and torchvision transforms rather than repeating them.
"""

from __future__ import annotations

import json
import os

import numpy as np
import timm.models.vision_transformer as vit
import torch
import torch.nn.functional as F
from PIL import Image

CONFIG = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}
_MEAN = torch.tensor([0.485, 0.456, 0.406])
_STD = torch.tensor([0.229, 0.224, 0.225])


def write_tiny_dino(directory: str, seed: int = 0) -> tuple[str, str, dict]:
  """(config JSON, weights, state dict): weights saved as a DINO *training* checkpoint (the
  teacher's ``backbone.`` tensors plus a projection head the sidecar must leave out)."""
  torch.manual_seed(seed)
  model = vit.VisionTransformer(**CONFIG, qkv_bias=True, num_classes=0)
  with torch.no_grad():  # timm zero-initialises some tensors; make every one matter
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  state = {k: v.clone() for k, v in model.state_dict().items()}
  teacher = {f"backbone.{k}": v for k, v in state.items()}
  teacher["head.mlp.0.weight"] = torch.randn(16, CONFIG["embed_dim"])
  weights = os.path.join(directory, "dino_tiny.pth")
  torch.save({"teacher": teacher, "epoch": 3}, weights)
  config = os.path.join(directory, "dino_tiny.json")
  with open(config, "w") as f:
    json.dump(CONFIG, f)
  return config, weights, state


def preprocess(image: np.ndarray) -> torch.Tensor:
  """MagicBrush's DINO transform at this model's size: [3, S, S] float."""
  size = CONFIG["img_size"]
  short = round(size * 8 / 7)
  h, w = image.shape[:2]
  new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
  pil = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC)
  top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
  pixels = np.asarray(pil.crop((left, top, left + size, top + size)), np.float32) / 255.0
  x = torch.from_numpy(pixels).permute(2, 0, 1)
  return (x - _MEAN[:, None, None]) / _STD[:, None, None]


@torch.no_grad()
def reference_features(state: dict, images: np.ndarray) -> np.ndarray:
  """L2-normalised class-token features [N, D] of uint8 images [N, H, W, 3]."""
  x = torch.stack([preprocess(im) for im in images])
  d, heads, p = CONFIG["embed_dim"], CONFIG["num_heads"], CONFIG["patch_size"]
  t = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=p)
  t = t.flatten(2).transpose(1, 2)
  t = torch.cat([state["cls_token"].expand(len(t), -1, -1), t], dim=1) + state["pos_embed"]
  n, length, _ = t.shape
  ln = lambda y, name: F.layer_norm(y, (d,), state[f"{name}.weight"], state[f"{name}.bias"],
                                    eps=1e-6)
  for i in range(CONFIG["depth"]):
    b = f"blocks.{i}"
    qkv = F.linear(ln(t, f"{b}.norm1"), state[f"{b}.attn.qkv.weight"], state[f"{b}.attn.qkv.bias"])
    q, k, v = qkv.reshape(n, length, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(n, length, d)
    t = t + F.linear(out, state[f"{b}.attn.proj.weight"], state[f"{b}.attn.proj.bias"])
    hidden = F.gelu(F.linear(ln(t, f"{b}.norm2"), state[f"{b}.mlp.fc1.weight"],
                             state[f"{b}.mlp.fc1.bias"]))
    t = t + F.linear(hidden, state[f"{b}.mlp.fc2.weight"], state[f"{b}.mlp.fc2.bias"])
  f = ln(t, "norm")[:, 0]
  return (f / f.norm(dim=-1, keepdim=True)).numpy()
