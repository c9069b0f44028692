"""Smithsonian butterflies at 128x128 with the UNet of the diffusers 'train a diffusion model' tutorial.

Channels (128, 128, 256, 256, 512, 512), 2 ResNet blocks per level, attention at 8x8: 113.7 M parameters.
Offline, point data.dataset at a local folder: --config.data.dataset=/path/to/butterflies
"""

import ml_collections

from ddpm_jax import config as default


def get_config() -> ml_collections.ConfigDict:
    """Returns the butterflies config."""
    config = default.get_config()
    config.data.dataset = "huggingface:huggan/smithsonian_butterflies_subset"
    config.data.image_size = 128

    config.model.ch = 128
    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (8,)
    config.model.dropout = 0.0

    config.optim.learning_rate = 1e-4
    config.optim.warmup_steps = 500

    config.training.batch_size = 16
    config.training.num_train_steps = 30_000
    config.training.checkpoint_every_steps = 2_000
    config.training.sample_every_steps = 5_000
    config.training.ema_decay = 0.9995

    config.sampling.method = "ddim"
    config.sampling.num_steps = 100
    config.sampling.num_samples = 16
    return config
