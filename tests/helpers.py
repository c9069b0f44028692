"""Helpers shared by the tests (fixtures live in conftest.py): the tiny config, exact Gaussian denoisers, the CLI.

Test files import from here, never from each other.
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import struct
import subprocess
import sys

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import reference_run
from PIL import Image
from tensorboardX.crc32c import crc32c
from tensorboardX.proto import event_pb2

from ddpm_jax import config as default_config
from ddpm_jax import parallel
from ddpm_jax.diffusion import schedule as sch
from ddpm_jax.diffusion.parameterization import Parameterization
from ddpm_jax.evaluation import fid_evaluator

REPO = pathlib.Path(__file__).resolve().parents[1]
CACHE = pathlib.Path(os.environ.get("DDPM_JAX_TEST_CACHE", pathlib.Path.home() / ".cache" / "ddpm_jax_tests"))
CLASSES = ("a_caltech", "b_smithsonian", "c_caltech")  # conftest's class_tree
MU, STD = 0.3, 0.5  # The Gaussian data of the exact denoisers: every pixel i.i.d. N(MU, STD^2).


def tiny_config(dataset: str = "", image_size: int = 8):
    """A complete config with a UNet small enough to compile and train in seconds on CPU."""
    config = default_config.get_config()
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


def conditional_config(dataset: str):
    """tiny_config, class-conditional on the 3 classes of conftest's class_tree, skipping non-finite updates (so the
    skip test shares the compiled step of every other conditional test)."""
    config = tiny_config(dataset, 8)
    config.model.num_classes = 3
    config.training.skip_nonfinite_updates = True
    return config


def gaussian_eps_denoiser(s: sch.Schedule):
    """E[eps | x_t] for x_0 ~ N(MU, STD^2): sqrt(1-ab) (x_t - sqrt(ab) MU) / (ab STD^2 + 1 - ab)."""
    def denoise(x, t):
        ab = sch.extract(s.alphas_cumprod, t, x.shape)
        return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * MU) / (ab * STD**2 + 1 - ab)
    return denoise


def gaussian_output(s: sch.Schedule, prediction: str):
    """The same optimal denoiser expressed as an eps, x0 or v prediction."""
    eps_fn = gaussian_eps_denoiser(s)

    def denoise(x, t):
        eps = eps_fn(x, t)
        x0 = sch.predict_x0_from_eps(s, x, t, eps)
        return {"eps": eps, "x0": x0, "v": sch.predict_v(s, x0, t, eps)}[prediction]
    return denoise


def parameterization(schedule: str = "linear", num_timesteps: int = 1000, prediction: str = "eps",
                     clip_denoised: bool = False) -> Parameterization:
    """A Parameterization of a named schedule (unclipped by default: the Gaussian data leave [-1, 1])."""
    return Parameterization(sch.make_schedule(schedule, num_timesteps), prediction, clip_denoised)


class TinyFeatures(nn.Module):
    """A 16-d feature network standing in for Inception: FID's pipeline without the 100 MB of weights."""

    @nn.compact
    def __call__(self, images):
        """uint8 images -> 16 features."""
        x = nn.Conv(16, (3, 3), strides=2)(images.astype(jnp.float32) / 127.5 - 1.0)
        return jnp.mean(jnp.tanh(x), axis=(1, 2))


def tiny_extractor(mesh=None, name: str = "tiny16"):
    """TinyFeatures as an evaluation.fid_evaluator.FeatureExtractor on the mesh (all devices by default)."""
    net = TinyFeatures()
    variables = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3), jnp.uint8))
    return fid_evaluator.FeatureExtractor(net, variables, mesh or parallel.make_mesh(), batch_size=12, name=name)


CLI_FLAGS = reference_run.MODEL_FLAGS  # The CLI tests' model, so that their programs are shared through the cache.


def run_main(workdir, *flags, devices: int = 2, timeout: int = 600, cwd=REPO,
             config: str = "quickstart.py") -> subprocess.CompletedProcess:
    """Runs `python -m ddpm_jax.main --config=configs/<config>` in a subprocess; returns it finished."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO))
    config = os.path.relpath(REPO / "configs" / config, cwd)
    cmd = [sys.executable, "-m", "ddpm_jax.main", f"--config={config}", f"--workdir={workdir}", *flags]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def one_error_line(stderr: str) -> str:
    """The single `error: ...` line of a failed CLI run (asserts there is exactly one)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-2000:]
    return lines[0]


def flat_params(params) -> dict[str, np.ndarray]:
    """Parameters as {path: numpy array} (gathered from every process)."""
    return {jax.tree_util.keystr(k): parallel.fetch(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


@functools.partial(jax.jit, static_argnums=(1, 2))
def perturbed(params, scale: float = 0.05, seed: int = 3):
    """Every parameter moved off its (partly zero) initial value, so outputs depend on every input.

    One normal draw over all parameters at once: a draw per leaf costs XLA:CPU seconds of compile per leaf.
    """
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    return unravel(flat + scale * jax.random.normal(jax.random.PRNGKey(seed), flat.shape, flat.dtype))


def assert_same_tree(a, b) -> None:
    """Bitwise equality of two pytrees' leaves (train states, parameters)."""
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def image_mode(path) -> str:
    """The PIL mode of an image file ("RGB", "L", ...)."""
    with Image.open(path) as img:
        return img.mode


def absl_warnings(caplog) -> list[str]:
    """The absl WARNING messages pytest's caplog captured."""
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "absl"]


def _masked_crc(data):
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path):
    """Parses a TFRecord event file (length, masked CRC, Event proto, masked CRC) without TensorFlow."""
    events = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        assert length_crc == _masked_crc(header)
        payload = data[pos + 12 : pos + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        assert payload_crc == _masked_crc(payload)
        events.append(event_pb2.Event.FromString(payload))
        pos += 16 + length
    assert pos == len(data)
    return events


def sharded_and_unsharded_grads(loss, params, *batched):
    """Gradients of loss(params, *batched) w.r.t. params: with the batch split over every device under shard_map
    (per-device losses pmean-ed, as the train step does), and on one device. A custom VJP that does not all-reduce
    its parameters' gradients (e.g. a hand-written one whose parameters are not marked varying) shows as a
    difference."""
    mesh = parallel.make_mesh()
    data = jax.sharding.PartitionSpec(parallel.DATA_AXIS)

    def sharded_loss(params, *batched):
        return jax.lax.pmean(loss(params, *batched), parallel.DATA_AXIS)

    sharded = jax.shard_map(jax.grad(sharded_loss), mesh=mesh, in_specs=(jax.sharding.PartitionSpec(),)
                            + (data,) * len(batched), out_specs=jax.sharding.PartitionSpec())
    return jax.jit(sharded)(params, *batched), jax.grad(loss)(params, *batched)
