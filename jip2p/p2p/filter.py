"""The CLIP filter of InstructPix2Pix's generated pairs: thresholds, then the best by direction.

A candidate pair is kept when sim_image ≥ 0.75, sim_direction ≥ 0.2, sim_0 ≥ 0.2 and
sim_1 ≥ 0.2 (the paper's values; the original code defaulted sim_image to 0.7); the survivors are
sorted by sim_direction, highest first, and the top k (4) are kept. Pure numpy over the score
table of one prompt's candidates, so a run's recorded scores can be refiltered with other
thresholds later without generating anything again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from jip2p.errors import ConfigError, InputError
from jip2p.sidecar.protocol import SCORE_KEYS


@dataclasses.dataclass(frozen=True)
class FilterConfig:
  """Inclusive lower bounds on each CLIP score, and how many pairs to keep per prompt.

  top_k=None keeps every pair that passes.
  """

  min_sim_image: float = 0.75
  min_sim_direction: float = 0.2
  min_sim_0: float = 0.2
  min_sim_1: float = 0.2
  top_k: int | None = 4

  def __post_init__(self):
    if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                   or self.top_k < 1):
      raise ConfigError(f"filter top_k must be a positive integer or None, got {self.top_k!r}")


def passes(scores: Mapping[str, np.ndarray], config: FilterConfig = FilterConfig()) -> np.ndarray:
  """bool [N]: which candidates meet every threshold (a NaN score never does)."""
  s = score_table(scores)
  return ((s["sim_image"] >= config.min_sim_image)
          & (s["sim_direction"] >= config.min_sim_direction)
          & (s["sim_0"] >= config.min_sim_0) & (s["sim_1"] >= config.min_sim_1))


def select(scores: Mapping[str, np.ndarray], config: FilterConfig = FilterConfig()) -> np.ndarray:
  """int64 [≤ top_k]: indices of the kept candidates, best sim_direction first.

  scores: sim_0, sim_1, sim_direction, sim_image, each [N] for the N candidates of one prompt.
  Ties keep candidate order, so the choice is deterministic.
  """
  keep = np.flatnonzero(passes(scores, config))
  direction = score_table(scores)["sim_direction"][keep]
  order = keep[np.argsort(-direction, kind="stable")]
  return order[:config.top_k].astype(np.int64)


def score_table(scores: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The four scores as float64 [N] arrays; `InputError` when one is missing or they differ in
  shape."""
  missing = [k for k in SCORE_KEYS if k not in scores]
  if missing:
    raise InputError(f"CLIP scores lack {missing} (have {sorted(scores)})")
  table = {k: np.asarray(scores[k], dtype=np.float64) for k in SCORE_KEYS}
  shapes = {k: v.shape for k, v in table.items()}
  if len(set(shapes.values())) != 1 or table["sim_0"].ndim != 1:
    raise InputError(f"CLIP scores must be four [N] arrays of one length, got shapes {shapes}")
  return table
