"""`jip2p.grids`: the one image grid (training samples, the demo's edit grid) and its tiles."""

import numpy as np

from jip2p import grids


def test_to_uint8_maps_the_model_range_and_clips():
  x = np.array([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0], np.float32)
  assert grids.to_uint8(x).tolist() == [0, 0, 128, 191, 255, 255]
  assert grids.to_uint8(x).dtype == np.uint8


def test_rows_of_tiles_stack_with_white_gaps():
  rng = np.random.default_rng(0)
  a, b, c, d = (rng.integers(0, 255, (4, 5, 3), dtype=np.uint8) for _ in range(4))
  wide = rng.integers(0, 255, (3, 10, 3), dtype=np.uint8)
  grid = grids.image_grid([[a, b], [wide], [c, d]], gap=2)
  assert grid.shape == (4 + 2 + 3 + 2 + 4, 10, 3) and grid.dtype == np.uint8
  np.testing.assert_array_equal(grid[:4, :5], a)
  np.testing.assert_array_equal(grid[:4, 5:], b)
  assert (grid[4:6] == 255).all() and (grid[9:11] == 255).all()
  np.testing.assert_array_equal(grid[6:9], wide)
  np.testing.assert_array_equal(grid[11:, 5:], d)
  # Without a gap (the training samples): rows touch; zip of per-column batches makes the rows.
  batch = rng.integers(0, 255, (3, 2, 4, 5, 3), dtype=np.uint8)
  grid = grids.image_grid(zip(*batch))
  assert grid.shape == (2 * 4, 3 * 5, 3)
  np.testing.assert_array_equal(grid[4:, 5:10], batch[1, 1])


def test_upscale_repeats_pixels_and_text_tiles_wrap():
  image = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
  big = grids.upscale(image, 3)
  assert big.shape == (6, 6, 3) and (big[3:6, 0:3] == image[1, 0]).all()
  short, long = grids.text_tile("edit", 60, 40), grids.text_tile("make the big circle red " * 3,
                                                                   60, 40)
  assert short.shape == long.shape == (40, 60, 3)
  ink = lambda tile: (tile < 128).any(axis=(1, 2)).sum()  # rows holding text
  assert 0 < ink(short) < ink(long)
