"""Test setup: 8 fake CPU devices and a persistent compilation cache, set before jax is imported."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from ddpm_jax import xla_flags  # noqa: E402

xla_flags.apply_defaults()  # The suite runs the XLA flags that `python -m ddpm_jax.main` runs with.

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = pathlib.Path(os.environ.get("DDPM_JAX_TEST_CACHE", pathlib.Path.home() / ".cache" / "ddpm_jax_tests"))
jax.config.update("jax_compilation_cache_dir", str(_CACHE / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

REPO = pathlib.Path(__file__).resolve().parents[1]


def _butterflies_dir() -> pathlib.Path:
    """The 101 real butterfly photos shipped beside the checkout in shared/data."""
    env = os.environ.get("DDPM_JAX_BUTTERFLIES")
    candidates = [pathlib.Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "data" / "butterflies", REPO / "shared" / "data" / "butterflies"]
    for c in candidates:
        if c.is_dir():
            return c
    pytest.fail("butterfly test images not found; set DDPM_JAX_BUTTERFLIES to ../shared/data/butterflies")


@pytest.fixture(scope="session")
def butterflies_dir() -> pathlib.Path:
    """Folder of real butterfly images (jpg, RGB and grayscale, various sizes)."""
    return _butterflies_dir()


def tiny_config(dataset: str = "", image_size: int = 8):
    """A complete config with a UNet small enough to compile and train in seconds on CPU."""
    import sys

    sys.path.insert(0, str(REPO))
    from configs import default

    config = default.get_config()
    config.data.dataset = dataset
    config.data.image_size = image_size
    config.model.ch = 8
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (image_size // 2,)
    config.model.dropout = 0.0
    config.model.num_groups = 4
    config.diffusion.num_timesteps = 100
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 5
    config.training.batch_size = 16
    config.training.num_train_steps = 6
    config.training.log_every_steps = 2
    config.training.checkpoint_every_steps = 3
    config.training.sample_every_steps = 0
    config.training.ema_decay = 0.99
    config.sampling.method = "ddim"
    config.sampling.num_steps = 5
    config.sampling.num_samples = 8
    config.sampling.num_intermediates = 3
    return config


@pytest.fixture
def tiny(butterflies_dir):
    """tiny_config() on the real butterfly photos at 8x8."""
    return tiny_config(str(butterflies_dir), 8)
