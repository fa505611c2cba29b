"""Checkpoint formats: diffusers folders (read/write, no torch), single-file conversion (in a torch
child process), IP2P's conv_in expansion, and random pipelines of the presets."""

from jip2p.checkpoints.conv_in import expand_conv_in
from jip2p.checkpoints.convert import convert_single_file, open_clip_text_folder
from jip2p.checkpoints.folders import (SAVE_DTYPES, Pipeline, build_component, check_save_dtype,
                                       load_component, load_pipeline, load_text_encoder,
                                       load_vae, random_init, save_component, save_pipeline)
from jip2p.checkpoints.mapping import load_torch_state_dict, to_torch_state_dict
from jip2p.checkpoints.presets import (PRESETS, create_random_pipeline, preset_configs,
                                       random_pipeline)

__all__ = [
    "PRESETS", "SAVE_DTYPES", "Pipeline", "build_component", "check_save_dtype",
    "convert_single_file", "create_random_pipeline", "expand_conv_in", "load_component",
    "load_pipeline", "load_text_encoder", "load_torch_state_dict", "load_vae",
    "open_clip_text_folder", "preset_configs", "random_init", "random_pipeline",
    "save_component", "save_pipeline", "to_torch_state_dict",
]
