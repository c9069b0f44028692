"""The default configuration: every key ddpm_jax reads. Its keys and their meanings are in ddpm_jax/config.py.

python -m ddpm_jax.main --config=configs/default.py --workdir=DIR trains DDPM's CIFAR-10 model.
"""

from ddpm_jax.config import get_config

__all__ = ["get_config"]
