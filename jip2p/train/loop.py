"""The InstructPix2Pix training loop, top to bottom: config, mesh, model, input, optimizer and
sharding, step, checkpoint, evals, loop, export.

Every process runs this same code. Process 0 alone writes logs, the saved config and exports;
checkpoints are written by all processes together (each its shards). A run resumes from the latest
checkpoint in its work directory, and on SIGTERM or a preemption notice it saves and returns.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image

from jip2p import grids
from jip2p.diffusion import schedules
from jip2p.errors import ConfigError, Jip2pError
from jip2p.train import checkpointing, evaluate, export, metrics, sharding
from jip2p.train import config as config_lib
from jip2p.train import input as input_lib
from jip2p.train import step as step_lib


class Preemption:
  """Whether to save and stop now: on SIGTERM (one process) or at JAX's preemption sync point.

  With several processes the signal is JAX's to handle: its preemption service agrees on one step
  at which every process saves, so that no process waits alone in a collective.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())

  def reached(self, step: int) -> bool:
    if self._event.is_set():
      return True
    return jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step)

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def _replicate(tree, mesh):
  """Host arrays that are equal on every process → replicated global arrays."""
  spec = sharding.replicated(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(np.shape(x), spec, lambda i: np.asarray(x)[i]), tree)


def _gather_json(value: Any) -> list[Any]:
  """Every process's JSON-able ``value``, in process order, on every process."""
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([data.size], np.int32)).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  rows = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, sizes)]


def _own_position(positions: list[Any]) -> Any:
  """This process's entry of the data positions a checkpoint holds (one per process)."""
  if len(positions) == jax.process_count():
    return positions[jax.process_index()]
  if all(p == positions[0] for p in positions):
    return positions[0]
  raise ConfigError(f"the checkpoint was written by {len(positions)} processes, each reading its "
                    f"own part of the data; resume with {len(positions)} processes, not "
                    f"{jax.process_count()}")


def _check_cache(info, config: ml_collections.ConfigDict, vae_config, null_ids: np.ndarray,
                 null_text: jax.Array) -> None:
  """A latent cache must come from this run's VAE (and text encoder) at ``config.data.res``."""
  res, f = config.data.res, vae_config.downscale
  want = {"resolution": (info.resolution, res),
          "VAE scaling factor": (info.scaling_factor, vae_config.scaling_factor),
          "latent shape": (info.latent_shape, (res // f, res // f, vae_config.latent_channels)),
          f"text shape ({info.text})": (info.text_shape, (null_ids if info.text == "ids" else
                                                          null_text).shape[1:])}
  wrong = [f"{name} {got} (this run: {expected})" for name, (got, expected) in want.items()
           if got != expected]
  if wrong:
    raise ConfigError(f"the latent cache {config.data.path} does not fit this run's model "
                      f"({config.model.init}) at config.data.res={res}: its {'; '.join(wrong)}. "
                      "Write the cache with this model and resolution (jip2p-cache-latents "
                      "--model … --resolution …)")


def _json_append(path: epath.Path, record: dict) -> None:
  with path.open("a") as f:
    f.write(json.dumps(record) + "\n")


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in ``workdir``; returns ``{"step", "loss", "preempted"}``."""
  # ------------------------------------------------------------------ config
  config_lib.validate(config)
  num_devices, process_count = jax.device_count(), jax.process_count()
  primary = jax.process_index() == 0
  data_size, fsdp_size = config_lib.mesh_shape(config, num_devices, process_count)
  workdir_path = epath.Path(workdir)
  if primary:
    export.write_config(config, workdir)
  writer = metrics.MetricWriter(str(workdir_path / "tensorboard"), enabled=primary)
  # A JSON line per log step, for scripts and tests (local work directories only: gs:// objects
  # cannot be appended to; TensorBoard has the same numbers).
  jsonl = workdir_path / "metrics.jsonl" if primary and "://" not in workdir else None

  # ------------------------------------------------------------------ mesh
  mesh = sharding.make_mesh(data_size, fsdp_size)
  writer.text(f"{process_count} process(es), {num_devices} device(s) "
              f"({jax.devices()[0].device_kind}); mesh data={data_size} fsdp={fsdp_size}")

  # ------------------------------------------------------------------ model
  pipeline = export.build_pipeline(config)
  factor = pipeline.vae.config.downscale * 2 ** (pipeline.unet.config.num_blocks - 1)
  if config.data.res % factor:
    raise ConfigError(f"config.data.res={config.data.res} must be a multiple of {factor} for "
                      "this model (VAE downscale × UNet downsampling)")
  unet_def, params, other = nnx.split(pipeline.unet, nnx.Param, ...)
  if jax.tree.leaves(other):
    raise ConfigError("the UNet holds state other than parameters, which training cannot carry")
  vae_def, vae_state = nnx.split(pipeline.vae)
  text_def, text_state = nnx.split(pipeline.text_encoder)
  null_ids = np.asarray(pipeline.tokenizer([""]), np.int32)
  null_text = jax.jit(lambda state, ids: nnx.merge(text_def, state)(ids))(text_state, null_ids)
  # The real frozen models: validation sampling (and the train step, from images).
  frozen_host = {"vae": vae_state, "text_encoder": text_state, "null_text": null_text}
  pipeline = dataclasses.replace(pipeline, unet=None)
  scheduler = schedules.from_scheduler_config(pipeline.scheduler_config)
  alphas_cumprod = scheduler.alphas_cumprod()
  scaling = pipeline.vae.config.scaling_factor

  # ------------------------------------------------------------------ input
  source = input_lib.make_source(config, tokenizer=pipeline.tokenizer,
                                 process_index=jax.process_index(), process_count=process_count)
  batch_sharding = sharding.batch_sharding(mesh)
  micro = config.batch_size // config.grad_accum
  res = config.data.res
  if config.data.latents:
    from jip2p.data import latents  # TensorFlow: only a run from a cache imports it.
    _check_cache(source.info, config, pipeline.vae.config, null_ids, null_text)
    # The step's VAE and text encoder: stand-ins that turn the cached moments into the posterior
    # and pass cached embeddings through (token ids still go through the real text encoder).
    step_vae_def, step_vae_state = nnx.split(latents.CachedVAE(pipeline.vae.config))
    step_text_def, step_text_state = (nnx.split(latents.PrecomputedText())
                                      if source.info.text == "embeddings" else
                                      (text_def, text_state))
    step_frozen_host = {"vae": step_vae_state, "text_encoder": step_text_state,
                        "null_text": null_text}
    micro_shapes = latents.latent_batch_shapes(source.info, micro)
  else:
    step_vae_def, step_text_def, step_frozen_host = vae_def, text_def, frozen_host
    micro_shapes = {"input": jax.ShapeDtypeStruct((micro, res, res, 3), jnp.float32),
                    "edited": jax.ShapeDtypeStruct((micro, res, res, 3), jnp.float32),
                    "input_ids": jax.ShapeDtypeStruct((micro, 77), jnp.int32)}

  def global_batch(local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(batch_sharding, v)
            for k, v in local.items()}

  # ------------------------------------------------------------------ optimizer and sharding
  o = config.optimizer
  optimizer = step_lib.make_optimizer(o.lr, b1=o.b1, b2=o.b2, eps=o.eps,
                                      weight_decay=o.weight_decay,
                                      grad_clip_norm=o.grad_clip_norm)
  init_fn = lambda p: step_lib.init_state(p, optimizer, config.seed)
  abstract_state = jax.eval_shape(init_fn, params)
  state_shardings = sharding.tree_shardings(abstract_state, mesh,
                                            min_size=config.sharding.min_fsdp_size)
  frozen_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), frozen_host)
  frozen = jax.device_put(frozen_host, frozen_shardings)
  step_frozen_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), step_frozen_host)
  step_frozen = (frozen if step_frozen_host is frozen_host else
                 jax.device_put(step_frozen_host, step_frozen_shardings))
  del frozen_host, step_frozen_host, vae_state, text_state

  # ------------------------------------------------------------------ step
  loss_fn = step_lib.make_loss_fn(unet_def, step_vae_def, step_text_def,
                                  alphas_cumprod=alphas_cumprod, scaling_factor=scaling,
                                  dropout=config.conditioning_dropout,
                                  prediction_type=scheduler.prediction_type)
  train_step = jax.jit(
      step_lib.make_train_step(loss_fn, optimizer, mesh=mesh, grad_accum=config.grad_accum,
                               ema_decay_rate=config.ema.decay, ema_warmup=config.ema.warmup,
                               lr=o.lr),
      in_shardings=(state_shardings, step_frozen_shardings, batch_sharding),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,))

  # ------------------------------------------------------------------ checkpoint
  c = config.checkpoint
  checkpointer = checkpointing.Checkpointer(workdir, every_steps=c.every_steps, keep=c.keep,
                                            keep_every=c.keep_every, async_save=c.async_save)
  if checkpointer.latest_step() is not None:
    state, positions = checkpointer.restore(_abstract(abstract_state, state_shardings))
    source.set_position(_own_position(positions))
    writer.text(f"resumed from the checkpoint of step {int(state.step)}")
  else:
    params = jax.device_put(params, state_shardings.params)
    state = jax.jit(init_fn, out_shardings=state_shardings)(params)
  del params
  saved_step = int(state.step)

  # ------------------------------------------------------------------ evals
  e = config.eval
  edit_fn = jax.jit(
      evaluate.make_edit_fn(unet_def, vae_def, text_def, alphas_cumprod=alphas_cumprod,
                            num_steps=e.num_steps, scaling_factor=scaling,
                            text_scale=e.text_scale, image_scale=e.image_scale,
                            prediction_type=scheduler.prediction_type),
      in_shardings=(state_shardings.ema, frozen_shardings, sharding.replicated(mesh),
                    sharding.replicated(mesh)),
      out_shardings=sharding.replicated(mesh))
  eval_batch_host = None  # Read at the first evaluation: the same pairs on every process.
  eval_key = np.asarray(jax.random.key_data(jax.random.key(config.seed + 1)))

  def run_eval(step: int) -> None:
    nonlocal eval_batch_host
    if eval_batch_host is None:
      eval_batch_host = source.validation_batch(e.num_images)
    edited = edit_fn(state.ema, frozen, _replicate(eval_batch_host, mesh),
                     _replicate(eval_key, mesh))
    grid = grids.image_grid(zip(*map(grids.to_uint8, (
        eval_batch_host["input"], eval_batch_host["edited"], edited.addressable_data(0)))))
    writer.images(step, {"validation/input|target|ema_output": grid})
    if primary:
      folder = workdir_path / "samples"
      folder.mkdir(parents=True, exist_ok=True)
      with (folder / f"step_{step:08d}.png").open("wb") as f:
        Image.fromarray(grid).save(f, format="PNG")

  # ------------------------------------------------------------------ loop
  flops_per_step = 0.0
  peak = metrics.peak_flops(jax.devices()[0].device_kind, config.metrics.peak_flops_per_device)
  preemption = Preemption()
  unchecked: list[tuple[int, dict[str, jax.Array]]] = []  # Steps whose loss is not yet read.
  to_log: list[dict[str, jax.Array]] = []
  skipped = 0
  last: dict[str, float] = {}
  stopwatch = metrics.Stopwatch()
  start = int(state.step)
  writer.text(f"training steps {start + 1}..{config.total_steps} of {config.batch_size} examples")

  def check_until(step: int) -> None:
    """Reads the finite flag of every step ≤ ``step``: stops (or counts a skip) on a bad one."""
    nonlocal skipped
    while unchecked and unchecked[0][0] <= step:
      s, m = unchecked.pop(0)
      if bool(m["finite"]):
        continue
      if config.nonfinite == "skip":
        skipped += 1
        writer.text(f"step {s}: non-finite loss ({float(m['loss'])}), update skipped")
        continue
      kept = (f"the last good checkpoint is step {saved_step} in {checkpointer.directory}"
              if saved_step else "no checkpoint was saved")
      raise Jip2pError(
          f"non-finite loss at step {s} (loss={float(m['loss'])}, grad norm="
          f"{float(m['grad_norm'])}); {kept}. Check the model weights and data, lower "
          "config.optimizer.lr or set config.optimizer.grad_clip_norm; "
          "config.nonfinite='skip' skips such steps instead")

  def log(step: int) -> None:
    nonlocal last, flops_per_step
    check_until(step)
    values = jax.device_get(to_log)
    to_log.clear()
    seconds, steps = stopwatch.lap()
    if primary and not flops_per_step:
      shapes = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
      flops_per_step = config.grad_accum * metrics.cost_flops(
          jax.value_and_grad(loss_fn), shapes(state.params), shapes(step_frozen), micro_shapes,
          jax.random.key(0))
    last = {k: float(np.mean([m[k] for m in values])) for k in ("loss", "grad_norm", "lr")}
    record = dict(last, ema_decay=float(values[-1]["ema_decay"]), skipped_steps=skipped)
    if steps:  # None to time right after the first step (its time is mostly compilation).
      record.update(metrics.throughput(
          examples=config.batch_size * steps, steps=steps, seconds=seconds,
          flops_per_step=flops_per_step, num_devices=num_devices, peak=peak))
    writer.scalars(step, record)
    if jsonl is not None:
      _json_append(jsonl, {"step": step, **record})

  def save(step: int, *, force: bool) -> None:
    nonlocal saved_step
    check_until(step)
    if checkpointer.save(state, _gather_json(source.get_position()), force=force):
      saved_step = step

  preempted = False
  step = start
  try:
    for step in range(start + 1, config.total_steps + 1):
      state, step_metrics = train_step(state, step_frozen, global_batch(next(source)))
      unchecked.append((step, step_metrics))
      to_log.append(step_metrics)
      stopwatch.tick()
      check_until(step - 1)  # The previous step's loss, read while this step runs.
      if step == start + 1:
        stopwatch.lap()  # The first step's time is mostly compilation.
      if step % config.log_every_steps == 0 or step == config.total_steps:
        log(step)
      preempted = preemption.reached(step)
      if preempted or step == config.total_steps or step % c.every_steps == 0:
        save(step, force=preempted or step == config.total_steps)
      if preempted:
        writer.text(f"preempted: saved step {step}, exiting")
        break
      if e.every_steps and step % e.every_steps == 0:
        run_eval(step)
    checkpointer.wait()
    if not preempted and step == config.total_steps:
      for which in filter(None, config.export.at_end.split(",")):
        params = multihost_utils.process_allgather(
            state.ema if which == "ema" else state.params, tiled=True)
        if primary:
          out = str(workdir_path / "export" / which)
          export.save_trained(pipeline, unet_def, params, out, overwrite=True)
          writer.text(f"exported {which} weights to {out}")
  finally:
    preemption.close()
    checkpointer.close()
    writer.close()
  return {"step": step, "loss": last.get("loss"), "preempted": preempted}
