"""The FID Inception: the torch -> Flax key mapping, layer semantics against torch's, features against pytorch-fid's
own (random weights, fixture made by make_pytorch_fid_fixture.py), the weights file round trip and its errors."""

import pathlib

import jax
import numpy as np
import pytest
from flax import traverse_util
from inception_fixture import FIXTURE, FIXTURE_SIZE, random_torch_state, torch_state_shapes

from ddpm_jax import parallel
from ddpm_jax.errors import ConfigError
from ddpm_jax.evaluation import fid_evaluator, inception


def test_key_mapping_covers_exactly_the_flax_tree():
    torch_state = {k: np.zeros(s, np.float32) for k, s in torch_state_shapes().items()}
    mapped = inception.torch_to_flax(torch_state)
    expected = inception.expected_shapes()
    assert {k: v.shape for k, v in mapped.items()} == expected
    # 94 convolutions, each with a kernel, a scale, a bias, a mean and a variance.
    assert len(expected) == 5 * 94
    assert mapped["params/Mixed_6b/branch7x7_2/conv/kernel"].shape == (1, 7, 128, 128)  # torch (128, 128, 1, 7)
    assert mapped["batch_stats/Mixed_7c/branch_pool/bn/var"].shape == (192,)
    inception.check_arrays(mapped, "mapped")
    with pytest.raises(ValueError, match="unexpected key 'Mixed_5b.branch1x1.conv.bias'"):
        inception.torch_to_flax({**torch_state, "Mixed_5b.branch1x1.conv.bias": np.zeros(64)})
    del mapped["params/Mixed_5b/branch1x1/conv/kernel"]
    with pytest.raises(ValueError, match="1 missing"):
        inception.check_arrays(mapped, "mapped")


def _torch_conv_bn_relu(x, w, gamma, beta, mean, var, padding):
    """torch's Conv2d (cross-correlation, NCHW, symmetric zero padding) + BatchNorm2d(eps=1e-3, eval) + ReLU."""
    ph, pw = padding
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    kh, kw = w.shape[2:]
    ho, wo = x.shape[2] - kh + 1, x.shape[3] - kw + 1
    y = np.zeros((x.shape[0], w.shape[0], ho, wo))
    for i in range(kh):
        for j in range(kw):
            y += np.einsum("bchw,oc->bohw", x[:, :, i:i + ho, j:j + wo], w[:, :, i, j])
    y = (y - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-3) * gamma[:, None, None] + beta[:, None, None]
    return np.maximum(y, 0)


def test_conv_weights_map_to_the_same_layer():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 3, 1, 7)).astype(np.float32)  # An asymmetric kernel catches an H/W mix-up.
    bn = [rng.uniform(0.5, 1.5, 5), rng.normal(size=5), rng.normal(size=5), rng.uniform(0.5, 1.5, 5)]
    torch_state = {"layer.conv.weight": w, **{f"layer.bn.{k}": v.astype(np.float32) for k, v in
                                              zip(("weight", "bias", "running_mean", "running_var"), bn, strict=True)}}
    variables = traverse_util.unflatten_dict(inception.torch_to_flax(torch_state), sep="/")
    x = rng.standard_normal((2, 6, 9, 3)).astype(np.float32)
    layer = {collection: tree["layer"] for collection, tree in variables.items()}
    got = inception.BasicConv2d(5, (1, 7), padding=(0, 3)).apply(layer, x)
    want = _torch_conv_bn_relu(x.transpose(0, 3, 1, 2), w, *bn, padding=(0, 3)).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _torch_bilinear(x, size):
    """torch F.interpolate(mode='bilinear', align_corners=False) on (H, W) arrays, written out."""
    def weights(n_in):
        src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        m = np.zeros((size, n_in))
        np.add.at(m, (np.arange(size), lo), 1 - (src - lo))
        np.add.at(m, (np.arange(size), hi), src - lo)
        return m
    return weights(x.shape[0]) @ x @ weights(x.shape[1]).T


@pytest.mark.parametrize("size_in", [8, 32, 450])  # Up- and down-sampling (torch does not anti-alias).
def test_resize_is_torch_bilinear_without_antialiasing(size_in):
    x = np.random.default_rng(size_in).uniform(-1, 1, (size_in, size_in)).astype(np.float32)
    got = jax.image.resize(x[None, :, :, None], (1, 299, 299, 1), "bilinear", antialias=False)[0, :, :, 0]
    np.testing.assert_allclose(got, _torch_bilinear(x, 299), atol=1e-4)  # float32 sample positions


def test_block_pools_ignore_padding():
    x = np.random.default_rng(1).normal(size=(1, 4, 5, 2)).astype(np.float32)
    got = inception._avg_pool_3x3(x)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    counts = np.pad(np.ones_like(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
    sums, n = (sum(a[:, i:i + 4, j:j + 5] for i in range(3) for j in range(3)) for a in (padded, counts))
    np.testing.assert_allclose(got, sums / n, rtol=1e-6)  # Corners average 4 pixels, edges 6, as in TF.


@pytest.fixture(scope="module")
def random_weights():
    """Seeded random weights, mapped from torch layout the way the converter maps the real ones."""
    return traverse_util.unflatten_dict(inception.torch_to_flax(random_torch_state()), sep="/")


def test_features_match_pytorch_fid_and_survive_the_weights_file(random_weights, tmp_path):
    fixture = np.load(pathlib.Path(__file__).parent / FIXTURE)
    mesh = parallel.make_mesh(jax.devices()[:1])  # One device: the 8 fake ones would only split 2 cores 8 ways.
    net = inception.InceptionV3(resize=FIXTURE_SIZE)
    direct = fid_evaluator.FeatureExtractor(net, random_weights, mesh, batch_size=2, name="random")
    features = direct(fixture["images"])
    assert features.shape == (2, inception.FEATURE_DIM) and features.dtype == np.float32
    # pytorch-fid's own network on the same weights and photos: float32 rounding only.
    np.testing.assert_allclose(features, fixture["features"], rtol=1e-4, atol=1e-4)

    path = inception.save_variables(str(tmp_path / "w.npz"), random_weights)
    loaded = fid_evaluator.FeatureExtractor(net, inception.load_variables(path), mesh, batch_size=2, name="loaded")
    np.testing.assert_array_equal(loaded(fixture["images"]), features)
    with pytest.raises(ValueError, match="uint8"):  # Floats in [-1, 1] are a classic FID bug: refused.
        direct(fixture["images"].astype(np.float32) / 127.5 - 1)


def test_missing_or_wrong_weights_give_one_line_with_the_url(tmp_path):
    for path in (tmp_path / "absent.npz", tmp_path):
        with pytest.raises(ConfigError, match="no FID Inception weights") as e:
            inception.load_variables(str(path))
        assert inception.FID_WEIGHTS_URL in str(e.value) and "convert_inception_weights" in str(e.value)
        assert "\n" not in str(e.value)
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ConfigError, match="is not a .npz file"):
        inception.check_weights_file(str(tmp_path / "text.npz"))
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ConfigError, match="does not hold the FID Inception variables"):
        inception.load_variables(str(tmp_path / "other.npz"))
