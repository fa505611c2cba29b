"""The InstructPix2Pix training loop, top to bottom: config, mesh, model, input, optimizer,
sharding, step, checkpoint, work directory, evals, loop.

Every process runs this same code. Process 0 alone writes logs, the saved config and exports;
checkpoints are written by all processes together (each its shards). Nothing is written to the
work directory before the config, the model, the data and the checkpoint a run resumes from have
been checked. A run resumes from the latest checkpoint in its work directory, and on SIGTERM or a
preemption notice it saves and returns.
"""

from __future__ import annotations

import contextlib
import functools
import json
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from jip2p import edit, runtime, storage
from jip2p.diffusion import schedules
from jip2p.errors import ConfigError
from jip2p.train import checkpointing, distributed, evaluate, exporting, metrics, models
from jip2p.train import sharding
from jip2p.train import config as config_lib
from jip2p.train import input as input_lib
from jip2p.train import profiler as profiler_lib
from jip2p.train import step as step_lib


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def _global_batch(local: dict[str, np.ndarray], batch_sharding) -> dict[str, jax.Array]:
  """This process's part of a batch → global arrays split over the devices by example."""
  return jax.tree.map(lambda v: jax.make_array_from_process_local_data(batch_sharding, v), local)


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


def _resume_position(source, positions: list[Any], workdir: str) -> Any:
  """This process's data position from a checkpoint, checked to be of the form ``source``
  keeps (a position of another config.data source would fail deep in the input pipeline)."""
  position = _own_position(positions)
  if type(position) is not type(source.get_position()):
    raise ConfigError(f"the checkpoints in {workdir} were written reading other data than this "
                      f"config's (a data position {json.dumps(position)[:60]}): resume with the "
                      f"config the run was started with ({workdir}/config.json, its config.data) "
                      "or choose another --workdir")
  return position


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in ``workdir``; returns ``{"step", "loss", "preempted"}``."""
  # ------------------------------------------------------------------ config
  config_lib.validate(config)
  num_devices, process_count = jax.device_count(), jax.process_count()
  data_size, fsdp_size = config_lib.mesh_shape(config, num_devices, process_count)
  primary = jax.process_index() == 0
  storage.check_writable(workdir, "the work directory")

  # ------------------------------------------------------------------ mesh
  mesh = sharding.make_mesh(data_size, fsdp_size, dcn_data=config.mesh.dcn_data)
  replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)

  # ------------------------------------------------------------------ model
  pipeline = models.build_pipeline(config)
  unet_def, params = models.split_unet(pipeline, config.data.res)
  frozen = models.frozen_models(pipeline, replicated)  # Validation sampling decodes with these.
  pipeline.unet = None  # The parameters live on in the train state alone.
  scheduler = schedules.from_scheduler_config(pipeline.scheduler_config)

  # ------------------------------------------------------------------ input
  tokenizer = pipeline.text_tokenizer()
  source = input_lib.make_source(config, tokenizer=tokenizer, process_index=jax.process_index(),
                                 process_count=process_count,
                                 micro_conditioning=pipeline.is_sdxl)
  step_frozen, micro_shapes = models.step_models(config, source, pipeline, frozen, replicated)

  # ------------------------------------------------------------------ optimizer
  o = config.optimizer
  optimizer = step_lib.make_optimizer(o.lr, b1=o.b1, b2=o.b2, eps=o.eps,
                                      weight_decay=o.weight_decay, grad_clip_norm=o.grad_clip_norm)
  init_fn = lambda p: step_lib.init_state(p, optimizer, config.seed)

  # ------------------------------------------------------------------ sharding
  abstract_state = jax.eval_shape(init_fn, params)
  state_shardings = sharding.tree_shardings(abstract_state, mesh,
                                            min_size=config.sharding.min_fsdp_size)

  # ------------------------------------------------------------------ step
  loss_fn = step_lib.make_loss_fn(unet_def, step_frozen.vae_def, step_frozen.text_def,
                                  alphas_cumprod=scheduler.alphas_cumprod(),
                                  scaling_factor=pipeline.vae.config.scaling_factor,
                                  dropout=config.conditioning_dropout,
                                  prediction_type=scheduler.prediction_type, task=config.task)
  train_step = jax.jit(
      step_lib.make_train_step(loss_fn, optimizer, mesh=mesh, grad_accum=config.grad_accum,
                               ema_decay_rate=config.ema.decay, ema_warmup=config.ema.warmup,
                               lr=o.lr),
      in_shardings=(state_shardings, replicated, batch_sharding),
      out_shardings=(state_shardings, replicated), donate_argnums=(0,))

  # ------------------------------------------------------------------ checkpoint
  c = config.checkpoint
  checkpointer = checkpointing.Checkpointer(workdir, every_steps=c.every_steps, keep=c.keep,
                                            keep_every=c.keep_every, async_save=c.async_save)
  resumed = checkpointer.latest_step() is not None
  if resumed:
    del params  # The checkpoint's parameters replace them: never both at once.
    state, positions = checkpointer.restore(_abstract(abstract_state, state_shardings))
    source.set_position(_resume_position(source, positions, workdir))
  else:
    state = step_lib.initial_state(params, optimizer, config.seed, state_shardings)
    del params  # Donated to the state: deleted.

  # ------------------------------------------------------------------ work directory
  # Only now: a resume refused above leaves the run's config.json (what export reads) as it was.
  if primary:
    config_lib.write_config(config, workdir)
  writer = metrics.workdir_writer(workdir, enabled=primary)
  writer.text(f"{process_count} process(es), {num_devices} device(s) "
              f"({jax.devices()[0].device_kind}); mesh data={data_size} fsdp={fsdp_size}")
  if resumed:
    writer.text(f"resumed from the checkpoint of step {int(state.step)}")

  # ------------------------------------------------------------------ evals
  e = config.eval
  edit_fn = evaluate.make_edit_fn(
      unet_def, frozen.vae_def, frozen.text_def,
      schedule=schedules.make("discrete", e.num_steps, scheduler),
      scaling_factor=pipeline.vae.config.scaling_factor, text_scale=e.text_scale,
      image_scale=e.image_scale, prediction_type=scheduler.prediction_type,
      zero_null_text=edit.folder_zero_null_text(pipeline))
  validation = evaluate.ValidationGrid(
      jax.jit(edit_fn, in_shardings=(state_shardings.ema, replicated, replicated),
              out_shardings=replicated),
      source, num_images=e.num_images, seed=config.seed + 1, tokenizer=tokenizer,
      mesh=mesh, writer=writer, folder=epath.Path(workdir) / "samples" if primary else None)

  # ------------------------------------------------------------------ loop
  log = metrics.StepLog(config, writer, checkpointer, functools.partial(
      metrics.step_flops, loss_fn, config.grad_accum, abstract_state.params, step_frozen.state,
      micro_shapes))
  preemption = distributed.Preemption()
  start = step = int(state.step)
  preempted = False
  writer.text(f"training steps {start + 1}..{config.total_steps} of {config.batch_size} examples")
  profiler = profiler_lib.StepProfiler(str(epath.Path(workdir) / "profile"), first_step=start + 1,
                                       steps=config.profile.steps, skip=config.profile.skip)
  try:
    for step in range(start + 1, config.total_steps + 1):
      batch = _global_batch(next(source), batch_sharding)
      profiler.before_step(step)
      state, step_metrics = train_step(state, step_frozen.state, batch)
      if step == start + 1:
        runtime.trim_host_memory()  # The first step compiled the step: its heap is free now.
      profiler.after_step(step, step_metrics)
      log.add(step, step_metrics)
      if step % config.log_every_steps == 0 or step == config.total_steps:
        log.write(step)
      preempted = preemption.reached(step)
      if preempted or step == config.total_steps or step % c.every_steps == 0:
        log.check(step)
        checkpointer.save(state, _gather_json(source.get_position()),
                          force=preempted or step == config.total_steps)
      if preempted:
        writer.text(f"preempted: saved step {step}, exiting")
        break
      if e.every_steps and step % e.every_steps == 0:
        validation(step, state.ema, frozen.state)
    checkpointer.wait()
    if not preempted and step == config.total_steps:
      exporting.export_at_end(state, pipeline, unet_def, workdir, config.export.at_end, writer)
  except BaseException:
    # What stopped the run is what it reports: closing may fail in turn (on the same full disk).
    for close in (profiler.close, preemption.close, checkpointer.close, writer.close):
      with contextlib.suppress(Exception):
        close()
    raise
  profiler.close()
  preemption.close()
  checkpointer.close()
  writer.close()
  return {"step": step, "loss": log.loss, "preempted": preempted}
