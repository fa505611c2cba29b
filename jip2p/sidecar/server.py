"""The CLIP sidecar: the PyTorch process of dataset generation and evaluation (open_clip, DINO).

Run by `jip2p.sidecar.client.ClipScorer` as ``python -m jip2p.sidecar.server --clip-weights PATH
[--clip-model NAME | --clip-config JSON] [--dino-weights PATH [--dino-config JSON]] ...``; it
speaks `jip2p.sidecar.protocol` on its stdin and stdout. It lives in its own process because
TensorFlow (the data writer) and PyTorch must never share one, and so that a crash or hang here
costs a restart, not the generation run.

Scoring is the reference's (instruct-pix2pix ``metrics/clip_similarity.py``): images in [0, 1],
bicubic ``F.interpolate`` (no antialias, align_corners=False) to the model's input size, CLIP
mean/std, L2-normalised features; ``F.cosine_similarity`` for

  sim_0 = cos(img0, txt0),                    sim_1 = cos(img1, txt1),
  sim_direction = cos(img1 − img0, txt1 − txt0), sim_image = cos(img0, img1).

Captions longer than the context (77 tokens) are truncated, keeping the end-of-text token.

Weights: ``.safetensors`` or a pickled state dict (opened with ``weights_only=True``) for the
architecture ``--clip-model`` names (any open_clip name) or ``--clip-config`` describes (an
open_clip model config JSON, ``{"embed_dim", "vision_cfg", "text_cfg", ...}``); or OpenAI's own
TorchScript release file (``ViT-L-14.pt``), whose architecture is read off its weights. The
default architecture is ``ViT-L-14-quickgelu``: OpenAI trained ViT-L/14 with QuickGELU, and
open_clip's plain ``ViT-L-14`` (GELU) would silently compute other features from the same weights.

DINO (evaluation: the Emu Edit and MagicBrush "DINO" metrics): a ViT built with timm from
``--dino-config`` (timm `VisionTransformer` keyword arguments; the default is DINO ViT-S/16),
weights from a local state dict in the DINO repository's key layout
(``dino_deitsmall16_pretrain.pth`` or timm's ``vit_small_patch16_224.dino`` safetensors; of a
full DINO training checkpoint, the teacher). Features are the final-norm class token,
L2-normalised. Preprocessing is MagicBrush's (``evaluation/image_eval.py``) on PIL images: bicubic
resize of the short side to 8/7 of the input size (256 for 224), centre crop, ImageNet mean/std.

At least one of CLIP and DINO must be given. torch is imported only once the files are known to
exist, so a wrong path fails in a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import sys
import zipfile

import numpy as np
from PIL import Image

from jip2p.errors import Jip2pError
from jip2p.sidecar import protocol

DEFAULT_MODEL = "ViT-L-14-quickgelu"
PRECISIONS = ("fp32", "fp16", "bf16")
# DINO ViT-S/16 (Caron et al. 2021), as torch.hub's facebookresearch/dino "dino_vits16".
DINO_VITS16 = {"img_size": 224, "patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6,
               "mlp_ratio": 4.0}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m jip2p.sidecar.server",
                              description=__doc__.split("\n")[0])
  p.add_argument("--clip-weights", help="local weights file of the CLIP model")
  p.add_argument("--clip-model", default=DEFAULT_MODEL,
                 help=f"open_clip architecture name (default {DEFAULT_MODEL}, OpenAI's ViT-L/14)")
  p.add_argument("--clip-config", help="open_clip model config JSON for a custom architecture "
                                       "(overrides --clip-model; named after the file)")
  p.add_argument("--dino-weights", help="local weights file of a DINO ViT (state dict)")
  p.add_argument("--dino-config", help="JSON of timm VisionTransformer arguments for the DINO "
                                       "model (default: ViT-S/16)")
  p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda:N")
  p.add_argument("--precision", default="fp32", choices=PRECISIONS)
  p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
  return p.parse_args(argv)


def _check_readable(path: str, what: str) -> None:
  if not os.path.isfile(path):
    raise Jip2pError(f"{what} weights file not found: {path} (a local file is needed; nothing is "
                     f"downloaded)")
  try:
    with open(path, "rb") as f:
      f.read(1)
  except OSError as e:
    raise Jip2pError(f"{what} weights file {path} is unreadable: {e.strerror}") from None


def _read_json(path: str, what: str):
  try:
    with open(path) as f:
      return json.load(f)
  except OSError as e:
    raise Jip2pError(f"{what} config {path} is unreadable: {e.strerror}") from None
  except ValueError as e:
    raise Jip2pError(f"{what} config {path} is not JSON: {e}") from None


def check_files(weights: str, config: str | None) -> None:
  """Fails fast, before torch is imported, on a missing or unreadable weights or config file."""
  _check_readable(weights, "CLIP")
  if config is None:
    return
  cfg = _read_json(config, "CLIP")
  missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg")
             if not isinstance(cfg, dict) or k not in cfg]
  if missing:
    raise Jip2pError(f"CLIP config {config} is not an open_clip model config: missing {missing}")


def dino_config(weights: str, config: str | None) -> dict:
  """The DINO ViT's timm arguments (`DINO_VITS16` overridden by ``config``), checked before torch
  is imported; `Jip2pError` on a missing file or an unknown key."""
  _check_readable(weights, "DINO")
  if config is None:
    return dict(DINO_VITS16)
  cfg = _read_json(config, "DINO")
  if not isinstance(cfg, dict):
    raise Jip2pError(f"DINO config {config} must be a JSON object of {sorted(DINO_VITS16)}")
  unknown = sorted(set(cfg) - set(DINO_VITS16))
  if unknown:
    raise Jip2pError(f"DINO config {config} has unknown keys {unknown}; known: "
                     f"{sorted(DINO_VITS16)}")
  return {**DINO_VITS16, **cfg}


def load_failure(error: Exception) -> str:
  """Why a weights file did not load, in one line. torch's weights-only refusal is told without
  its advice to retry with ``weights_only=False``: that runs the file's code, never an option."""
  text = str(error).strip()
  if isinstance(error, pickle.UnpicklingError) and "WeightsUnpickler error:" in text:
    detail = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
    return ("not a file of weights (the weights-only unpickler refused it: "
            f"{' '.join(detail.split())}); jip2p never unpickles code")
  return f"{type(error).__name__}: {(text.splitlines() or [''])[0]}"


def _is_torchscript(path: str) -> bool:
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())


class Scorer:
  """An open_clip model with the reference's preprocessing; inputs and outputs are numpy."""

  def __init__(self, weights: str, *, model_name: str = DEFAULT_MODEL, config: str | None = None,
               device: str = "auto", precision: str = "fp32", batch_size: int = 32):
    check_files(weights, config)
    import open_clip
    import torch
    from open_clip.model import get_model_preprocess_cfg

    self.device = _torch_device(device)
    if config is not None:
      open_clip.add_model_config(config)
      model_name = os.path.splitext(os.path.basename(config))[0]
    try:
      if _is_torchscript(weights):
        model = open_clip.load_openai_model(weights, precision=precision, device=self.device)
        tokenizer = open_clip.SimpleTokenizer(context_length=model.context_length)
        model_name = f"openai:{os.path.basename(weights)}"
      else:
        if model_name not in open_clip.list_models():
          raise Jip2pError(f"unknown open_clip architecture {model_name!r}; give --clip-config "
                           f"for a custom one")
        model = open_clip.create_model(model_name, pretrained=weights, precision=precision,
                                       device=self.device, pretrained_image=False,
                                       pretrained_text=False)
        tokenizer = open_clip.get_tokenizer(model_name)
    except Jip2pError:
      raise
    except Exception as e:
      raise Jip2pError(f"cannot load CLIP weights {weights} as {model_name}: "
                       f"{load_failure(e)}") from None
    self.model = model.eval().requires_grad_(False)
    self.tokenizer = tokenizer
    self.model_name = model_name
    self.precision = precision
    self.batch_size = batch_size
    pre = get_model_preprocess_cfg(model)
    size = pre.get("size", model.visual.image_size)
    self.image_size = (size, size) if isinstance(size, int) else tuple(size)
    self.mean = torch.tensor(pre.get("mean", open_clip.OPENAI_DATASET_MEAN), device=self.device)
    self.std = torch.tensor(pre.get("std", open_clip.OPENAI_DATASET_STD), device=self.device)
    self.dtype = next(model.visual.parameters()).dtype
    self.embed_dim = getattr(model.visual, "output_dim", None)
    self.context_length = int(getattr(tokenizer, "context_length", 77))

  def encode_images(self, images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] (0..255) or float32 (0..1) → L2-normalised float32 features [N, D]."""
    return self._image_features(images).cpu().numpy()

  def encode_texts(self, texts) -> np.ndarray:
    """N strings → L2-normalised float32 features [N, D]; long texts are truncated."""
    return self._text_features(texts).cpu().numpy()

  def _image_features(self, images):
    import torch
    import torch.nn.functional as F
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
      raise Jip2pError(f"images must be [N>0, H, W, 3], got shape {list(images.shape)}")
    out = []
    with torch.inference_mode():
      for start in range(0, len(images), self.batch_size):
        chunk = torch.from_numpy(np.array(images[start:start + self.batch_size])).to(self.device)
        x = chunk.float() / 255.0 if chunk.dtype == torch.uint8 else chunk.float()
        x = x.permute(0, 3, 1, 2)
        x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False)
        x = (x - self.mean[:, None, None]) / self.std[:, None, None]
        f = self.model.encode_image(x.to(self.dtype)).float()
        out.append(f / f.norm(dim=-1, keepdim=True))
    return torch.cat(out)

  def _text_features(self, texts):
    import torch
    if not texts or not all(isinstance(t, str) for t in texts):
      raise Jip2pError("texts must be a non-empty list of strings")
    out = []
    with torch.inference_mode():
      for start in range(0, len(texts), self.batch_size):
        tokens = self.tokenizer(list(texts[start:start + self.batch_size])).to(self.device)
        f = self.model.encode_text(tokens).float()
        out.append(f / f.norm(dim=-1, keepdim=True))
    return torch.cat(out)

  def score(self, images0, images1, captions0, captions1) -> dict[str, np.ndarray]:
    """The four similarities of N pairs, float32 [N] each."""
    import torch.nn.functional as F
    n = len(images0)
    if images1.shape[0] != n or len(captions0) != n or len(captions1) != n:
      raise Jip2pError(f"a score request needs equal counts, got {n} / {images1.shape[0]} images "
                       f"and {len(captions0)} / {len(captions1)} captions")
    img0, img1 = self._image_features(images0), self._image_features(images1)
    txt = self._text_features(list(captions0) + list(captions1))
    txt0, txt1 = txt[:n], txt[n:]
    sims = {"sim_0": F.cosine_similarity(img0, txt0), "sim_1": F.cosine_similarity(img1, txt1),
            "sim_direction": F.cosine_similarity(img1 - img0, txt1 - txt0),
            "sim_image": F.cosine_similarity(img0, img1)}
    return {k: v.cpu().numpy().astype(np.float32) for k, v in sims.items()}


class DinoEncoder:
  """A DINO ViT (timm) with MagicBrush's preprocessing; inputs and outputs are numpy."""

  def __init__(self, weights: str, *, config: str | None = None, device: str = "auto",
               batch_size: int = 32):
    kwargs = dino_config(weights, config)
    import timm.models.vision_transformer as vit
    from torchvision import transforms

    self.device = _torch_device(device)
    try:
      model = vit.VisionTransformer(**kwargs, qkv_bias=True, num_classes=0)
    except (TypeError, ValueError, AssertionError) as e:
      raise Jip2pError(f"DINO config {config} does not describe a ViT: {e}") from None
    state = _dino_state_dict(weights)
    try:
      model.load_state_dict(state)
    except RuntimeError as e:
      lines = [l.strip() for l in str(e).splitlines() if l.strip()]
      raise Jip2pError(f"cannot load DINO weights {weights} into a ViT {kwargs}: "
                       f"{' '.join(lines[1:4])[:600]}") from None
    self.model = model.to(self.device).eval().requires_grad_(False)
    self.image_size = int(kwargs["img_size"])
    self.embed_dim = int(kwargs["embed_dim"])
    self.batch_size = batch_size
    self.name = os.path.basename(weights)
    self.transform = transforms.Compose([
        transforms.Resize(round(self.image_size * 8 / 7),
                          interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(self.image_size), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

  def encode_images(self, images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] (or float 0..1, rounded to uint8) → L2-normalised float32 [N, D]."""
    import torch
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
      raise Jip2pError(f"images must be [N>0, H, W, 3], got shape {list(images.shape)}")
    if images.dtype != np.uint8:
      images = np.clip(np.round(np.asarray(images, np.float32) * 255), 0, 255).astype(np.uint8)
    out = []
    with torch.inference_mode():
      for start in range(0, len(images), self.batch_size):
        x = torch.stack([self.transform(Image.fromarray(im))
                         for im in images[start:start + self.batch_size]]).to(self.device)
        f = self.model(x).float()
        out.append(f / f.norm(dim=-1, keepdim=True))
    return torch.cat(out).cpu().numpy()


def _torch_device(device: str):
  import torch
  if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
  try:
    return torch.device(device)
  except RuntimeError as e:
    raise Jip2pError(f"bad --device {device!r}: {e}") from None


def _dino_state_dict(weights: str) -> dict:
  """The backbone's tensors: a DINO training checkpoint's teacher, ``module.``/``backbone.``
  prefixes dropped, and the projection head (not part of the features) left out."""
  import torch
  try:
    if weights.endswith(".safetensors"):
      from safetensors.torch import load_file
      state = load_file(weights)
    else:
      state = torch.load(weights, map_location="cpu", weights_only=True)
  except Exception as e:
    raise Jip2pError(f"cannot read DINO weights {weights}: {load_failure(e)}") from None
  for key in ("teacher", "state_dict", "model"):
    if isinstance(state, dict) and isinstance(state.get(key), dict):
      state = state[key]
      break
  if not isinstance(state, dict):
    raise Jip2pError(f"DINO weights {weights} hold a {type(state).__name__}, not a state dict")
  out = {}
  for key, value in state.items():
    for prefix in ("module.", "backbone."):
      key = key.removeprefix(prefix)
    if not key.startswith("head."):
      out[key] = value
  return out


@dataclasses.dataclass
class Models:
  """What this sidecar serves: CLIP, DINO, or both."""
  clip: Scorer | None
  dino: DinoEncoder | None

  def ready(self) -> dict:
    clip, dino = self.clip, self.dino
    device = (clip or dino).device
    info = {"type": "ready", "version": protocol.VERSION, "device": str(device),
            "pid": os.getpid(), "model": None, "image_size": None, "embed_dim": None,
            "context_length": None, "precision": None, "dino": None}
    if clip is not None:
      info.update(model=clip.model_name, image_size=list(clip.image_size),
                  embed_dim=clip.embed_dim, context_length=clip.context_length,
                  precision=clip.precision)
    if dino is not None:
      info["dino"] = {"model": dino.name, "image_size": [dino.image_size] * 2,
                      "embed_dim": dino.embed_dim}
    return info


def handle(models: Models, header: dict, arrays: dict) -> dict:
  """One request → the arrays of its reply."""
  kind = header["type"]
  if kind == "encode_dino":
    if models.dino is None:
      raise Jip2pError("this sidecar has no DINO model (start it with --dino-weights)")
    return {"features": models.dino.encode_images(arrays["images"])}
  if kind not in ("score", "encode_images", "encode_texts"):
    raise Jip2pError(f"unknown request type {kind!r}")
  scorer = models.clip
  if scorer is None:
    raise Jip2pError(f"this sidecar has no CLIP model for {kind!r} (start it with --clip-weights)")
  if kind == "score":
    return scorer.score(arrays["images0"], arrays["images1"], header["captions0"],
                        header["captions1"])
  if kind == "encode_images":
    return {"features": scorer.encode_images(arrays["images"])}
  return {"features": scorer.encode_texts(header["texts"])}


def load_models(args: argparse.Namespace) -> Models:
  """The models the arguments name; `Jip2pError` naming the problem."""
  if args.batch_size < 1:
    raise Jip2pError(f"--batch-size must be ≥ 1, got {args.batch_size}")
  if args.clip_weights is None and args.dino_weights is None:
    raise Jip2pError("give --clip-weights, --dino-weights or both")
  if args.dino_config is not None and args.dino_weights is None:
    raise Jip2pError("--dino-config needs --dino-weights")
  if args.dino_weights is not None:
    dino_config(args.dino_weights, args.dino_config)  # fail fast, before any model loads
  clip = dino = None
  if args.clip_weights is not None:
    clip = Scorer(args.clip_weights, model_name=args.clip_model, config=args.clip_config,
                  device=args.device, precision=args.precision, batch_size=args.batch_size)
  if args.dino_weights is not None:
    dino = DinoEncoder(args.dino_weights, config=args.dino_config, device=args.device,
                       batch_size=args.batch_size)
  return Models(clip, dino)


def serve(args: argparse.Namespace, requests, replies) -> int:
  """Loads the models, says ``ready`` (or ``fatal``), then answers requests until EOF/shutdown."""
  try:
    models = load_models(args)
  except Jip2pError as e:
    protocol.write_message(replies, {"type": "fatal", "message": str(e)})
    return 2
  protocol.write_message(replies, models.ready())
  while True:
    message = protocol.read_message(requests)
    if message is None or message[0]["type"] == "shutdown":
      return 0
    header, arrays = message
    try:
      reply = handle(models, header, arrays)
    except Exception as e:  # A bad request (or a CUDA OOM) fails that request, not the sidecar.
      protocol.write_message(replies, {"type": "error", "id": header.get("id"),
                                       "message": f"{type(e).__name__}: {e}"})
      continue
    protocol.write_message(replies, {"type": "result", "id": header.get("id")}, reply)


def main(argv=None) -> int:
  args = parse_args(argv)
  # The protocol owns the real stdout; anything a library prints goes to stderr instead.
  replies = os.fdopen(os.dup(1), "wb")
  os.dup2(2, 1)
  sys.stdout = sys.stderr
  requests = sys.stdin.buffer
  try:
    return serve(args, requests, replies)
  except (BrokenPipeError, protocol.ProtocolError):
    return 1  # The client went away or closed mid-frame: nothing left to answer.


if __name__ == "__main__":
  sys.exit(main())
