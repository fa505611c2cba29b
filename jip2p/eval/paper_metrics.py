"""Edit metrics of the papers, from features and pixels; means with confidence intervals.

Pure numpy: the CLIP and DINO features come from the sidecar (`jip2p.sidecar.ClipScorer`:
``encode_images``, ``encode_texts``, ``encode_dino``), so this module runs in any process.

  InstructPix2Pix (Brooks et al. 2023)
    image similarity   cos(CLIP(input), CLIP(output))
    directional        cos(CLIP(output) − CLIP(input), CLIP(out caption) − CLIP(in caption))
  Emu Edit (Sheynin et al. 2023)
    CLIP-img, CLIP-dir the two above
    CLIP-out           cos(CLIP(output), CLIP(out caption))
    L1                 mean |output − input|, pixels in [0, 1]
    DINO               cos(DINO(input), DINO(output))
  MagicBrush (Zhang et al. 2023)
    L1, L2             mean |output − target|, mean squared difference
    CLIP-I, DINO       cos(·(output), ·(target))
    CLIP-T             cos(CLIP(output), CLIP(target caption))

Pixel distances follow MagicBrush's ``image_eval.py``: the output is resized (bicubic) to the
reference's size, both go to [0, 1], and L1 / L2 are ``nn.L1Loss`` / ``nn.MSELoss`` means over
pixels and channels. Cosines are of float64 vectors; a zero vector (the image direction of an
unchanged image) gives 0, as ``F.cosine_similarity`` does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image
from scipy import stats

from jip2p.errors import InputError

_EPS = 1e-8


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Row-wise cosine similarity of [N, D] arrays → float64 [N]."""
  a, b = _features(a, "a"), _features(b, "b")
  if a.shape != b.shape:
    raise InputError(f"features of shapes {a.shape} and {b.shape} cannot be compared row by row")
  norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
  return np.einsum("nd,nd->n", a, b) / np.maximum(norms, _EPS)


def clip_image_similarity(input_features: np.ndarray, output_features: np.ndarray) -> np.ndarray:
  """IP2P's image similarity, Emu Edit's CLIP-img (and MagicBrush's CLIP-I with the target
  in place of the input): cos of CLIP image features [N, D] → [N]."""
  return cosine(input_features, output_features)


def clip_directional_similarity(input_image: np.ndarray, output_image: np.ndarray,
                                input_text: np.ndarray, output_text: np.ndarray) -> np.ndarray:
  """IP2P's directional similarity (Emu Edit's CLIP-dir): does the image change the way the
  caption does? All [N, D] L2-normalised CLIP features (the sidecar's) → [N]."""
  image_change = _features(output_image, "output_image") - _features(input_image, "input_image")
  text_change = _features(output_text, "output_text") - _features(input_text, "input_text")
  return cosine(image_change, text_change)


def clip_text_similarity(image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
  """Emu Edit's CLIP-out, MagicBrush's CLIP-T: cos(CLIP(image), CLIP(caption)) → [N]."""
  return cosine(image_features, text_features)


def dino_similarity(features_a: np.ndarray, features_b: np.ndarray) -> np.ndarray:
  """Cosine of DINO ViT-S/16 class-token features [N, D] → [N]."""
  return cosine(features_a, features_b)


def resize_like(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """``image`` (uint8 [H, W, 3]) at ``reference``'s size, bicubic (as PIL's default resize)."""
  image = _pixels(image, "image")
  height, width = reference.shape[:2]
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def l1_distance(output: np.ndarray, reference: np.ndarray) -> float:
  """Mean absolute difference in [0, 1] units; ``output`` resized to ``reference``'s size."""
  diff = _difference(output, reference)
  return float(np.mean(np.abs(diff)))


def l2_distance(output: np.ndarray, reference: np.ndarray) -> float:
  """MagicBrush's "L2": the mean squared difference in [0, 1] units (``nn.MSELoss``)."""
  diff = _difference(output, reference)
  return float(np.mean(diff * diff))


def _difference(output: np.ndarray, reference: np.ndarray) -> np.ndarray:
  reference = _pixels(reference, "reference")
  output = resize_like(output, reference)
  return (output.astype(np.float64) - reference.astype(np.float64)) / 255.0


def _pixels(image, name: str) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise InputError(f"{name} must be a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
  return image


def _features(x, name: str) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise InputError(f"{name} must be features [N, D], got shape {x.shape}")
  return x


# ------------------------------------------------------------------------------ aggregation


@dataclasses.dataclass(frozen=True)
class Mean:
  """A mean with its two-sided confidence interval (Student's t; NaN bounds when n < 2)."""
  mean: float
  low: float
  high: float
  n: int


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> Mean:
  """The mean of the finite ``values`` (NaN marks "not applicable") with its t interval."""
  if not 0 < confidence < 1:
    raise InputError(f"confidence must be in (0, 1), got {confidence}")
  x = np.asarray(list(values), np.float64)
  x = x[np.isfinite(x)]
  n = len(x)
  if n == 0:
    return Mean(math.nan, math.nan, math.nan, 0)
  mean = float(x.mean())
  if n < 2:
    return Mean(mean, math.nan, math.nan, 1)
  half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
  return Mean(mean, mean - half, mean + half, n)


def summarize(rows: Sequence[dict], metrics: Sequence[str], *, group_key: str | None = None,
              confidence: float = 0.95) -> dict[str, dict[str, Mean]]:
  """{group: {metric: Mean}} over per-example rows: group "all", then one per value of
  ``group_key`` (sorted) when given. Rows lacking a metric count as not applicable."""
  groups = {"all": list(rows)}
  if group_key is not None:
    for value in sorted({str(r.get(group_key) or "") for r in rows} - {""}):
      groups[value] = [r for r in rows if str(r.get(group_key) or "") == value]
  return {g: {m: mean_ci((_number(r.get(m)) for r in rs), confidence) for m in metrics}
          for g, rs in groups.items()}


def _number(value) -> float:
  """A row's metric value; None (JSON's stand-in for NaN) and absent mean not applicable."""
  return math.nan if value is None else float(value)
