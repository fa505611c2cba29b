"""A tiny random open_clip model on disk, and the reference's CLIP scores in-process (torch side).

`reference_scores` is instruct-pix2pix's ``ClipSimilarity`` written out independently of the
sidecar: images in [0, 1], bicubic ``F.interpolate`` to the input size, OpenAI mean/std,
``x / x.norm()``, ``open_clip.tokenize`` (truncating), ``F.cosine_similarity``.

``python -m tests.sidecar.tiny_clip OUT`` writes the model and a case with its expected scores
(``case.npz``; weights as a torch.save state dict) for the TensorFlow-side test, which must not
import torch itself.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

# Widths of 128 give 2 heads per tower both ways open_clip counts them (head_width 64 for
# the image tower, width // 64 for an OpenAI TorchScript file), and OpenAI's QuickGELU.
CONFIG = {"embed_dim": 32, "quick_gelu": True,
          "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2,
                       "layers": 2}}
_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


def tiny_model(seed: int = 0, config: dict = CONFIG) -> torch.nn.Module:
  torch.manual_seed(seed)
  return open_clip.CLIP(**config).eval()


def write_tiny_clip(directory: str, seed: int = 0, name: str = "tiny_clip",
                    suffix: str = ".safetensors") -> tuple[str, str]:
  """(config JSON path, weights path) of a random tiny CLIP; weights in safetensors or torch.save."""
  config_path = os.path.join(directory, f"{name}.json")
  weights_path = os.path.join(directory, name + suffix)
  with open(config_path, "w") as f:
    json.dump(CONFIG, f)
  state = tiny_model(seed).state_dict()
  if suffix == ".safetensors":
    save_file({k: v.contiguous() for k, v in state.items()}, weights_path)
  else:
    torch.save(state, weights_path)
  return config_path, weights_path


def write_torchscript(path: str, seed: int = 0) -> torch.nn.Module:
  """An OpenAI-style TorchScript release file of a tiny CLIP; returns the model it holds.

  OpenAI's files keep weights in float16 and the text mask as a constant, not a buffer; so does
  this one (weights rounded through float16, so the returned float32 model is exactly them).
  """
  model = tiny_model(seed).half().float()
  mask = model.attn_mask
  del model._buffers["attn_mask"]
  model.attn_mask = mask
  image, text = torch.rand(1, 3, 32, 32), open_clip.tokenize(["a photo"])
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.jit.trace(model, (image, text), check_trace=False).save(path)
  return model


def load_tiny(weights_path: str) -> torch.nn.Module:
  model = open_clip.CLIP(**CONFIG).eval()
  if weights_path.endswith(".safetensors"):
    model.load_state_dict(load_file(weights_path))
  else:
    model.load_state_dict(torch.load(weights_path, weights_only=True))
  return model


@torch.no_grad()
def reference_features(model, images: np.ndarray | None = None, texts=None) -> np.ndarray:
  """The reference's L2-normalised image (uint8 or [0, 1] float NHWC) or text features."""
  if texts is not None:
    f = model.encode_text(open_clip.tokenize(list(texts)))
  else:
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float()
    x = x / 255.0 if images.dtype == np.uint8 else x
    x = F.interpolate(x, size=CONFIG["vision_cfg"]["image_size"], mode="bicubic",
                      align_corners=False)
    f = model.encode_image((x - _MEAN[:, None, None]) / _STD[:, None, None])
  return (f / f.norm(dim=1, keepdim=True)).numpy()


def reference_scores(model, images0, images1, captions0, captions1) -> dict[str, np.ndarray]:
  i0, i1 = (torch.from_numpy(reference_features(model, images)) for images in (images0, images1))
  t0, t1 = (torch.from_numpy(reference_features(model, texts=c)) for c in (captions0, captions1))
  return {"sim_0": F.cosine_similarity(i0, t0).numpy(),
          "sim_1": F.cosine_similarity(i1, t1).numpy(),
          "sim_direction": F.cosine_similarity(i1 - i0, t1 - t0).numpy(),
          "sim_image": F.cosine_similarity(i0, i1).numpy()}


def make_case(seed: int, n: int = 4, hw: tuple[int, int] = (48, 40)):
  """Random image pairs (the last pair identical: zero image direction) and caption pairs."""
  rng = np.random.default_rng(seed)
  images0 = rng.integers(0, 256, (n, *hw, 3), dtype=np.uint8)
  images1 = rng.integers(0, 256, (n, *hw, 3), dtype=np.uint8)
  images1[-1] = images0[-1]
  words = ["cat", "dog", "red", "house", "snow", "a", "photo", "of", "painting", "night"]
  captions0 = [" ".join(rng.choice(words, 4)) for _ in range(n)]
  captions1 = [" ".join(rng.choice(words, 5)) for _ in range(n)]
  captions0[0] = ""
  captions1[0] = " ".join(["word"] * 100)  # longer than 77 tokens: truncated
  return images0, images1, captions0, captions1


def main(out: str) -> None:
  _, weights_path = write_tiny_clip(out, suffix=".pt")
  case = make_case(seed=7)
  expected = reference_scores(load_tiny(weights_path), *case)
  np.savez(os.path.join(out, "case.npz"), images0=case[0], images1=case[1],
           captions0=np.array(case[2]), captions1=np.array(case[3]),
           **{f"expected_{k}": v for k, v in expected.items()})


if __name__ == "__main__":
  main(sys.argv[1])
