"""Small triplet datasets for the data tests, built so that misalignment shows.

Example i: the input image's red channel is seeded noise, green rises with x and blue with y; the
edited image is its negative (255 - input). Linear resizing, cropping and flipping commute with
that negation, so a correctly paired augmentation gives edited == -input exactly (in [-1, 1]);
a crop or flip applied differently breaks it everywhere because of the noise. The gradients show
which way each output was flipped and by how much it was scaled. The instruction is
"example {i}", so every output can be traced back to its record.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from jip2p.data import schema


def pattern(i: int, height: int, width: int) -> np.ndarray:
  """uint8 [height, width, 3]: noise seeded by i, an x ramp and a y ramp."""
  rng = np.random.default_rng(i)
  out = np.empty((height, width, 3), np.uint8)
  out[..., 0] = rng.integers(0, 256, (height, width))
  out[..., 1] = np.round(np.linspace(0, 255, width))[None, :]
  out[..., 2] = np.round(np.linspace(0, 255, height))[:, None]
  return out


def encode(array: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, "PNG" if fmt == "png" else "JPEG", quality=quality)
  return buf.getvalue()


def triplet(i: int, size: int = 64, fmt: str = "png", **fields) -> schema.Triplet:
  """Example i with every provenance field set to a value derived from i."""
  image = pattern(i, size, size)
  values = dict(
      input_image=encode(image, fmt), edited_image=encode(255 - image, fmt),
      instruction=f"example {i}", input_caption=f"a photo number {i}",
      edited_caption=f"a negative of photo number {i}", source="fixture", source_id=f"id-{i}",
      prompt_index=i, seed=1000 + i, turn_index=i % 3, p2p_threshold=0.1 + i / 1000,
      cfg_scale=7.5 + i / 100, clip_sim_0=0.2 + i / 1e4, clip_sim_1=0.3, clip_sim_direction=0.25,
      clip_sim_image=math.nan if i % 2 else 0.8)
  values.update(fields)
  return schema.Triplet(**values)


def example_ids(instructions) -> list[int]:
  return [int(t.split()[-1]) for t in instructions]
