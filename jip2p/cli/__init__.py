"""Thin console-script entry points (``jip2p-…``); the work lives in the library modules.

Every entry point runs through `run` (`jip2p.errors.run`, re-exported here), so a problem the user
can fix (any `Jip2pError`) ends with one line naming it and exit status 2, never a traceback; a
`Jip2pWarning` (an input used other than as given) prints as one line ``prog: warning: …``.
"""

from jip2p.errors import run  # noqa: F401

# --vae, on every console script that loads a model folder: one help text.
VAE_HELP = ("a VAE in the model's VAE's place (e.g. SDXL's fp16-fix VAE): a VAE folder "
            "(config.json of an AutoencoderKL + weights) or a model folder holding vae/; its "
            "latent channels must be the model's")
