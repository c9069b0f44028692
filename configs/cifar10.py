"""CIFAR-10 with the settings of Ho et al. (2020): 35.7 M-parameter UNet, batch 128, 800k steps, lr 2e-4."""

import ml_collections

from ddpm_jax import config as default


def get_config() -> ml_collections.ConfigDict:
    """Returns the DDPM CIFAR-10 config (the defaults are already the paper's)."""
    config = default.get_config()
    config.data.dataset = "cifar10"
    config.data.image_size = 32
    return config
