"""Samplers against float64 numpy transcriptions of k-diffusion / DDIM, on an analytic Gaussian
toy, and their determinism and hooks. numpy + JAX only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jip2p.diffusion import samplers, schedules
from jip2p.errors import ConfigError
from tests.diffusion import kdiffusion_numpy as kd

SHAPE = (2, 8, 8, 4)
AC = kd.ldm_alphas_cumprod()


def fake_eps(xp):
  """A smooth nonlinear ε-model that depends on the input, the timestep and the step index."""
  def eps(x_in, t, i):
    return xp.tanh(0.9 * x_in + 0.0007 * t) + 0.05 * xp.sin(3.0 * x_in) * (1.0 + 0.02 * i)
  return eps


FAKE_EPS = fake_eps(jnp)
_COMPILED = {}


def run(method, schedule, noise, key=None, eps_fn=FAKE_EPS, **kwargs):
  """sample() under one jit per (method, eps_fn, options), as a caller would compile it."""
  config = (method, eps_fn, tuple(sorted(kwargs.items())))
  if config not in _COMPILED:
    _COMPILED[config] = jax.jit(
        lambda n, s, k: samplers.sample(eps_fn, n, s, k, method=method, **kwargs))
  return np.asarray(_COMPILED[config](noise, schedule, key))


def unit_noise(seed=0, shape=SHAPE):
  return np.asarray(jax.random.normal(jax.random.key(seed), shape, jnp.float32))


def step_noises(key, n, shape=SHAPE):
  return [np.asarray(samplers.step_noise(key, i, shape), np.float64) for i in range(n)]


def assert_close(ours, ref, tol):
  err = np.abs(ours - ref).max() / max(1.0, np.abs(ref).max())
  assert err < tol, f"relative max error {err:.2e} ≥ {tol:.0e}"


@pytest.mark.parametrize("eta", [1.0, 0.6])
def test_euler_ancestral_matches_kdiffusion(eta):
  n, key, noise = 30, jax.random.key(7), unit_noise()
  sigmas, t = kd.discrete_sigmas(AC, n)
  ref = kd.sample_euler_ancestral(kd.eps_denoiser(fake_eps(np), t), noise * sigmas[0], sigmas,
                                  step_noises(key, n), eta=eta)
  ours = run("euler_ancestral", schedules.discrete(AC, n), noise, key, eta=eta)
  assert_close(ours, ref, 2e-5)


@pytest.mark.parametrize("grid", ["discrete", "karras"])
@pytest.mark.parametrize("method", ["euler", "dpmpp_2m"])
def test_deterministic_samplers_match_kdiffusion(method, grid):
  n, noise = 20, unit_noise(1)
  if grid == "discrete":
    sigmas, t = kd.discrete_sigmas(AC, n)
  else:
    train = kd.training_sigmas(AC)
    sigmas = kd.karras_sigmas(n, train[0], train[-1])
    t = kd.sigma_to_t(sigmas[:-1], AC)
  reference = {"euler": kd.sample_euler, "dpmpp_2m": kd.sample_dpmpp_2m}[method]
  ref = reference(kd.eps_denoiser(fake_eps(np), t), noise * sigmas[0], sigmas)
  ours = run(method, schedules.make(grid, n), noise)
  assert_close(ours, ref, 2e-5)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_the_alpha_form(eta):
  """DDIM computed as an ancestral Euler step in σ equals Song et al.'s ᾱ form."""
  n, key, noise = 20, jax.random.key(3), unit_noise(2)
  t = (np.arange(n) * (1000 // n))[::-1] + 1
  ref = kd.sample_ddim(fake_eps(np), noise.astype(np.float64), AC, t, AC[0], eta,
                       step_noises(key, n))
  schedule = schedules.diffusers_ddim(AC, n, steps_offset=1, set_alpha_to_one=False)
  ours = run("ddim", schedule, noise, key if eta else None, eta=eta)
  assert_close(ours, ref, 2e-5)


MU, SD = 0.5, 1.0


def gaussian_eps_fn(schedule):
  """The exact ε of data ~ N(MU, SD²): E[x0 | x] = MU + SD²/(SD² + σ²)·(x − MU)."""
  sigmas = jnp.asarray(schedule.sigmas)

  def eps_fn(x_in, t, i):
    sigma = sigmas[i]
    x = x_in * jnp.sqrt(sigma ** 2 + 1)
    return (x - (MU + SD ** 2 / (SD ** 2 + sigma ** 2) * (x - MU))) / sigma
  return eps_fn


def ode_solution(noise, schedule):
  """The probability-flow ODE maps x(σ_0) to MU + √(SD² + σ²)/√(SD² + σ_0²)·(x(σ_0) − MU)."""
  s0 = float(schedule.sigmas[0])
  return MU + SD / np.sqrt(SD ** 2 + s0 ** 2) * (noise * float(schedule.init_sigma) - MU)


@pytest.mark.parametrize("method,tol_50", [("euler", 0.15), ("ddim", 0.15), ("dpmpp_2m", 0.01)])
def test_deterministic_samplers_solve_the_gaussian_ode(method, tol_50):
  noise = unit_noise(4, (4, 16, 16, 4))
  errors = []
  for n in (50, 100):
    schedule = schedules.karras(AC, n)
    ours = run(method, schedule, noise, eps_fn=gaussian_eps_fn(schedule))
    errors.append(np.abs(ours - ode_solution(noise, schedule)).max())
  assert errors[0] < tol_50
  # Doubling the steps halves a first-order error (Euler, DDIM); DPM-Solver++(2M) is second order.
  assert errors[1] < errors[0] / (3.0 if method == "dpmpp_2m" else 1.7)


@pytest.mark.parametrize("method", ["euler_ancestral", "ddim"])
def test_ancestral_samplers_sample_the_gaussian(method):
  noise = unit_noise(5, (8, 16, 16, 4))
  schedule = schedules.discrete(AC, 100)
  out = run(method, schedule, noise, jax.random.key(0), eps_fn=gaussian_eps_fn(schedule), eta=1.0)
  assert abs(out.mean() - MU) < 0.03
  assert abs(out.std() - SD) < 0.05


def test_same_key_is_bit_identical_and_different_keys_differ():
  noise, schedule = unit_noise(), schedules.discrete(AC, 10)
  a = run("euler_ancestral", schedule, noise, jax.random.key(1))
  b = run("euler_ancestral", schedule, noise, jax.random.key(1))
  c = run("euler_ancestral", schedule, noise, jax.random.key(2))
  assert np.array_equal(a, b)
  assert np.abs(a - c).max() > 1e-2


def test_compiled_once_per_shape():
  traces = []

  def eps_fn(x_in, t, i):
    traces.append(1)
    return FAKE_EPS(x_in, t, i)

  fn = jax.jit(lambda n, s, k: samplers.sample(eps_fn, n, s, k))
  for kind, seed in (("discrete", 0), ("karras", 1), ("diffusers_euler", 2)):
    fn(unit_noise(seed), schedules.make(kind, 12), jax.random.key(seed))
  assert len(traces) == 1


PAIRS = samplers.shared_noise(2)


def test_shared_noise_gives_pairs_identical_draws():
  noise = np.repeat(unit_noise(0, (2, 8, 8, 4)), 2, axis=0)  # [pair0, pair0, pair1, pair1]
  schedule, key = schedules.discrete(AC, 10), jax.random.key(0)
  shared = run("euler_ancestral", schedule, noise, key, noise_fn=PAIRS)
  assert np.array_equal(shared[0], shared[1]) and np.array_equal(shared[2], shared[3])
  assert np.abs(shared[0] - shared[2]).max() > 1e-2
  independent = run("euler_ancestral", schedule, noise, key)
  assert np.abs(independent[0] - independent[1]).max() > 1e-2
  draws = np.asarray(samplers.shared_noise(2)(key, 3, (4, 2)))
  assert np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[1], draws[2])


def test_step_index_and_post_step_hook():
  """Each step sees its own index; post_step acts on the VE latents after the step."""
  n, noise = 6, unit_noise()
  schedule = schedules.discrete(AC, n)

  def eps_fn(x_in, t, i):
    return jnp.zeros_like(x_in)  # Euler with ε = 0 leaves x unchanged.

  ours = run("euler", schedule, noise, eps_fn=eps_fn, post_step=lambda x, i: x + i)
  np.testing.assert_allclose(ours, noise * schedule.sigmas[0] + sum(range(n)), rtol=1e-6)


def test_output_is_rescaled_when_the_grid_ends_above_zero():
  schedule = schedules.diffusers_ddim(AC, 4, steps_offset=1, set_alpha_to_one=False)
  last = float(schedule.sigmas[-1])
  assert last > 0.02
  ours = run("euler", schedule, unit_noise(), eps_fn=lambda x, t, i: jnp.zeros_like(x))
  np.testing.assert_allclose(ours, unit_noise() * schedule.init_sigma / np.sqrt(last ** 2 + 1),
                             rtol=1e-6)


def test_bad_arguments_are_named():
  noise, schedule = unit_noise(), schedules.discrete(AC, 4)
  with pytest.raises(ConfigError, match="heun"):
    samplers.sample(FAKE_EPS, noise, schedule, method="heun")
  with pytest.raises(ConfigError, match="eta"):
    samplers.sample(FAKE_EPS, noise, schedule, method="euler", eta=0.5)
  with pytest.raises(ConfigError, match="eta"):
    samplers.sample(FAKE_EPS, noise, schedule, jax.random.key(0), method="ddim", eta=-1)
  with pytest.raises(ValueError, match="key"):
    samplers.sample(FAKE_EPS, noise, schedule, method="euler_ancestral")
  with pytest.raises(ValueError, match="groups of 3"):
    samplers.shared_noise(3)(jax.random.key(0), 0, (4, 2))


@pytest.mark.parametrize("method,grid", [("euler_ancestral", "discrete"), ("euler", "karras"),
                                         ("dpmpp_2m", "discrete"),
                                         ("ddim", "diffusers_ddim")])
def test_a_padded_grid_walks_the_same_steps(method, grid):
  """`schedules.pad`: the step count is data; the samples equal the unpadded grid's (the same
  steps, the same per-step noise, the same end σ), to float32 rounding."""
  noise, key = unit_noise(3), jax.random.key(5)
  for n in (1, 7, 20):
    schedule = schedules.make(grid, n)
    padded = schedules.pad(schedule, 40)
    assert padded.sigmas.shape == (41,) and padded.num_steps == n
    kwargs = {"eta": 0.8} if method == "ddim" else {}
    want = run(method, schedule, noise, key, **kwargs)
    got = run(method, padded, noise, key, **kwargs)
    assert_close(got, want, 1e-6)


def test_a_padded_grid_compiles_once_for_every_step_count():
  traces = []

  def eps_fn(x_in, t, i):
    traces.append(1)
    return FAKE_EPS(x_in, t, i)

  fn = jax.jit(lambda n, s, k: samplers.sample(eps_fn, n, s, k))
  outs = [np.asarray(fn(unit_noise(), schedules.pad(schedules.discrete(AC, n), 64),
                        jax.random.key(0))) for n in (5, 6, 30, 64)]
  assert len(traces) == 1 and fn._cache_size() == 1
  assert all(np.abs(a - b).max() > 1e-3 for a, b in zip(outs, outs[1:]))
  with pytest.raises(ConfigError, match="65 steps"):
    schedules.pad(schedules.discrete(AC, 65), 64)
