"""DDPM noise schedules and the sigma grids the samplers walk.

Everything here runs once per call on the host, in float64 numpy, and hands the samplers a small
`Schedule` of float32 arrays. Samplers work in the variance-exploding ("VE", k-diffusion) form
``x = x0 + σ·ε`` with ``σ_t = √((1 − ᾱ_t)/ᾱ_t)``; the UNet sees ``x / √(σ² + 1)`` (the DDPM
sample) and the timestep ``t``.

Grids:
  * `discrete` — k-diffusion's ``DiscreteSchedule.get_sigmas(n)``, used by the original
    InstructPix2Pix (editing and data generation): ``t = linspace(T−1, 0, n)``, σ(t) interpolated
    linearly in log σ between the T training sigmas, then a trailing 0.
  * `karras` — Karras et al. (2022) ρ-spaced sigmas, t(σ) by k-diffusion's log-σ interpolation.
  * `diffusers_euler`, `diffusers_ddim`, `diffusers_dpm` — exactly the grids of diffusers'
    Euler(Ancestral)DiscreteScheduler, DDIMScheduler and DPMSolverMultistepScheduler, for parity
    with diffusers' pipelines.
  * `edm` — the grid of diffusers' EDMEulerScheduler (Karras et al. 2022's continuous σ, for models
    trained that way: CosXL, CosXL Edit), the only grid of a model whose scheduler config is
    EDM's. Such a model sees ``x / √(σ² + σ_data²)`` and the timestep ``c_noise = ¼·ln σ``, and
    predicts v (`Schedule.sigma_data`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import numpy as np

from jip2p.errors import CheckpointError, ConfigError

BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
SPACINGS = ("linspace", "leading", "trailing")
SCHEDULE_KINDS = ("discrete", "karras", "diffusers_euler", "diffusers_ddim", "diffusers_dpm", "edm")
EDM_SIGMA_SCHEDULES = ("karras", "exponential")
# What the UNet predicts: the noise ε (Stable Diffusion 1.x) or the velocity
# v = √ᾱ·ε − √(1−ᾱ)·x0 (Salimans & Ho 2022; SD 2.x 768 px), whose error is not amplified into x0
# at high noise as ε's is (by σ_t, ≈ 14.6 at t = 999 on SD's schedule).
PREDICTION_TYPES = ("epsilon", "v_prediction")


def betas(kind: str = "scaled_linear", num_train_timesteps: int = 1000,
          beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
  """DDPM betas, float64 ``[num_train_timesteps]``, as diffusers and CompVis define them."""
  n = num_train_timesteps
  if kind == "scaled_linear":
    return np.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=np.float64) ** 2
  if kind == "linear":
    return np.linspace(beta_start, beta_end, n, dtype=np.float64)
  if kind == "squaredcos_cap_v2":
    # Nichol & Dhariwal's cosine ᾱ(t); beta_start/beta_end play no part (as in diffusers).
    def alpha_bar(t):
      return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])
  raise ConfigError(f"beta_schedule {kind!r} is not supported; choose one of {BETA_SCHEDULES}")


def alphas_cumprod(betas_: np.ndarray) -> np.ndarray:
  """ᾱ_t = ∏_{s≤t} (1 − β_s), float64 ``[T]``."""
  return np.cumprod(1.0 - np.asarray(betas_, np.float64))


def train_sigmas(alphas_cumprod_: np.ndarray) -> np.ndarray:
  """The T training noise levels σ_t = √((1 − ᾱ_t)/ᾱ_t), increasing, float64 ``[T]``."""
  ac = np.asarray(alphas_cumprod_, np.float64)
  return np.sqrt((1.0 - ac) / ac)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The grid a sampling run walks; a pytree, so one compiled sampler serves all grids of n steps.

  sigmas: float32 ``[n + 1]``, decreasing; σ_i is the noise level at step i; the last entry is the
    level the run ends at (0 for k-diffusion grids and Euler/DPM; σ(ᾱ_0) for diffusers' DDIM).
  timesteps: float32 ``[n]``, the UNet's timestep argument at step i.
  init_sigma: float32 scalar; the initial latents are ``unit noise · init_sigma`` (in VE form).
    σ_0 for k-diffusion grids and diffusers' Euler with linspace/trailing spacing; √(σ_0² + 1)
    where diffusers starts from unit-variance DDPM latents (DDIM, DPM-Solver, Euler "leading").
  steps: None (the run walks every step of the arrays), or, in a grid made by `pad`, an int32
    scalar: the run walks steps ``0 … steps − 1`` of longer arrays and ends at ``sigmas[steps]``.
    The step count is then data, not shape: one compiled sampler serves every count up to the
    arrays' length.
  sigma_data: float32 scalar, the data's standard deviation the model's input scale assumes: it
    sees ``x / √(σ² + sigma_data²)`` and a v-prediction's ε is ``(sigma_data·v + σ·x_in) /
    √(σ² + sigma_data²)``. 1 for DDPM-trained models (the DDPM sample); EDM's config value on
    the `edm` grid (0.5 by default, 1 for CosXL).
  """

  sigmas: Any
  timesteps: Any
  init_sigma: Any
  steps: Any = None
  sigma_data: Any = np.float32(1.0)

  @property
  def num_steps(self) -> int:
    """The steps the run walks (outside a trace; inside one, a padded grid's count is traced)."""
    return self.timesteps.shape[0] if self.steps is None else int(self.steps)


jax.tree_util.register_dataclass(
    Schedule, data_fields=["sigmas", "timesteps", "init_sigma", "steps", "sigma_data"],
    meta_fields=[])


def pad(schedule: Schedule, length: int) -> Schedule:
  """``schedule`` in arrays of ``length`` steps, its own count carried as data (`Schedule.steps`).

  The entries past its last step repeat the last ones and are never read: the sampler walks
  exactly the same steps, and every grid of at most ``length`` steps has the same shapes, so one
  compiled program serves them all (the editor pads to the model's training timesteps, the
  largest count a grid may have).
  """
  n = schedule.num_steps
  if n > length:
    raise ConfigError(f"a grid of {n} steps does not fit arrays of {length}")
  sigmas, timesteps = np.asarray(schedule.sigmas)[:n + 1], np.asarray(schedule.timesteps)[:n]
  return dataclasses.replace(schedule, sigmas=np.pad(sigmas, (0, length - n), mode="edge"),
                             timesteps=np.pad(timesteps, (0, length - n), mode="edge"),
                             steps=np.int32(n))


def _schedule(sigmas: np.ndarray, timesteps: np.ndarray, init_sigma: float) -> Schedule:
  return Schedule(sigmas=np.asarray(sigmas, np.float32),
                  timesteps=np.asarray(timesteps, np.float32), init_sigma=np.float32(init_sigma))


def _check_steps(n: int, num_train_timesteps: int) -> None:
  is_int = isinstance(n, (int, np.integer)) and not isinstance(n, bool)
  if not is_int or not 1 <= n <= num_train_timesteps:
    raise ConfigError("the number of sampling steps must be an integer in "
                      f"[1, {num_train_timesteps}], got {n!r}")


def sigma_to_t(sigma: np.ndarray, alphas_cumprod_: np.ndarray) -> np.ndarray:
  """k-diffusion's continuous timestep of σ: linear interpolation in log σ, clamped to [0, T−1]."""
  log_sigmas = np.log(train_sigmas(alphas_cumprod_))
  return np.interp(np.log(np.asarray(sigma, np.float64)), log_sigmas,
                   np.arange(len(log_sigmas), dtype=np.float64))


def discrete(alphas_cumprod_: np.ndarray, n: int) -> Schedule:
  """k-diffusion's discrete grid (the original InstructPix2Pix's): t = linspace(T−1, 0, n)."""
  ac = np.asarray(alphas_cumprod_, np.float64)
  _check_steps(n, len(ac))
  t = np.linspace(len(ac) - 1, 0, n)
  sigma = np.exp(np.interp(t, np.arange(len(ac)), np.log(train_sigmas(ac))))
  return _schedule(np.append(sigma, 0.0), t, sigma[0])


def karras(alphas_cumprod_: np.ndarray, n: int, rho: float = 7.0, sigma_min: float | None = None,
           sigma_max: float | None = None) -> Schedule:
  """Karras et al.'s grid between the training σ range (or the given one), then a trailing 0."""
  ac = np.asarray(alphas_cumprod_, np.float64)
  _check_steps(n, len(ac))
  train = train_sigmas(ac)
  lo = train[0] if sigma_min is None else sigma_min
  hi = train[-1] if sigma_max is None else sigma_max
  if not 0 < lo < hi:
    raise ConfigError(f"karras needs 0 < sigma_min < sigma_max, got {lo} and {hi}")
  ramp = np.linspace(0.0, 1.0, n)
  sigma = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
  return _schedule(np.append(sigma, 0.0), sigma_to_t(sigma, ac), sigma[0])


def _check_spacing(spacing: str) -> None:
  if spacing not in SPACINGS:
    raise ConfigError(f"timestep_spacing {spacing!r} is not supported; choose one of {SPACINGS}")


def _trailing(num_train: int, n: int) -> np.ndarray:
  """diffusers' "trailing" timesteps; its float ``arange`` yields n + 1 of them for some n (61,
  103…), the extra one a bogus −1, so keep the first n."""
  return np.arange(num_train, 0, -num_train / n)[:n].round() - 1


def diffusers_euler(alphas_cumprod_: np.ndarray, n: int, *, spacing: str = "linspace",
                    steps_offset: int = 0) -> Schedule:
  """diffusers' EulerDiscreteScheduler / EulerAncestralDiscreteScheduler grid.

  Float timesteps by ``spacing``, σ interpolated linearly *in σ* (not log σ) at them, trailing 0.
  """
  ac = np.asarray(alphas_cumprod_, np.float64)
  num_train = len(ac)
  _check_steps(n, num_train)
  _check_spacing(spacing)
  if spacing == "linspace":
    t = np.linspace(0, num_train - 1, n)[::-1]
  elif spacing == "leading":
    t = (np.arange(n) * (num_train // n)).round()[::-1] + steps_offset
  else:
    t = _trailing(num_train, n)
  sigma = np.interp(t, np.arange(num_train), train_sigmas(ac))
  init = sigma.max() if spacing in ("linspace", "trailing") else math.sqrt(sigma.max() ** 2 + 1)
  return _schedule(np.append(sigma, 0.0), t, init)


def diffusers_ddim(alphas_cumprod_: np.ndarray, n: int, *, spacing: str = "leading",
                   steps_offset: int = 0, set_alpha_to_one: bool = True) -> Schedule:
  """diffusers' DDIMScheduler grid (SD 1.5's config: leading, steps_offset 1, set_alpha_to_one off).

  Integer timesteps; the run ends at ᾱ = 1 (σ = 0) or, with ``set_alpha_to_one=False``, at ᾱ_0
  (σ ≈ 0.029 for SD), as diffusers' last DDIM step does. The initial latents have unit variance
  in DDPM form. With "leading" spacing each step goes to the next timestep exactly as diffusers'
  ``t − T//n``; with "linspace"/"trailing" diffusers steps to ``t − T//n``, which need not be the
  next timestep, while this grid always steps to the next one.
  """
  ac = np.asarray(alphas_cumprod_, np.float64)
  num_train = len(ac)
  _check_steps(n, num_train)
  _check_spacing(spacing)
  if spacing == "linspace":
    t = np.linspace(0, num_train - 1, n).round()[::-1]
  elif spacing == "leading":
    t = (np.arange(n) * (num_train // n)).round()[::-1] + steps_offset
  else:
    t = _trailing(num_train, n)
  if t.max() >= num_train:
    raise ConfigError(f"{n} DDIM steps with steps_offset {steps_offset} reach timestep "
                      f"{int(t.max())}, beyond the {num_train} training timesteps")
  ac_t = ac[t.astype(np.int64)]
  ac_final = 1.0 if set_alpha_to_one else ac[0]
  sigma = np.sqrt((1 - ac_t) / ac_t)
  sigma_final = math.sqrt((1 - ac_final) / ac_final)
  return _schedule(np.append(sigma, sigma_final), t, math.sqrt(sigma[0] ** 2 + 1))


def diffusers_dpm(alphas_cumprod_: np.ndarray, n: int, *, spacing: str = "linspace",
                  steps_offset: int = 0) -> Schedule:
  """diffusers' DPMSolverMultistepScheduler grid (default options: no Karras/λ spacing, final σ 0).

  Integer timesteps, σ interpolated linearly in σ, trailing 0, unit-variance initial DDPM latents.
  """
  ac = np.asarray(alphas_cumprod_, np.float64)
  num_train = len(ac)
  _check_steps(n, num_train)
  _check_spacing(spacing)
  if spacing == "linspace":
    t = np.linspace(0, num_train - 1, n + 1).round()[::-1][:-1]
  elif spacing == "leading":
    t = (np.arange(n + 1) * (num_train // (n + 1))).round()[::-1][:-1] + steps_offset
  else:
    t = _trailing(num_train, n)
  sigma = np.interp(t, np.arange(num_train), train_sigmas(ac))
  return _schedule(np.append(sigma, 0.0), t, math.sqrt(sigma[0] ** 2 + 1))


def edm(n: int, *, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5,
        sigma_schedule: str = "karras", rho: float = 7.0) -> Schedule:
  """diffusers' EDMEulerScheduler grid of n steps: σ on a ``linspace(0, 1, n)`` ramp, Karras'
  ρ-spacing or log-linear ("exponential") from ``sigma_max`` to ``sigma_min``, then 0; timesteps
  ``¼·ln σ``; the run starts at ``√(sigma_max² + 1)·noise`` (diffusers' ``init_noise_sigma``)."""
  if sigma_schedule not in EDM_SIGMA_SCHEDULES:
    raise ConfigError(f"EDM sigma_schedule {sigma_schedule!r}; choose one of "
                      f"{EDM_SIGMA_SCHEDULES}")
  ramp = np.linspace(0.0, 1.0, n)
  if sigma_schedule == "karras":
    sigma = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
             ) ** rho
  else:
    sigma = np.exp(np.linspace(math.log(sigma_min), math.log(sigma_max), n))[::-1]
  sigma = sigma.astype(np.float32)
  return dataclasses.replace(
      _schedule(np.append(sigma, 0.0), 0.25 * np.log(sigma), math.sqrt(sigma_max ** 2 + 1)),
      sigma_data=np.float32(sigma_data))


# Scheduler options that would change the noise or the prediction, and the one value jip2p supports.
_FIXED_OPTIONS = {"trained_betas": None, "rescale_betas_zero_snr": False, "thresholding": False,
                  "clip_sample": False, "timestep_type": "discrete"}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  """The parts of a diffusers ``scheduler_config.json`` that define the model's noise.

  Absent keys take diffusers' scheduler defaults, except the noise schedule itself, which defaults
  to Stable Diffusion's (scaled_linear 0.00085 → 0.012 over 1000 steps). ``timestep_spacing`` None
  means each diffusers grid's own default. ``prediction_type`` is one of `PREDICTION_TYPES`.
  ``edm``: the config is an EDM scheduler's (``_class_name`` EDMEulerScheduler), whose noise is
  the ``sigma_*`` and ``rho`` keys, not betas; jip2p runs such models with v-prediction only (EDM's
  "epsilon" is another parametrization than DDPM's) and the `edm` grid.
  """

  num_train_timesteps: int = 1000
  beta_schedule: str = "scaled_linear"
  beta_start: float = 0.00085
  beta_end: float = 0.012
  prediction_type: str = "epsilon"
  timestep_spacing: str | None = None
  steps_offset: int = 0
  set_alpha_to_one: bool = True
  edm: bool = False
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  sigma_data: float = 0.5
  sigma_schedule: str = "karras"
  rho: float = 7.0
  final_sigmas_type: str = "zero"

  @classmethod
  def from_dict(cls, d: dict) -> SchedulerConfig:
    """Reads a config dict. Keys starting with ``_`` and the options of particular diffusers
    samplers (solver order, Karras flags…) are ignored: jip2p's own arguments pick the sampler and
    grid. Options that change the noise or the prediction must have their standard value."""
    for key, value in _FIXED_OPTIONS.items():
      if d.get(key, value) != value:
        raise ConfigError(f"scheduler config {key}={d[key]!r} is not supported (jip2p needs "
                          f"{value!r})")
    names = {f.name for f in dataclasses.fields(cls)} - {"edm"}
    config = cls(**{k: v for k, v in d.items() if k in names},
                 edm=d.get("_class_name") == "EDMEulerScheduler")
    if config.edm:
      config.check_edm()
    if config.prediction_type not in PREDICTION_TYPES:
      raise ConfigError(f"scheduler config prediction_type={config.prediction_type!r} is not "
                        f"supported; choose one of {PREDICTION_TYPES}")
    if config.beta_schedule not in BETA_SCHEDULES:
      raise ConfigError(f"scheduler config beta_schedule={config.beta_schedule!r} is not "
                        f"supported; choose one of {BETA_SCHEDULES}")
    if config.timestep_spacing is not None:
      _check_spacing(config.timestep_spacing)
    for key, least in (("num_train_timesteps", 2), ("steps_offset", 0)):
      value = getattr(config, key)
      if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ConfigError(f"scheduler config {key}={value!r} must be an integer ≥ {least}")
    for key in ("beta_start", "beta_end"):
      value = getattr(config, key)
      if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
        raise ConfigError(f"scheduler config {key}={value!r} must be a number in (0, 1)")
    if not isinstance(config.set_alpha_to_one, bool):
      raise ConfigError(f"scheduler config set_alpha_to_one={config.set_alpha_to_one!r} must be "
                        "true or false")
    return config

  def check_edm(self) -> None:
    """The EDM keys jip2p runs: v-prediction, a known sigma schedule, positive sigmas, a final 0."""
    if self.prediction_type != "v_prediction":
      raise ConfigError(f"EDM scheduler config prediction_type={self.prediction_type!r} is not "
                        "supported (jip2p runs EDM models that predict v, as CosXL)")
    if self.sigma_schedule not in EDM_SIGMA_SCHEDULES:
      raise ConfigError(f"EDM scheduler config sigma_schedule={self.sigma_schedule!r}; choose "
                        f"one of {EDM_SIGMA_SCHEDULES}")
    if self.final_sigmas_type != "zero":
      raise ConfigError(f"EDM scheduler config final_sigmas_type={self.final_sigmas_type!r} is "
                        "not supported (jip2p needs 'zero')")
    for key in ("sigma_min", "sigma_max", "sigma_data", "rho"):
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"EDM scheduler config {key}={value!r} must be a number > 0")
    if not self.sigma_min < self.sigma_max:
      raise ConfigError(f"EDM scheduler config sigma_min={self.sigma_min} must be below "
                        f"sigma_max={self.sigma_max}")

  def alphas_cumprod(self) -> np.ndarray:
    """ᾱ, float64 ``[num_train_timesteps]``."""
    return alphas_cumprod(betas(self.beta_schedule, self.num_train_timesteps, self.beta_start,
                                self.beta_end))


def from_scheduler_config(path_or_dict: str | os.PathLike | dict) -> SchedulerConfig:
  """Reads a model folder's ``scheduler/scheduler_config.json`` (or that folder, file or a dict)."""
  if isinstance(path_or_dict, dict):
    return SchedulerConfig.from_dict(path_or_dict)
  path = os.fspath(path_or_dict)
  for candidate in (os.path.join(path, "scheduler", "scheduler_config.json"),
                    os.path.join(path, "scheduler_config.json"), path):
    if os.path.isfile(candidate):
      break
  else:
    raise CheckpointError(f"no scheduler config at {path!r}: expected a model folder with "
                          "scheduler/scheduler_config.json")
  try:
    with open(candidate, encoding="utf-8") as f:
      d = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f"{candidate}: not a JSON scheduler config ({e})") from e
  if not isinstance(d, dict):
    raise ConfigError(f"{candidate}: a scheduler config must be a JSON object")
  return SchedulerConfig.from_dict(d)


def make(kind: str, n: int, config: SchedulerConfig = SchedulerConfig()) -> Schedule:
  """The ``kind`` grid (one of `SCHEDULE_KINDS`) of n steps for a model's scheduler config; an EDM
  config (`SchedulerConfig.edm`) has the `edm` grid only, and `edm` needs one."""
  if kind not in SCHEDULE_KINDS:
    raise ConfigError(f"unknown schedule {kind!r}; choose one of {SCHEDULE_KINDS}")
  if config.edm and kind != "edm":
    raise ConfigError(f"schedule {kind!r} does not fit this model: its scheduler is EDM's "
                      "(continuous σ); use schedule 'edm'")
  if kind == "edm" and not config.edm:
    raise ConfigError("schedule 'edm' is for models with an EDM scheduler (CosXL); this model's "
                      "is DDPM's")
  if kind == "edm":
    _check_steps(n, config.num_train_timesteps)
    return edm(n, sigma_min=config.sigma_min, sigma_max=config.sigma_max,
               sigma_data=config.sigma_data, sigma_schedule=config.sigma_schedule,
               rho=config.rho)
  ac = config.alphas_cumprod()
  spacing = {} if config.timestep_spacing is None else {"spacing": config.timestep_spacing}
  if kind == "discrete":
    return discrete(ac, n)
  if kind == "karras":
    return karras(ac, n)
  if kind == "diffusers_euler":
    return diffusers_euler(ac, n, steps_offset=config.steps_offset, **spacing)
  if kind == "diffusers_ddim":
    return diffusers_ddim(ac, n, steps_offset=config.steps_offset,
                          set_alpha_to_one=config.set_alpha_to_one, **spacing)
  if kind == "diffusers_dpm":
    return diffusers_dpm(ac, n, steps_offset=config.steps_offset, **spacing)
  raise ConfigError(f"unknown schedule {kind!r}; choose one of {SCHEDULE_KINDS}")
