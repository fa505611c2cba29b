"""Diffusion: noise schedules (`schedules`), on-device sampling loops (`samplers`),
classifier-free guidance (`guidance`) and the edit program built from them (`editing`).

Typical use, inside one `jax.jit`::

    config = schedules.from_scheduler_config(model_dir)
    schedule = schedules.make("discrete", 100, config)
    eps_fn = guidance.two_scale_eps_fn(unet_fn, image_latents, text_emb, null_emb, 7.5, 1.5)
    latents = samplers.sample(eps_fn, noise, schedule, key, method="euler_ancestral")
"""

from jip2p.diffusion import editing, guidance, samplers, schedules

__all__ = ["editing", "guidance", "samplers", "schedules"]
