"""Process-wide JAX settings for fast runs: XLA flags and the persistent compilation cache.

Call `configure` at the start of a program, before JAX touches a device: XLA reads ``XLA_FLAGS``
once, when its backend starts. Both settings are opt-out:

  * ``TUNED_FLAGS`` are appended to ``XLA_FLAGS`` (flags the user already set win). XLA parses
    them on every backend; the GPU ones are read by the GPU compiler only, the CPU one by the CPU
    compiler only.
  * The persistent compilation cache stores compiled programs (and, on GPU, autotuning results)
    on disk, so a second start of the same program loads instead of compiling. Default folder:
    ``$JIP2P_COMPILATION_CACHE``, else JAX's own ``$JAX_COMPILATION_CACHE_DIR`` (the launch
    scripts set it), else ``~/.cache/jip2p/jax``. A gs:// path works too (JAX reads it through
    etils.epath): on a TPU VM, whose disk dies with it, that keeps the cache across preemptions.
    JAX's ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` and ``…_MIN_ENTRY_SIZE_BYTES``, when set,
    win over the defaults here.
"""

from __future__ import annotations

import os

# Candidates from the JAX GPU performance notes; `jip2p-bench --xla-flags none|tuned` measures them
# (bench/RESULTS.md). Latency-hiding scheduling and a high-priority async stream overlap transfers
# and collectives with compute; double-buffered while loops overlap a sampler scan's iterations;
# cuDNN layer norm fuses the transformer blocks' LayerNorms.
GPU_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
    "--xla_gpu_enable_cudnn_layer_norm=true",
)
# XLA:CPU's default scheduler, tuned for running independent operations at once, computes what
# depends on the weights alone (the reversed and transposed convolution kernels of the backward
# pass) early and holds it through the forward pass: at SD 1.5 shapes the train step's temporaries
# were 5.2 GiB with it and 3.3 GiB (the gradients) with the memory-minimising scheduler
# (bench/RESULTS.md) — the difference between the step fitting a 24 GB machine or not.
CPU_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)
TUNED_FLAGS = GPU_FLAGS + CPU_FLAGS
CACHE_ENV = "JIP2P_COMPILATION_CACHE"


def default_cache_dir() -> str:
  return (os.environ.get(CACHE_ENV) or os.environ.get("JAX_COMPILATION_CACHE_DIR")
          or os.path.join(os.path.expanduser("~"), ".cache", "jip2p", "jax"))


def _unless_set(name: str, value) -> None:
  """``jax.config.update(name, value)`` unless the user set ``$NAME`` (JAX read it already)."""
  import jax

  if name.upper() not in os.environ:
    jax.config.update(name, value)


def with_flags(xla_flags: str, flags: tuple[str, ...]) -> str:
  """``xla_flags`` plus each of ``flags`` whose name it does not already set."""
  present = {f.split("=", 1)[0] for f in xla_flags.split()}
  extra = [f for f in flags if f.split("=", 1)[0] not in present]
  return " ".join(xla_flags.split() + extra)


def configure(*, xla_flags: bool = True, cache_dir: str | None = "",
              min_compile_seconds: float = 1.0) -> dict[str, str | None]:
  """Applies the settings; returns what is in effect (for logs and benchmark records).

  cache_dir: "" → `default_cache_dir()`; None → no persistent cache.
  min_compile_seconds: programs compiling faster than this are not stored.
  """
  import jax

  if xla_flags:
    os.environ["XLA_FLAGS"] = with_flags(os.environ.get("XLA_FLAGS", ""), TUNED_FLAGS)
  if cache_dir == "":
    cache_dir = default_cache_dir()
  if cache_dir is not None:
    if "://" not in cache_dir:
      os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    _unless_set("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    _unless_set("jax_persistent_cache_min_entry_size_bytes", 0)
  return {"xla_flags": os.environ.get("XLA_FLAGS", ""), "compilation_cache": cache_dir}
