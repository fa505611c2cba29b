"""Growing the UNet's input convolution for image conditioning (InstructPix2Pix, docs/design.md §1).

The original keeps the first 4 input channels' weights, zeroes the new ones and keeps the bias, so
the expanded model starts out computing exactly what the text-to-image model did.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jip2p.checkpoints.mapping import load_torch_state_dict, to_torch_state_dict
from jip2p.errors import ConfigError
from jip2p.models.layers import abstract_module
from jip2p.models.unet import UNet2DCondition


def expand_conv_in(model: UNet2DCondition, in_channels: int = 8) -> UNet2DCondition:
  """A copy of ``model`` whose ``conv_in`` takes ``in_channels`` inputs (new channels zero)."""
  old = model.config.in_channels
  if in_channels < old:
    raise ConfigError(f"expand_conv_in: the UNet already has {old} input channels, more than the "
                      f"{in_channels} asked for")
  state = to_torch_state_dict(model)
  weight = state["conv_in.weight"]  # [out, in, kh, kw]
  grown = np.zeros((weight.shape[0], in_channels) + weight.shape[2:], weight.dtype)
  grown[:, :old] = weight
  state["conv_in.weight"] = grown
  config = dataclasses.replace(model.config, in_channels=in_channels)
  expanded = abstract_module(lambda rngs: UNet2DCondition(
      config, dtype=model.dtype, attention_impl=model.attention_impl, remat=model.remat,
      rngs=rngs))
  load_torch_state_dict(expanded, state, source="expand_conv_in")
  return expanded
