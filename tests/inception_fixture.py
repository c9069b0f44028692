"""pytorch-fid's FID Inception as a list of torch state-dict names and shapes, written out from torchvision's
Inception-v3 layout with pytorch-fid's FID blocks, independently of ddpm_jax.inception; and seeded random weights.

Pure numpy, so that both the tests (without torch) and `make_pytorch_fid_fixture.py` (with torch) can use it.
"""

from __future__ import annotations

import numpy as np

FIXTURE = "data/pytorch_fid_random_weights.npz"  # Relative to tests/: images and pytorch-fid's features of them.
FIXTURE_SEED = 2015
FIXTURE_SIZE = 107  # Small for CPU tests, yet the last blocks still see a 2x2 map (75 would leave 1x1).


def _inception_a(cin: int, pool: int) -> list[tuple[str, int, int, int, int]]:
    return [("branch1x1", cin, 64, 1, 1), ("branch5x5_1", cin, 48, 1, 1), ("branch5x5_2", 48, 64, 5, 5),
            ("branch3x3dbl_1", cin, 64, 1, 1), ("branch3x3dbl_2", 64, 96, 3, 3), ("branch3x3dbl_3", 96, 96, 3, 3),
            ("branch_pool", cin, pool, 1, 1)]


def _inception_b(cin: int) -> list[tuple[str, int, int, int, int]]:
    return [("branch3x3", cin, 384, 3, 3), ("branch3x3dbl_1", cin, 64, 1, 1), ("branch3x3dbl_2", 64, 96, 3, 3),
            ("branch3x3dbl_3", 96, 96, 3, 3)]


def _inception_c(cin: int, c7: int) -> list[tuple[str, int, int, int, int]]:
    return [("branch1x1", cin, 192, 1, 1), ("branch7x7_1", cin, c7, 1, 1), ("branch7x7_2", c7, c7, 1, 7),
            ("branch7x7_3", c7, 192, 7, 1), ("branch7x7dbl_1", cin, c7, 1, 1), ("branch7x7dbl_2", c7, c7, 7, 1),
            ("branch7x7dbl_3", c7, c7, 1, 7), ("branch7x7dbl_4", c7, c7, 7, 1), ("branch7x7dbl_5", c7, 192, 1, 7),
            ("branch_pool", cin, 192, 1, 1)]


def _inception_d(cin: int) -> list[tuple[str, int, int, int, int]]:
    return [("branch3x3_1", cin, 192, 1, 1), ("branch3x3_2", 192, 320, 3, 3), ("branch7x7x3_1", cin, 192, 1, 1),
            ("branch7x7x3_2", 192, 192, 1, 7), ("branch7x7x3_3", 192, 192, 7, 1), ("branch7x7x3_4", 192, 192, 3, 3)]


def _inception_e(cin: int) -> list[tuple[str, int, int, int, int]]:
    return [("branch1x1", cin, 320, 1, 1), ("branch3x3_1", cin, 384, 1, 1), ("branch3x3_2a", 384, 384, 1, 3),
            ("branch3x3_2b", 384, 384, 3, 1), ("branch3x3dbl_1", cin, 448, 1, 1), ("branch3x3dbl_2", 448, 384, 3, 3),
            ("branch3x3dbl_3a", 384, 384, 1, 3), ("branch3x3dbl_3b", 384, 384, 3, 1), ("branch_pool", cin, 192, 1, 1)]


def conv_layers() -> list[tuple[str, int, int, int, int]]:
    """(module path, in channels, out channels, kh, kw) of every BasicConv2d of the FID Inception."""
    layers = [("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3), ("Conv2d_2b_3x3", 32, 64, 3, 3),
              ("Conv2d_3b_1x1", 64, 80, 1, 1), ("Conv2d_4a_3x3", 80, 192, 3, 3)]
    blocks = [("Mixed_5b", _inception_a(192, 32)), ("Mixed_5c", _inception_a(256, 64)),
              ("Mixed_5d", _inception_a(288, 64)), ("Mixed_6a", _inception_b(288)),
              ("Mixed_6b", _inception_c(768, 128)), ("Mixed_6c", _inception_c(768, 160)),
              ("Mixed_6d", _inception_c(768, 160)), ("Mixed_6e", _inception_c(768, 192)),
              ("Mixed_7a", _inception_d(768)), ("Mixed_7b", _inception_e(1280)), ("Mixed_7c", _inception_e(2048))]
    for block, convs in blocks:
        layers += [(f"{block}.{name}", cin, cout, kh, kw) for name, cin, cout, kh, kw in convs]
    return layers


def torch_state_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of pytorch-fid's state dict with its shape, the 1008-way classifier and BN counters included."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path, cin, cout, kh, kw in conv_layers():
        shapes[f"{path}.conv.weight"] = (cout, cin, kh, kw)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{path}.bn.{leaf}"] = (cout,)
        shapes[f"{path}.bn.num_batches_tracked"] = ()
    shapes["fc.weight"], shapes["fc.bias"] = (1008, 2048), (1008,)
    return shapes


def random_torch_state(seed: int = FIXTURE_SEED) -> dict[str, np.ndarray]:
    """Seeded random weights in torch layout: He-scaled kernels and non-trivial BatchNorm statistics."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in torch_state_shapes().items():
        if name.endswith("conv.weight"):
            value = rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2.0 / np.prod(shape[1:])))
        elif name.endswith(("bn.weight", "running_var")):
            value = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif name.endswith(("bn.bias", "running_mean")):
            value = 0.1 * rng.standard_normal(shape, np.float32)
        elif name.endswith("num_batches_tracked"):
            value = np.zeros(shape, np.int64)
        else:  # The classifier, which pool3 features never use.
            value = np.zeros(shape, np.float32)
        state[name] = value
    return state
