"""`jip2p-bench`: jip2p (JAX) and the PyTorch stack a user would otherwise run, side by side.

  cases.py       what is measured: the case names, their shapes, the FLOP and timing definitions
  timing.py      medians of device-synchronised runs, warm-up excluded (no JAX or torch import)
  jax_side.py    one case on the JAX side, in its own process: prints one JSON line
  torch_side.py  one case on the PyTorch side (diffusers), in its own process: prints JSON lines
  report.py      the side-by-side markdown table and the JSON document
  memory.py      `jip2p-bench --memory`: per-device bytes of a config's compiled train step, by
                 micro-batch, remat and FSDP size, and what fits which chip (no device used)

Every (side, case, variant) runs in a fresh process, so peak device memory and first-step
(compile) time are the case's own, and TensorFlow, PyTorch and JAX never share a process.
"""
