"""The default configuration: every key ddpm_jax reads, with its meaning, and DDPM's CIFAR-10 values where they apply.

Experiment configs (the files in the repository's configs/) start from `get_config()` and override a few fields; any
key can also be changed from the command line: `--config.training.batch_size=64`. config_checks rejects keys that
are not here, so this module is the list of what exists.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import pathlib
from typing import Any

import ml_collections

from ddpm_jax.errors import ConfigError


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
    # Data whose decoded size per host exceeds this is prepared once into a cache of ArrayRecord shards and streamed
    # from it (0: always; --mode=prepare builds it ahead). Caches live in cache_dir (a folder or gs://bucket/dir).
    data.in_memory_max_gib = 4.0
    data.cache_dir = "~/.cache/ddpm_jax/datasets"
    data.num_workers = 2  # Threads that gather the next batches ahead of the train step (bounded: 2 per thread).
    # Names of the classes for captions, for data whose labels are bare numbers (IDX files); () keeps the data's own.
    data.class_names = ()

    config.model = model = ml_collections.ConfigDict()
    model.ch = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.num_groups = 32
    model.dtype = "float32"  # Compute dtype of the UNet; parameters stay float32.
    # 0: unconditional. K > 0: conditioned on the dataset's K class labels (sub-folder names, IDX/TFDS/parquet labels).
    model.num_classes = 0

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
    # K optimizer steps per compiled call (a lax.scan); K uint8 batches sit on device at once, the state is not copied.
    training.steps_per_dispatch = 1
    # Weights of the per-timestep loss: none (DDPM's simple loss) | min_snr (Hang et al. 2023: min(SNR, gamma) on the
    # x0 error, converted to the prediction target) | p2 (Choi et al. 2022: 1 / (1 + SNR)^p2_gamma on the eps error).
    training.loss_weighting = "none"
    training.min_snr_gamma = 5.0
    training.p2_gamma = 1.0
    # Class-conditional models: fraction of examples trained with the null label, so that one network also learns the
    # unconditional model that classifier-free guidance needs (Ho & Salimans 2022 use 0.1 to 0.2).
    training.label_dropout = 0.1
    # FID/KID (see eval.inception_weights) of training.fid_num_samples EMA samples every N steps and at the end; 0: off.
    training.fid_every_steps = 0
    training.fid_num_samples = 5_000  # Fewer than --mode=fid's eval.fid_num_samples: compare only equal counts.

    config.sampling = sampling = ml_collections.ConfigDict()
    # ddpm: ancestral, all T steps. The others take sampling.num_steps steps: ddim; heun (Karras et al.'s 2nd-order
    # ODE step, 2 network evaluations a step); dpm_solver++ (DPM-Solver++ multistep, order solver_order); unipc (UniPC
    # bh2 predictor-corrector, order solver_order). README "Sampling" has the measured quality per step count.
    sampling.method = "ddpm"
    sampling.num_steps = 100  # Steps of every method but ddpm.
    # Which timesteps they visit (diffusers' names): linspace (T-1 .. 0 evenly) | leading | trailing | karras.
    sampling.timestep_spacing = "linspace"
    sampling.solver_order = 2  # dpm_solver++: 1, 2 (2M) or 3 (3M); unipc: 1 or 2.
    sampling.eta = 0.0  # DDIM stochasticity: 0 is deterministic, 1 matches DDPM's posterior variance.
    sampling.num_samples = 64
    sampling.batch_size = 256  # Samples per compiled call (rounded to a multiple of the device count).
    sampling.clip_denoised = True  # Clip the predicted x0 to [-1, 1] at every step.
    sampling.num_intermediates = 10  # Frames of the denoising strip (x_t as noise becomes an image); 0: none.
    # Class-conditional models: classifier-free guidance weight w, eps = (1 + w) eps(x, c) - w eps(x, null); 0 is
    # plain conditional sampling, larger w gives more typical, less diverse samples.
    sampling.guidance_scale = 0.0
    # Class-conditional models: -1 samples a per-class grid (one row per class), k >= 0 samples only class k.
    sampling.class_label = -1

    # --mode=inpaint (RePaint) and --mode=edit (SDEdit) take their reverse steps from sampling.method, num_steps, eta,
    # clip_denoised and batch_size. Their images: a folder or image files separated by commas; "" takes the first
    # num_images images of data.dataset. Images are resized and centre-cropped as for training.
    config.inpaint = inpaint = ml_collections.ConfigDict()
    inpaint.images = ""
    inpaint.num_images = 8
    # What to fill: center | half (a random side per image) | half_left | half_right | half_top | half_bottom | strokes,
    # or a PNG mask (or a folder of them, one per image in name order) where white keeps and black is filled.
    inpaint.mask = "center"
    inpaint.jump_length = 10  # RePaint's j: how many steps the sampler goes back up before descending again.
    inpaint.resample_count = 10  # RePaint's r: times each stretch of jump_length steps is run; 1: no going back.
    inpaint.seed = 0  # Masks (half, strokes) and sampling noise.

    config.edit = edit = ml_collections.ConfigDict()
    edit.images = ""
    edit.num_images = 8
    edit.strength = 0.5  # Fraction of the T noising steps done before denoising back: 0 keeps the input, 1 ignores it.
    # > 0: the images already carry Gaussian noise of this std (pixel values in [-1, 1]); they are denoised, and
    # strength is not used.
    edit.noise_sigma = 0.0
    edit.seed = 0  # Noise.

    config.eval = evaluation = ml_collections.ConfigDict()
    # --mode=eval, bits per dimension: the variational bound of the EMA weights, all T terms for every image.
    evaluation.split = "test"  # Held-out split of data.dataset (a folder needs a test/ subfolder).
    evaluation.num_examples = 0  # Images of the split to evaluate; 0: all (CIFAR-10 test: 10,000, as in DDPM).
    evaluation.batch_size = 256  # Images per compiled call (each call runs T network passes on them).
    evaluation.variance = "fixed_large"  # p's fixed variance in the reported bound: fixed_large (beta_t) | fixed_small
    # Clip the predicted x0 to [-1, 1] in p's mean, as DDPM's and improved-diffusion's bpd loops do (still a valid
    # bound; without it an eps-model's last step on the cosine schedule can cost bits/dim).
    evaluation.clip_denoised = True
    # --mode=fid (and training.fid_every_steps): FID and KID on Inception pool3 features, as pytorch-fid. The weights
    # are pytorch-fid's .pth converted by `python -m ddpm_jax.tools.convert_inception_weights` (README: FID and KID).
    evaluation.inception_weights = "~/.cache/ddpm_jax/pt_inception-2015-12-05.npz"
    evaluation.fid_cache_dir = "~/.cache/ddpm_jax/fid_stats"  # Cached training-data statistics (mu, sigma, KID set).
    evaluation.fid_num_samples = 50_000  # FID falls as the count grows: only scores at equal counts compare.
    evaluation.fid_batch_size = 200  # Images per Inception call (rounded up to a multiple of the device count).
    return config


def load_config_file(path: str | os.PathLike[str]) -> ml_collections.ConfigDict:
    """The config of a config file (a module with get_config()), loaded by path as `--config=PATH` would load it.

    Lets an experiment config build on another one beside it without putting the configs folder on sys.path.
    """
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config=configs/NAME.py")
    spec = importlib.util.spec_from_file_location(f"ddpm_jax_config_file_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config() function")
    return module.get_config()


def flat_keys(config: Any, prefix: str = "") -> set[str]:
    """Every leaf key of a (nested) config, dotted: {"seed", "data.dataset", ...}."""
    keys = set()
    for k, v in config.items():
        name = f"{prefix}{k}"
        if isinstance(v, ml_collections.ConfigDict | dict):
            keys |= flat_keys(v, name + ".")
        else:
            keys.add(name)
    return keys


def unknown_key_message(key: str) -> str:
    """'unknown config key K', with the closest key of the default config as a hint when there is one."""
    close = difflib.get_close_matches(key, sorted(flat_keys(get_config())), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"unknown config key {key}{hint}"
