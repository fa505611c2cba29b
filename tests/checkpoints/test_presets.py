"""The presets' random-initialisation choices (jip2p.checkpoints.presets.RANDOM_INIT)."""

import numpy as np
from flax import nnx

from jip2p import checkpoints


def _embedding_stds(text_encoder) -> dict[str, float]:
  return {str(path[-2]): float(np.std(var.get_value())) for path, var in
          nnx.to_flat_state(nnx.state(text_encoder, nnx.Param)) if path[-1] == "embedding"}


def test_world_text_encoder_has_unit_token_embeddings():
  std = _embedding_stds(checkpoints.random_pipeline("world", unet_in_channels=3).text_encoder)
  assert abs(std["token_embedding"] - 1.0) < 0.01 and abs(std["position_embedding"] - 0.02) < 0.001
  # Other presets keep transformers' CLIP initialisation.
  std = _embedding_stds(checkpoints.random_pipeline("tiny").text_encoder)
  assert abs(std["token_embedding"] - 0.02) < 0.001
