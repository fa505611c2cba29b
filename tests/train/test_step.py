"""The train step: the same loss and update on any mesh, real FSDP sharding, the EMA update."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from jip2p.diffusion import schedules
from jip2p.errors import ConfigError
from jip2p.train import config as config_lib
from jip2p.train import models
from jip2p.train import sharding
from jip2p.train import step as step_lib
from jip2p.train.input import SyntheticSource


# `_one_step`'s learning rate, and `make_optimizer`'s AdamW defaults.
LR, B1, EPS = 1e-3, 0.9, 1e-8
# Another mesh sums each gradient entry in another order (other shards, another all-reduce tree):
# float32 rounding of the summed terms, below 8e-7 of the largest entry on the meshes below. The
# tolerance is 1e-5 of it; one example of the 16 replaced by another (what a lost device's share
# of a micro-batch does to the mean) moves entries by up to 2e-2 of it.
GRAD_TOL = 1e-5


def _setup(folder: str):
  config = config_lib.base_config()
  config.model.init = folder
  config.model.compute_dtype = "float32"
  pipeline = models.build_pipeline(config)
  unet_def, params = nnx.split(pipeline.unet, nnx.Param)
  vae_def, vae_state = nnx.split(pipeline.vae)
  text_def, text_state = nnx.split(pipeline.text_encoder)
  null_text = jax.jit(lambda st, ids: nnx.merge(text_def, st)(ids))(
      text_state, pipeline.tokenizer([""]))
  frozen = {"vae": vae_state, "text_encoder": text_state, "null_text": null_text}
  ac = schedules.from_scheduler_config(pipeline.scheduler_config).alphas_cumprod()
  loss_fn = step_lib.make_loss_fn(unet_def, vae_def, text_def, alphas_cumprod=ac,
                                  scaling_factor=pipeline.vae.config.scaling_factor, dropout=0.05)
  source = SyntheticSource(num_examples=8, res=32, seed=0, global_batch=16, flip=True,
                           tokenizer=pipeline.tokenizer)
  return params, frozen, loss_fn, next(source)


def _one_step(params, frozen, loss_fn, batch, mesh, grad_accum=2):
  optimizer = step_lib.make_optimizer(LR)
  init = lambda p: step_lib.init_state(p, optimizer, seed=0)
  state_sh = sharding.tree_shardings(jax.eval_shape(init, params), mesh, min_size=256)
  frozen_sh = jax.tree.map(lambda _: sharding.replicated(mesh), frozen)
  batch_sh = sharding.batch_sharding(mesh)
  fn = step_lib.make_train_step(loss_fn, optimizer, mesh=mesh, grad_accum=grad_accum,
                                ema_decay_rate=0.9999, ema_warmup=True, lr=LR)
  step = jax.jit(fn, in_shardings=(state_sh, frozen_sh, batch_sh),
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
  state = jax.jit(init, out_shardings=state_sh)(params)
  new_state, metrics = step(state, jax.device_put(frozen, frozen_sh),
                            jax.device_put(batch, batch_sh))
  return new_state, metrics


def _adam_direction(g):
  """Adam's first update before the learning rate: m̂/(√v̂ + eps) = g/(|g| + eps), ≈ sign(g)."""
  return g / (np.abs(g) + EPS)


def _assert_same_step(got, want):
  """``got`` took the step ``want`` took, from the same parameters, up to the order of float32 reductions.

  The gradients (the first moments / (1 − b1)) agree to `GRAD_TOL`. Adam's first step divides the
  gradient by its size, so no norm over a tensor bounds the parameters: an entry whose gradient is
  within the tolerance of 0 may step by ±lr on either mesh. The update −lr·(u(g) + wd·p) is
  monotone in g, so each entry is bounded by what its own gradient allows: lr·(u(|g| + tol) −
  u(|g| − tol)) — about 2·lr·eps·tol/g² where |g| ≫ tol, up to 2·lr where |g| ≲ tol — plus
  float32 rounding of u and of the parameter.
  """
  leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]
  grads_got, grads = ([m / (1 - B1) for m in leaves(s.opt_state[0].mu)] for s in (got, want))
  tol = GRAD_TOL * max(np.abs(g).max() for g in grads)
  free = 0
  for a, b, g_a, g in zip(leaves(got.params), leaves(want.params), grads_got, grads):
    np.testing.assert_array_less(np.abs(g_a - g), tol)
    width = _adam_direction(np.abs(g) + tol) - _adam_direction(np.abs(g) - tol)
    np.testing.assert_array_less(np.abs(a - b), LR * (width + 1e-6) + 2 * np.spacing(np.abs(b)))
    free += int((np.abs(g) <= tol).sum())
  # The entries left free to flip stay few (0.25% here), so the bound above keeps its power.
  assert free < 0.01 * sum(g.size for g in grads)


def test_one_step_is_the_same_on_any_mesh(micro_folder):
  params, frozen, loss_fn, batch = _setup(micro_folder)
  ref_state, ref_metrics = _one_step(params, frozen, loss_fn, batch,
                                     sharding.make_mesh(1, 1, jax.devices()[:1]))
  ref_params = jax.tree.leaves(jax.device_get(ref_state.params))
  assert np.isfinite(float(ref_metrics["loss"]))
  # EMA after the first update (LitEma's warm-up: decay 2/11): ema = p0 + (1 − d)(p1 − p0).
  decay = 2 / 11
  for e, p0, p1 in zip(jax.tree.leaves(jax.device_get(ref_state.ema)),
                       jax.tree.leaves(jax.device_get(params)), ref_params):
    np.testing.assert_allclose(e, p0 + (1 - decay) * (p1 - p0), rtol=1e-6, atol=1e-7)
  # The check below can fail: a step at a learning rate 1% too high, same gradients, does.
  too_far = jax.tree.map(lambda p1, p0: p0 + 1.01 * (p1 - p0), jax.device_get(ref_state.params),
                         jax.device_get(params))
  with pytest.raises(AssertionError):
    _assert_same_step(ref_state.replace(params=too_far), ref_state)
  for data, fsdp in ((8, 1), (2, 4), (1, 8)):
    state, metrics = _one_step(params, frozen, loss_fn, batch, sharding.make_mesh(data, fsdp))
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(ref_metrics["grad_norm"]),
                               rtol=1e-5)
    _assert_same_step(state, ref_state)
    got = jax.tree.leaves(jax.device_get(state.params))
    # The parameters changed (the comparison is not between two unchanged copies).
    assert max(float(np.abs(a - np.asarray(b)).max())
               for a, b in zip(got, jax.tree.leaves(jax.device_get(params)))) > 1e-4
    if fsdp > 1:
      kernel = state.params["down_blocks"][0]["attentions"][0]["proj_in"]["kernel"]
      assert "fsdp" in kernel.sharding.spec
      per_device = sharding.per_device_bytes(state.params)
      total = sum(x.nbytes for x in jax.tree.leaves(state.params))
      assert max(per_device.values()) < total / fsdp * 1.3
      assert len(per_device) == 8


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noised_latents_and_target_match_diffusers(prediction_type):
  import diffusers
  import torch
  scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                      beta_end=0.012, prediction_type=prediction_type)
  ac = schedules.SchedulerConfig().alphas_cumprod()
  rng = np.random.default_rng(0)
  latents, noise = (rng.standard_normal((4, 8, 8, 4)).astype(np.float32) for _ in range(2))
  t = np.array([0, 250, 700, 999])
  noisy, target = step_lib.noised_and_target(latents, noise, np.sqrt(ac[t]).astype(np.float32),
                                             np.sqrt(1 - ac[t]).astype(np.float32),
                                             prediction_type)
  lat_t, noise_t, t_t = torch.from_numpy(latents), torch.from_numpy(noise), torch.from_numpy(t)
  np.testing.assert_allclose(noisy, scheduler.add_noise(lat_t, noise_t, t_t).numpy(), atol=1e-5)
  want = noise_t if prediction_type == "epsilon" else scheduler.get_velocity(lat_t, noise_t, t_t)
  np.testing.assert_allclose(target, want.numpy(), atol=1e-5)


def test_an_unknown_prediction_type_is_named():
  with pytest.raises(ConfigError, match="prediction_type 'sample'"):
    step_lib.make_loss_fn(None, None, None, alphas_cumprod=np.ones(10), scaling_factor=1.0,
                          dropout=0.0, prediction_type="sample")


def test_the_state_holds_the_only_copy_of_the_weights(micro_folder):
  """`initial_state` takes the parameters over (donated: not held twice while the moments and EMA
  are made), and the trainer's jitted step updates the state in place: every byte of the state
  is aliased from input to output, and the old state is gone after a step."""
  params, frozen, loss_fn, batch = _setup(micro_folder)
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  optimizer = step_lib.make_optimizer(LR)
  abstract = jax.eval_shape(lambda p: step_lib.init_state(p, optimizer, seed=0), params)
  state_sh = sharding.tree_shardings(abstract, mesh)
  values = [np.array(x) for x in jax.tree.leaves(params)]  # copies: a view would pin a buffer
  state = step_lib.initial_state(params, optimizer, 0, state_sh)
  assert all(x.is_deleted() for x in jax.tree.leaves(params))
  for tree in (state.params, state.ema):
    for got, want in zip(jax.tree.leaves(tree), values):
      np.testing.assert_array_equal(got, want)
  assert all(not np.any(m) for m in jax.tree.leaves(state.opt_state[0].mu))

  replicated = sharding.replicated(mesh)
  step = jax.jit(step_lib.make_train_step(loss_fn, optimizer, mesh=mesh, grad_accum=1,
                                          ema_decay_rate=0.9999, ema_warmup=True, lr=LR),
                 in_shardings=(state_sh, jax.tree.map(lambda _: replicated, frozen),
                               sharding.batch_sharding(mesh)),
                 out_shardings=(state_sh, replicated), donate_argnums=0)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  memory = step.lower(state, frozen, batch).compile().memory_analysis()
  assert memory.alias_size_in_bytes >= state_bytes - 64  # all but the step counter and key
  old = state
  state, metrics = step(state, frozen, batch)
  assert bool(metrics["finite"]) and int(state.step) == 1
  assert all(x.is_deleted() for x in jax.tree.leaves(old))


def _square_loss(params, frozen, batch, key):
  """A stand-in for the model: one matrix product per parameter leaf."""
  return sum(jax.numpy.mean(jax.numpy.tanh(batch["x"] @ w) ** 2) for w in params.values())


def _square_step(fsdp: int, grad_accum: int):
  """(the jitted trainer step over 8 parameter leaves of 1024², its state's abstract value, the
  parameters' bytes per device, a batch's shape)."""
  mesh = sharding.make_mesh(1, fsdp, jax.devices()[:fsdp])
  optimizer = step_lib.make_optimizer(LR)
  params = {f"w{i}": jax.ShapeDtypeStruct((1024, 1024), np.float32) for i in range(8)}
  abstract = jax.eval_shape(lambda p: step_lib.init_state(p, optimizer, seed=0), params)
  state_sh = sharding.tree_shardings(abstract, mesh)
  step = jax.jit(step_lib.make_train_step(_square_loss, optimizer, mesh=mesh,
                                          grad_accum=grad_accum, ema_decay_rate=0.9999,
                                          ema_warmup=True, lr=LR),
                 in_shardings=(state_sh, None, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
  batch = jax.ShapeDtypeStruct((4 * fsdp * grad_accum, 1024), np.float32)
  return step, abstract, 8 * 1024 * 1024 * 4 / fsdp, batch


@pytest.mark.parametrize("fsdp,grad_accum", [(1, 1), (4, 1), (4, 2)])
def test_the_skip_costs_no_copy_of_the_state(fsdp, grad_accum):
  """The non-finite guard holds no second copy of parameters, moments or EMA: the step's
  temporaries are the gradients (1× the parameters per device; 2× with accumulation, the sum
  and one micro-batch's). A select of the new against the old state needed 3.1× here."""
  step, abstract, param_bytes, batch = _square_step(fsdp, grad_accum)
  memory = step.lower(abstract, None, {"x": batch}).compile().memory_analysis()
  assert memory.temp_size_in_bytes <= (grad_accum + 0.3) * param_bytes


def test_a_non_finite_step_leaves_the_state_exactly_as_it_was():
  step, abstract, _, batch = _square_step(1, 1)
  rng = np.random.default_rng(0)
  params = {k: rng.standard_normal(v.shape).astype(np.float32)
            for k, v in abstract.params.items()}
  state = step_lib.init_state(params, step_lib.make_optimizer(LR), seed=0)
  x = rng.standard_normal(batch.shape).astype(np.float32)
  state, metrics = step(state, None, {"x": x})  # a finite step first: moments and EMA ≠ init
  assert bool(metrics["finite"])
  before = jax.device_get(state)
  x[3, 5] = np.nan
  state, metrics = step(state, None, {"x": x})
  assert not bool(metrics["finite"]) and int(state.step) == 2
  for got, want in zip(jax.tree.leaves(jax.device_get(state.replace(step=before.step))),
                       jax.tree.leaves(before)):
    np.testing.assert_array_equal(got, want)
  state, metrics = step(state, None, {"x": np.nan_to_num(x)})  # and a finite one moves on
  assert bool(metrics["finite"]) and int(state.step) == 3
  assert not np.array_equal(jax.device_get(state.params["w0"]), before.params["w0"])
