"""The CLIP filter on a hand-made score table: each threshold, the sort, top k, ties, bad input."""

import numpy as np
import pytest

from jip2p.errors import ConfigError, InputError
from jip2p.p2p.filter import FilterConfig, passes, select

# candidate: sim_0, sim_1, sim_direction, sim_image, and why it passes or fails the defaults
TABLE = [
    (0.30, 0.30, 0.25, 0.80),  # 0 passes
    (0.30, 0.30, 0.40, 0.74),  # 1 sim_image below 0.75
    (0.30, 0.30, 0.19, 0.90),  # 2 sim_direction below 0.2
    (0.19, 0.30, 0.50, 0.90),  # 3 sim_0 below 0.2
    (0.30, 0.19, 0.50, 0.90),  # 4 sim_1 below 0.2
    (0.20, 0.20, 0.20, 0.75),  # 5 passes: every bound is inclusive
    (0.30, 0.30, 0.60, 0.95),  # 6 passes
    (0.30, 0.30, 0.25, 0.99),  # 7 passes, ties with 0 on direction
    (0.30, 0.30, np.nan, 0.9),  # 8 NaN fails
    (0.30, 0.30, 0.45, 0.85),  # 9 passes
]


def scores(rows=TABLE, dtype=np.float32):
  cols = np.array(rows, dtype=dtype).T
  return dict(zip(("sim_0", "sim_1", "sim_direction", "sim_image"), cols))


def test_defaults_are_the_papers():
  c = FilterConfig()
  assert (c.min_sim_image, c.min_sim_direction, c.min_sim_0, c.min_sim_1, c.top_k) == (
      0.75, 0.2, 0.2, 0.2, 4)


def test_thresholds():
  np.testing.assert_array_equal(np.flatnonzero(passes(scores())), [0, 5, 6, 7, 9])


def test_select_sorts_by_direction_and_keeps_top_k():
  assert select(scores()).tolist() == [6, 9, 0, 7]  # 0 before 7: equal direction, earlier first
  assert select(scores(), FilterConfig(top_k=None)).tolist() == [6, 9, 0, 7, 5]
  assert select(scores(), FilterConfig(top_k=1)).tolist() == [6]
  assert select(scores(dtype=np.float64)).dtype == np.int64


def test_changed_thresholds():
  loose = FilterConfig(min_sim_image=0.7, min_sim_0=0.1, min_sim_1=0.1, top_k=None)
  assert select(scores(), loose).tolist() == [6, 3, 4, 9, 1, 0, 7, 5]
  strict = FilterConfig(min_sim_direction=0.3)
  assert select(scores(), strict).tolist() == [6, 9]


def test_nothing_passes():
  out = select(scores(TABLE[1:5]))
  assert out.shape == (0,) and out.dtype == np.int64


def test_bad_inputs():
  with pytest.raises(ConfigError, match="top_k"):
    FilterConfig(top_k=0)
  s = scores()
  del s["sim_image"]
  with pytest.raises(InputError, match="sim_image"):
    select(s)
  s = scores()
  s["sim_0"] = s["sim_0"][:3]
  with pytest.raises(InputError, match="one length"):
    select(s)
