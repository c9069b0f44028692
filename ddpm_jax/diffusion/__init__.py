"""The diffusion math, pure: arrays in, arrays out; no config, no file I/O, no sharding.

schedule          the noise schedule and its closed forms (q_sample, posterior, x0/eps/v conversions)
parameterization  `Parameterization`: a schedule bound to a prediction target and x0 clipping
losses            the training objective
samplers          one reverse step per method and the `lax.scan` sampler
editing           RePaint and SDEdit, walking the same reverse steps
guidance          classifier-free guidance and label dropout
likelihood        the variational bound in bits per dimension
"""

from ddpm_jax.diffusion.parameterization import PREDICTIONS, DenoiseFn, Parameterization

__all__ = ["PREDICTIONS", "DenoiseFn", "Parameterization"]
