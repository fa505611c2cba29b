"""Small parquet files in the Emu Edit test set's and MagicBrush's layouts (HF `Image` cells:
{bytes, path} structs), with images that say which row they are."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

EMU_TASKS = ("add", "background", "remove")


def png(colour: int, size: tuple[int, int] = (40, 32)) -> bytes:
  """A PNG of one grey level (width × height), so a decoded image names its source."""
  buf = io.BytesIO()
  Image.fromarray(np.full((size[1], size[0], 3), colour, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def _images(values):
  return pa.array([{"bytes": v, "path": None} for v in values],
                  pa.struct([("bytes", pa.binary()), ("path", pa.string())]))


def write_emu_edit(path: str, n: int = 5, first_idx: int = 0) -> None:
  """Row i: idx first_idx + i, image of level 10 + i, task EMU_TASKS[i % 3]."""
  table = pa.table({
      "instruction": [f"edit {i}" for i in range(n)],
      "image": _images([png(10 + i) for i in range(n)]),
      "task": [EMU_TASKS[i % 3] for i in range(n)],
      "split": ["test"] * n,
      "idx": list(range(first_idx, first_idx + n)),
      "hash": [f"h{i}" for i in range(n)],
      "input_caption": [f"a photo {i}" for i in range(n)],
      "output_caption": [f"an edited photo {i}" for i in range(n)],
  })
  pq.write_table(table, path, row_group_size=2)


def write_magicbrush(path: str) -> None:
  """Two sessions, rows shuffled: "7" with turns 1-3, "5" with turn 1. Source of (id, t) has
  level 10·t + int(id), its target 10·(t+1) + int(id): a session's target t is its source t+1."""
  rows = [("7", 2), ("5", 1), ("7", 1), ("7", 3)]
  table = pa.table({
      "img_id": [r[0] for r in rows],
      "turn_index": pa.array([r[1] for r in rows], pa.int32()),
      "source_img": _images([png(10 * t + int(i), (32, 32)) for i, t in rows]),
      "mask_img": _images([png(0, (32, 32)) for _ in rows]),
      "instruction": [f"do {i}/{t}" for i, t in rows],
      "target_img": _images([png(10 * (t + 1) + int(i), (32, 32)) for i, t in rows]),
  })
  pq.write_table(table, path, row_group_size=3)


MAGICBRUSH_CAPTIONS = {
    "7": {"7-input.png": "seven before", "7-output1.png": "seven after one",
          "7-output2.png": "seven after two", "7-output3.png": "seven after three"},
    "5": {"5-input.png": "five before", "5-output1.png": "five after"},
}
