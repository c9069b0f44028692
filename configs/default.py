"""Default configuration: every key ddpm_jax reads, with the DDPM paper's CIFAR-10 values where they apply.

Experiment configs import this and override a few fields. Any key can be changed from the command line:
`--config.training.batch_size=64`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Returns the default ConfigDict."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = data = ml_collections.ConfigDict()
    # A TFDS name (cifar10), huggingface:OWNER/NAME, or a path to a local folder of images (or of IDX files).
    data.dataset = "cifar10"
    data.split = "train"
    data.image_size = 32
    data.random_flip = True
    data.tfds_data_dir = ""  # "" means TFDS's default (~/tensorflow_datasets).

    config.model = model = ml_collections.ConfigDict()
    model.ch = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.num_groups = 32
    model.dtype = "float32"  # Compute dtype of the UNet; parameters stay float32.

    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.schedule = "linear"  # linear | cosine
    diffusion.num_timesteps = 1000
    diffusion.beta_start = 1e-4
    diffusion.beta_end = 0.02
    diffusion.prediction = "eps"  # What the network predicts and the MSE is taken on: eps | x0 | v.

    config.optim = optim = ml_collections.ConfigDict()
    optim.optimizer = "adam"  # adam | adamw
    optim.learning_rate = 2e-4
    optim.warmup_steps = 5000
    optim.b1 = 0.9
    optim.b2 = 0.999
    optim.eps = 1e-8
    optim.weight_decay = 0.0  # Used by adamw only.
    optim.grad_clip_norm = 1.0  # Global-norm clipping; 0 turns it off.

    config.training = training = ml_collections.ConfigDict()
    training.batch_size = 128  # Global batch, split over all devices of all hosts.
    training.num_train_steps = 800_000
    training.log_every_steps = 100
    training.checkpoint_every_steps = 10_000
    training.sample_every_steps = 50_000  # 0 turns off sample grids during training.
    training.keep_checkpoints = 3
    training.ema_decay = 0.9999
    # A non-finite loss stops training (the last checkpoint is kept); True skips such updates and counts them.
    training.skip_nonfinite_updates = False

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.method = "ddpm"  # ddpm (ancestral, all T steps) | ddim (sampling.num_steps respaced steps)
    sampling.num_steps = 100  # DDIM steps.
    sampling.eta = 0.0  # DDIM stochasticity: 0 is deterministic, 1 matches DDPM's posterior variance.
    sampling.num_samples = 64
    sampling.batch_size = 256  # Samples per compiled call (rounded to a multiple of the device count).
    sampling.clip_denoised = True  # Clip the predicted x0 to [-1, 1] at every step.
    sampling.num_intermediates = 10  # Frames of the denoising strip (x_t as noise becomes an image); 0: none.
    return config
