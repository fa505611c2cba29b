"""Image grids for figures: the training run's validation samples and the demo's edit grid.

Pure numpy (PIL only to draw text), so every layer can draw one. Tiles are uint8 [H, W, 3].
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WHITE = 255


def to_uint8(images) -> np.ndarray:
  """uint8 of images in the models' range [-1, 1] (rounded, clipped)."""
  x = np.asarray(images, np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def upscale(image: np.ndarray, scale: int) -> np.ndarray:
  """``image`` [H, W, C] enlarged ``scale``× by repeating pixels (small images stay crisp)."""
  return np.kron(image, np.ones((scale, scale, 1), image.dtype))


def text_tile(text: str, width: int, height: int) -> np.ndarray:
  """A white uint8 [height, width, 3] tile with ``text`` word-wrapped in PIL's default font,
  centred vertically."""
  tile = Image.new("RGB", (width, height), (WHITE,) * 3)
  draw = ImageDraw.Draw(tile)
  font = ImageFont.load_default()
  lines, line = [], ""
  for word in text.split():
    candidate = f"{line} {word}".strip()
    if draw.textlength(candidate, font=font) > width - 8 and line:
      lines.append(line)
      line = word
    else:
      line = candidate
  lines.append(line)
  y = max(2, (height - 12 * len(lines)) // 2)
  for line in lines:
    draw.text((4, y), line, fill=(0, 0, 0), font=font)
    y += 12
  return np.asarray(tile)


def image_grid(rows: Iterable[Sequence[np.ndarray]], *, gap: int = 0) -> np.ndarray:
  """uint8 [ΣH + gaps, W, 3]: each row's tiles side by side (same height within a row, the same
  total width in every row), rows stacked with ``gap`` white pixels between them."""
  rows = [np.concatenate(list(row), axis=1) for row in rows]
  spacer = np.full((gap, rows[0].shape[1], 3), WHITE, np.uint8)
  stacked = [rows[0]]
  for row in rows[1:]:
    stacked += [spacer, row]
  return np.concatenate(stacked, axis=0)
