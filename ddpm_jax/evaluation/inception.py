"""The FID Inception-v3 in Flax: 2048-d pool3 features of uint8 images, as pytorch-fid and TTUR compute them.

This is the network of TensorFlow's `inception-2015-12-05` graph, which the FID papers use, in the form pytorch-fid
ported it: torchvision's Inception-v3 layout with BatchNorm eps 1e-3, average pools inside the Mixed blocks that
ignore padded zeros (TensorFlow's SAME average pool), and a max pool in the pooling branch of the last block
(Mixed_7c). Images are resized to 299x299 bilinearly (half-pixel centres, no anti-aliasing, as torch's
`F.interpolate(..., mode="bilinear", align_corners=False)` in pytorch-fid) and scaled from uint8 to [-1, 1].

Weights come from a `.npz` file that `python -m ddpm_jax.tools.convert_inception_weights` writes from pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth`. Its keys are the flattened Flax variables, `<collection>/<module path>/<leaf>`;
`torch_to_flax` maps pytorch-fid's state-dict names onto them:

    torch key                         shape             npz key                                 shape
    <path>.conv.weight                (O, I, kh, kw)    params/<path>/conv/kernel               (kh, kw, I, O)
    <path>.bn.weight                  (C,)              params/<path>/bn/scale                  (C,)
    <path>.bn.bias                    (C,)              params/<path>/bn/bias                   (C,)
    <path>.bn.running_mean            (C,)              batch_stats/<path>/bn/mean              (C,)
    <path>.bn.running_var             (C,)              batch_stats/<path>/bn/var               (C,)
    fc.weight, fc.bias, AuxLogits.*, *.num_batches_tracked            dropped (not needed for pool3 features)

where <path> is the module path with dots turned into slashes (`Mixed_5b.branch5x5_1` -> `Mixed_5b/branch5x5_1`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ddpm_jax import fileio, pixels
from ddpm_jax.errors import ConfigError

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
CONVERT_COMMAND = "pip install torch && python -m ddpm_jax.tools.convert_inception_weights"
DEFAULT_WEIGHTS = "~/.cache/ddpm_jax/pt_inception-2015-12-05.npz"
FEATURE_DIM = 2048
INPUT_SIZE = 299
_COLLECTIONS = ("params", "batch_stats")
_DROPPED_PREFIXES = ("fc.", "AuxLogits.")
_LEAVES = {
    ("conv", "weight"): ("params", "conv", "kernel"),
    ("bn", "weight"): ("params", "bn", "scale"),
    ("bn", "bias"): ("params", "bn", "bias"),
    ("bn", "running_mean"): ("batch_stats", "bn", "mean"),
    ("bn", "running_var"): ("batch_stats", "bn", "var"),
}


# --------------------------------------------------------------------------------------------------------------------
# The network.


class BasicConv2d(nn.Module):
    """Convolution without bias, BatchNorm (eps 1e-3, running statistics) and ReLU, with torch-style padding."""

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """NHWC float32 in, NHWC float32 out."""
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel_size, strides=(self.strides, self.strides),
                    padding=((ph, ph), (pw, pw)), use_bias=False, precision=jax.lax.Precision.HIGHEST, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jnp.ndarray) -> jnp.ndarray:
    # TensorFlow's SAME average pool divides by the number of real pixels under the window, not by 9.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x: jnp.ndarray) -> jnp.ndarray:
    return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1x1, 5x5, double 3x3 and average-pool branches at 35x35."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Concatenates the four branches along channels."""
        b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: the 35x35 -> 17x17 reduction."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Concatenates the strided 3x3, strided double 3x3 and max-pool branches."""
        b3 = BasicConv2d(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..6e: factorised 7x7 branches at 17x17."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Concatenates the 1x1, 7x7, double 7x7 and average-pool branches."""
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: the 17x17 -> 8x8 reduction."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Concatenates the strided 3x3, strided 7x7x3 and max-pool branches."""
        b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b/7c at 8x8; the FID graph pools with an average in 7b and with a max in 7c."""

    pool: str = "avg"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Concatenates the 1x1, split 3x3, split double 3x3 and pool branches."""
        b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.pool == "max":  # Padding takes -inf here, so the border windows see only real pixels, as in TF.
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """uint8 images (B, H, W, 3) -> pool3 features (B, 2048), float32; `resize` is 299 for real FID."""

    resize: int = INPUT_SIZE

    @nn.compact
    def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
        """Resizes, scales to [-1, 1], runs the network and averages the last 8x8 map."""
        x = pixels.to_model_range(images)
        b, h, w, c = x.shape
        if (h, w) != (self.resize, self.resize):
            # Bilinear is affine-equivariant, so scaling before resizing equals pytorch-fid's resize-then-scale.
            x = jax.image.resize(x, (b, self.resize, self.resize, c), "bilinear", antialias=False)
        x = BasicConv2d(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


# --------------------------------------------------------------------------------------------------------------------
# Weights: the .npz format, the torch -> Flax key mapping, loading.


@functools.lru_cache(maxsize=1)
def expected_shapes() -> dict[str, tuple[int, ...]]:
    """The npz key -> shape of every variable the network needs (traced from the architecture, no weights)."""
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.uint8)
    shapes = jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0), x)
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}


def torch_to_flax(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Maps a pytorch-fid state dict (names -> numpy arrays) onto npz keys, as in the module docstring's table."""
    out: dict[str, np.ndarray] = {}
    for name, value in state_dict.items():
        if name.startswith(_DROPPED_PREFIXES) or name.endswith(".num_batches_tracked"):
            continue
        *path, layer, leaf = name.split(".")
        if not path or (layer, leaf) not in _LEAVES:
            raise ValueError(f"unexpected key {name!r} in the Inception state dict")
        collection, layer, flax_leaf = _LEAVES[(layer, leaf)]
        value = np.asarray(value, np.float32)
        if flax_leaf == "kernel":
            value = value.transpose(2, 3, 1, 0)  # torch OIHW -> Flax HWIO
        out["/".join([collection, *path, layer, flax_leaf])] = value
    return out


def check_arrays(arrays: Mapping[str, np.ndarray], source: str) -> None:
    """Raises ValueError unless `arrays` holds exactly the network's variables with the right shapes."""
    expected = expected_shapes()
    missing, unexpected = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: {len(missing)} missing Inception variables (e.g. {missing[:2]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    for key, shape in expected.items():
        if tuple(arrays[key].shape) != shape:
            raise ValueError(f"{source}: {key} has shape {tuple(arrays[key].shape)}, the network needs {shape}")


def save_variables(path: str, variables: Mapping[str, Any]) -> str:
    """Writes Flax variables {'params': ..., 'batch_stats': ...} as the flat float32 .npz the loader reads."""
    flat = traverse_util.flatten_dict({c: variables[c] for c in _COLLECTIONS}, sep="/")
    arrays = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    return fileio.write_npz(os.path.abspath(os.path.expanduser(path)), arrays, compress=False)


def _weights_help(path: str) -> str:
    return (f"download {FID_WEIGHTS_URL} and convert it with `{CONVERT_COMMAND} --pth=FILE.pth --out={path}` "
            f"(or set eval.inception_weights to a converted .npz)")


def check_weights_file(path: str) -> str:
    """Raises ConfigError (one line: what is wrong, the URL and the conversion command) unless `path` is a weights file.

    Only the zip directory is read, so this is cheap enough to run before anything compiles.
    """
    shown = path or DEFAULT_WEIGHTS
    full = os.path.expanduser(shown)
    if not os.path.isfile(full):
        raise ConfigError(f"eval.inception_weights: no FID Inception weights at {shown}; {_weights_help(shown)}")
    try:
        with zipfile.ZipFile(full) as z:
            names = {n[: -len(".npy")] for n in z.namelist()}
    except (zipfile.BadZipFile, OSError) as e:
        raise ConfigError(f"eval.inception_weights: {shown} is not a .npz file ({e}); {_weights_help(shown)}") from e
    if names != set(expected_shapes()):
        raise ConfigError(f"eval.inception_weights: {shown} does not hold the FID Inception variables "
                          f"({len(names)} arrays); {_weights_help(shown)}")
    return full


def load_variables(path: str) -> dict[str, Any]:
    """Reads a converted weights .npz into Flax variables {'params', 'batch_stats'}; ConfigError if unusable."""
    full = check_weights_file(path)
    with np.load(full) as npz:
        arrays = {k: npz[k] for k in npz.files}
    try:
        check_arrays(arrays, full)
    except ValueError as e:
        raise ConfigError(f"eval.inception_weights: {e}; {_weights_help(path)}") from e
    return traverse_util.unflatten_dict(arrays, sep="/")


def file_digest(path: str, length: int = 12) -> str:
    """The first `length` hex digits of the file's SHA-256: names the weights in cached reference statistics."""
    h = hashlib.sha256()
    with open(os.path.expanduser(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]
