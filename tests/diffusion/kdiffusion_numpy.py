"""Float64 numpy transcriptions of the reference algorithms, written independently of jip2p.

k-diffusion (crowsonkb/k-diffusion, the version the original InstructPix2Pix pins):
``DiscreteSchedule.get_sigmas / sigma_to_t``, ``get_sigmas_karras``, ``sample_euler``,
``sample_euler_ancestral`` (η), ``sample_dpmpp_2m``; and DDIM in the ᾱ form of Song et al. and
diffusers.
A ``denoiser(x, sigma, i)`` returns x0; ``eps_model(x_in, t, i)`` is an ε-model as CompVis sees it.
"""

import numpy as np


def ldm_alphas_cumprod(num=1000, start=0.00085, end=0.012):
  """CompVis ldm's ``register_schedule`` for the "linear" (= diffusers' scaled_linear) schedule."""
  betas = np.linspace(start ** 0.5, end ** 0.5, num, dtype=np.float64) ** 2
  return np.cumprod(1.0 - betas, axis=0)


def training_sigmas(ac):
  return ((1 - ac) / ac) ** 0.5


def discrete_sigmas(ac, n):
  """``DiscreteSchedule.get_sigmas(n)``: t_to_sigma at linspace(T−1, 0, n), then append_zero."""
  log_sigmas = np.log(training_sigmas(ac))
  t = np.linspace(len(log_sigmas) - 1, 0, n)
  low, high, w = np.floor(t).astype(int), np.ceil(t).astype(int), t - np.floor(t)
  log_sigma = (1 - w) * log_sigmas[low] + w * log_sigmas[high]
  return np.append(np.exp(log_sigma), 0.0), t


def sigma_to_t(sigma, ac):
  """``DiscreteSchedule.sigma_to_t`` (quantize=False), argmax/cumsum and all."""
  log_sigmas = np.log(training_sigmas(ac))
  log_sigma = np.log(np.asarray(sigma, np.float64))
  dists = log_sigma - log_sigmas[:, None]
  low_idx = np.minimum(np.argmax(np.cumsum(dists >= 0, axis=0), axis=0), len(log_sigmas) - 2)
  high_idx = low_idx + 1
  low, high = log_sigmas[low_idx], log_sigmas[high_idx]
  w = np.clip((low - log_sigma) / (low - high), 0, 1)
  return (1 - w) * low_idx + w * high_idx


def karras_sigmas(n, sigma_min, sigma_max, rho=7.0):
  ramp = np.linspace(0, 1, n)
  min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  return np.append((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho, 0.0)


def eps_denoiser(eps_model, timesteps):
  """``DiscreteEpsDDPMDenoiser.forward``: x + c_out·ε(x·c_in, t) with t given per step."""
  def denoiser(x, sigma, i):
    c_in = 1 / (sigma ** 2 + 1) ** 0.5
    return x - sigma * eps_model(x * c_in, timesteps[i], i)
  return denoiser


def ancestral_step(sigma_from, sigma_to, eta=1.0):
  if not eta:
    return sigma_to, 0.0
  sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2)
                                  / sigma_from ** 2) ** 0.5)
  sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
  return sigma_down, sigma_up


def sample_euler_ancestral(denoiser, x, sigmas, noises, eta=1.0):
  """``noises[i]`` is the ``randn_like(x)`` of step i."""
  for i in range(len(sigmas) - 1):
    denoised = denoiser(x, sigmas[i], i)
    sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
    d = (x - denoised) / sigmas[i]
    x = x + d * (sigma_down - sigmas[i])
    x = x + noises[i] * sigma_up
  return x


def sample_euler(denoiser, x, sigmas):
  for i in range(len(sigmas) - 1):
    denoised = denoiser(x, sigmas[i], i)
    d = (x - denoised) / sigmas[i]
    x = x + d * (sigmas[i + 1] - sigmas[i])
  return x


def sample_dpmpp_2m(denoiser, x, sigmas):
  def t_fn(sigma):
    with np.errstate(divide="ignore"):
      return -np.log(sigma)

  def sigma_fn(t):
    return np.exp(-t)

  old_denoised = None
  for i in range(len(sigmas) - 1):
    denoised = denoiser(x, sigmas[i], i)
    t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
    h = t_next - t
    if old_denoised is None or sigmas[i + 1] == 0:
      x = (sigma_fn(t_next) / sigma_fn(t)) * x - np.expm1(-h) * denoised
    else:
      h_last = t - t_fn(sigmas[i - 1])
      r = h_last / h
      denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
      x = (sigma_fn(t_next) / sigma_fn(t)) * x - np.expm1(-h) * denoised_d
    old_denoised = denoised
  return x


def sample_ddim(eps_model, x_vp, ac, timesteps, final_alpha, eta, noises):
  """DDIM (Song et al. eq. 12) on DDPM latents: ``x_vp`` unit variance, returns the last x_vp."""
  for i, t in enumerate(timesteps):
    a_t = ac[t]
    a_prev = ac[timesteps[i + 1]] if i + 1 < len(timesteps) else final_alpha
    eps = eps_model(x_vp, float(t), i)
    x0 = (x_vp - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    x_vp = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps + std * noises[i]
  return x_vp
