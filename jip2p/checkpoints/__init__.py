"""Checkpoint formats: diffusers folders (read/write, no torch), single files, orbax state.

Names are imported on first use, so that `load_torch_state_dict` needs none of the model modules.
"""

import importlib

_HOME = {
    "expand_conv_in": "conv_in", "convert_single_file": "convert",
    "Pipeline": "folders", "build_component": "folders", "load_component": "folders",
    "load_pipeline": "folders", "random_init": "folders", "save_component": "folders",
    "save_pipeline": "folders", "SAVE_DTYPES": "folders", "check_save_dtype": "folders",
    "load_torch_state_dict": "mapping", "to_torch_state_dict": "mapping",
    "PRESETS": "presets", "create_random_pipeline": "presets", "preset_configs": "presets",
    "random_pipeline": "presets",
    "restore_state": "state", "save_state": "state",
}
__all__ = sorted(_HOME)


def __getattr__(name):
  if name not in _HOME:
    raise AttributeError(f"module 'jip2p.checkpoints' has no attribute {name!r}")
  return getattr(importlib.import_module(f"jip2p.checkpoints.{_HOME[name]}"), name)
