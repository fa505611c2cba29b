"""Multi-turn editing: a sequence of instructions, each applied to the previous output.

    images = edit_sequence(editor, "room.jpg", ["add a lamp", "make it night"], seed=3,
                           threshold=0.1)

Turn t is edited with seed ``seed + t``, so a sequence is reproducible and any turn can be redone
alone from its input. Outputs keep the edit size of the first turn (the editor's resize rule maps
a size that is already a multiple of 64 at the same resolution onto itself).

Sequential-edit thresholding (Emu Edit, Sheynin et al. 2023): small per-pixel changes that
repeated edits make everywhere (VAE round trips, noise) pile up over turns. After each turn the
per-pixel change ``d`` = mean over channels of |new − previous| (pixels in [0, 1]) is low-pass
filtered (a box of side ``2·radius + 1``), and where ``d < threshold`` the pixel keeps its
previous value, so only the regions an edit really changed move. The paper gives neither the
filter nor its α: choose ``threshold`` on a few sessions.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence

import numpy as np
from PIL import Image

from jip2p import edit
from jip2p.errors import ConfigError, InputError


def box_filter(x: np.ndarray, radius: int) -> np.ndarray:
  """Mean of x (float [H, W]) over (2r+1)² squares; the border is edge-padded."""
  if radius == 0:
    return x
  k = 2 * radius + 1
  padded = np.pad(x, radius, mode="edge")
  c = np.pad(np.cumsum(np.cumsum(padded, axis=0), axis=1), ((1, 0), (1, 0)))
  return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


def threshold_edit(previous: np.ndarray, edited: np.ndarray, threshold: float,
                   radius: int = 2) -> np.ndarray:
  """Emu Edit's thresholding of one turn: uint8 [H, W, 3] images of one size → uint8 [H, W, 3],
  ``edited`` where its filtered change reaches ``threshold``, else ``previous``."""
  if previous.shape != edited.shape or previous.dtype != np.uint8 or edited.dtype != np.uint8:
    raise InputError(f"thresholding needs two uint8 images of one shape, got {previous.dtype} "
                     f"{previous.shape} and {edited.dtype} {edited.shape}")
  _check_threshold(threshold, radius)
  change = np.abs(edited.astype(np.float64) - previous.astype(np.float64)).mean(-1) / 255.0
  keep_previous = box_filter(change, radius) < threshold
  return np.where(keep_previous[..., None], previous, edited)


def _check_threshold(threshold: float, radius: int) -> None:
  if not 0 <= threshold <= 1:
    raise ConfigError(f"the sequential-edit threshold must be in [0, 1], got {threshold}")
  if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
    raise ConfigError(f"the threshold filter radius must be an integer ≥ 0, got {radius!r}")


def edit_sequence(editor, image, instructions: Sequence[str], *, seed: int | None = None,
                  threshold: float | None = None, radius: int = 2, resolution: int | None = 512,
                  **edit_kwargs) -> list[Image.Image]:
  """Applies ``instructions`` in turn, each to the previous output; returns every turn's output.

  Args:
    editor: a `jip2p.edit.Editor` (anything with its call signature).
    image: the first turn's input: a file path, PIL image or uint8 array.
    seed: turn t uses ``seed + t``; random when None.
    threshold, radius: Emu Edit's sequential-edit thresholding (off when threshold is None).
    resolution, edit_kwargs: as `jip2p.edit.Editor.edits` (steps, text_guidance, …).
  """
  if isinstance(instructions, str) or not instructions:
    raise InputError("a multi-turn edit needs a non-empty list of instructions")
  if threshold is not None:
    _check_threshold(threshold, radius)
  if seed is None:
    seed = secrets.randbelow(edit.MAX_SEED - len(instructions) + 2)
  current = (edit.load_image(image) if isinstance(image, (str, os.PathLike))
             else edit.prepare_image(image))
  if resolution is not None:
    current = edit.preprocess(current, resolution)
  outputs = []
  for turn, instruction in enumerate(instructions):
    [result] = editor([current], [instruction], seed=seed + turn, resolution=resolution,
                      **edit_kwargs)
    if threshold is not None:
      result = Image.fromarray(threshold_edit(np.asarray(current), np.asarray(result), threshold,
                                              radius))
    outputs.append(result)
    current = result
  return outputs
