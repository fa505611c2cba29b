"""Paired image generation for InstructPix2Pix datasets: attention control and sampling.

  control.py   InstructPix2Pix's self-attention sharing, Prompt-to-Prompt's Replace / Refine /
               Reweight, LocalBlend and the attention store, as pure functions of traced arrays
  align.py     host-side token alignment of a caption and its edit (word swap, Needleman–Wunsch)
  sampling.py  `PairGenerator` / `generate_pairs`: K candidate pairs in one jitted program;
               `show_attention`: per-token cross-attention heat maps of a prompt
  filter.py    the CLIP filter: thresholds, then the best pairs by direction
  dataset.py   the resumable driver behind ``jip2p-generate``: prompts → filtered triplets
  generation_config.py  the generation config schema (`base_config`, `validate`), as training's
"""
