"""Class-conditional training with classifier-free guidance: labels from real data, the conditional UNet, label
dropout, 8 devices vs 1, the guidance formula, and a conditional train + sample through main."""

import gzip
import json
import os
import pathlib
import re
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image
from test_main import run_main

from ddpm_jax import checkpointing, conditioning, config_checks, generation, parallel, train
from ddpm_jax import input_pipeline as ip
from ddpm_jax import schedule as sch
from ddpm_jax.models import unet

FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("a_caltech", "b_smithsonian", "c_caltech")


@pytest.fixture(scope="module")
def class_tree(tmp_path_factory, butterflies_dir) -> pathlib.Path:
    """Real butterfly photos linked into one sub-folder per class, plus a hidden folder that must be ignored."""
    root = tmp_path_factory.mktemp("classes")
    caltech = sorted((butterflies_dir / "caltech101").glob("*.jpg"))
    members = {CLASSES[0]: caltech[:6], CLASSES[1]: sorted((butterflies_dir / "smithsonian").glob("*.jpg"))[:5],
               CLASSES[2]: caltech[6:13], ".ipynb_checkpoints": caltech[20:22]}
    for name, files in members.items():
        (root / name).mkdir()
        for f in files:
            os.symlink(f, root / name / f.name)
    return root


@jax.jit
def _perturbed(params, scale=0.05):
    """Moves every parameter off its (partly zero) initial value, so outputs depend on every input."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    return treedef.unflatten([v + scale * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys, strict=True)])


# --------------------------------------------------------------------------------------------------------------------
# Labels from the data.


def test_labels_from_sub_folder_names(class_tree, tmp_path):
    source = ip.create_source(str(class_tree), 8)
    assert source.class_names == CLASSES
    files = sorted(p for p in class_tree.glob("[!.]*/*.jpg"))
    assert len(source) == len(files) == 18 and source.labels.dtype == np.int32
    for img, label, f in zip(source.images, source.labels, files, strict=True):
        assert CLASSES[label] == f.parent.name and np.array_equal(img, ip.load_image(f, 8))

    # An unreadable file is skipped and the labels stay aligned with the images that remain.
    broken = tmp_path / "broken"
    for name in CLASSES[:2]:
        (broken / name).mkdir(parents=True)
    (broken / CLASSES[0] / "0.jpg").write_bytes(b"not a jpeg")
    os.symlink(files[0], broken / CLASSES[0] / "1.jpg")
    os.symlink(files[7], broken / CLASSES[1] / "2.jpg")
    skipped = ip.create_source(str(broken), 8)
    assert skipped.labels.tolist() == [0, 1] and np.array_equal(skipped.images, source.images[[0, 7]])

    # Every host numbers the classes alike and holds the labels of its own share.
    halves = [ip.create_source(str(class_tree), 8, process_index=i, process_count=2) for i in (0, 1)]
    assert all(h.class_names == CLASSES for h in halves)
    assert np.array_equal(np.concatenate([h.labels for h in halves]), source.labels[np.r_[0:18:2, 1:18:2]])

    # Batches carry the labels of their own images, as a pure function of the step.
    batches = ip.train_batches(source, batch_size=5, seed=3, start_step=2, with_labels=True)
    images, labels = next(batches)
    batches.close()
    indices = ip.batch_indices(2, 5, 18, 3)
    assert np.array_equal(images, source.images[indices]) and np.array_equal(labels, source.labels[indices])

    # An image beside the class folders means the folder is not a labelled tree.
    os.symlink(files[0], broken / "loose.jpg")
    assert ip.create_source(str(broken), 8).labels is None
    with pytest.raises(ip.DataError, match="no class labels"):
        ip.train_batches(ip.create_source(str(broken), 8), batch_size=2, seed=0, start_step=0, with_labels=True)


def test_labels_from_fashion_mnist_idx_files(tmp_path):
    if not (FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip(f"{FASHION_MNIST} missing; install the Debian package dataset-fashion-mnist")
    source = ip.create_source(str(FASHION_MNIST), 28, split="test")
    with gzip.open(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=8)  # the documented 8-byte header of a label file
    assert source.class_names == tuple(str(k) for k in range(10))
    assert np.array_equal(source.labels, raw) and np.bincount(source.labels).tolist() == [1000] * 10

    # A label file that does not match its images is an error, not a silent misalignment.
    pixels = np.zeros((3, 4, 4), np.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, 3, 4, 4) + pixels.tobytes())
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, 2) + bytes([1, 0]))
    with pytest.raises(ip.DataError, match="expected 3 labels for the 3 images"):
        ip.create_source(str(tmp_path), 4)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, 3) + bytes([2, 0, 2]))
    assert ip.create_source(str(tmp_path), 4).labels.tolist() == [2, 0, 2]


def test_labels_from_parquet_and_tfds(tmp_path, class_tree):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tensorflow_datasets as tfds

    files = sorted(class_tree.glob("[!.]*/*.jpg"))[:4]
    cells = [{"bytes": f.read_bytes(), "path": f.name} for f in files]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    hf_meta = {b"huggingface": json.dumps({"info": {"features": {
        "image": {"_type": "Image"}, "label": {"names": ["cat", "dog", "owl"], "_type": "ClassLabel"}}}}).encode()}
    table = pa.table({"image": pa.array(cells, type=image_type), "label": pa.array([2, 0, 2, 1], pa.int64())})
    pq.write_table(table.replace_schema_metadata(hf_meta), tmp_path / "named.parquet")
    images, labels, names = ip._read_parquet([tmp_path / "named.parquet"], 8)
    assert names == ("cat", "dog", "owl") and labels.tolist() == [2, 0, 2, 1] and images.shape == (4, 8, 8, 3)
    strings = pa.table({"image": pa.array(cells, type=image_type), "label": ["zebra", "ant", "zebra", "bee"]})
    pq.write_table(strings, tmp_path / "strings.parquet")
    _, labels, names = ip._read_parquet([tmp_path / "strings.parquet"], 8, process_index=1, process_count=2)
    assert names == ("ant", "bee", "zebra") and labels.tolist() == [0, 1]  # rows 1 and 3: classes of all rows

    class Tiny(tfds.core.GeneratorBasedBuilder):
        """Four butterflies with named classes."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {"image": tfds.features.Image(shape=(None, None, 3)),
                        "label": tfds.features.ClassLabel(names=["moth", "butterfly"])}
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, f in enumerate(files):
                with Image.open(f) as img:
                    yield i, {"image": img.convert("RGB").resize((16, 16)), "label": i % 2}

    Tiny(data_dir=str(tmp_path / "tfds")).download_and_prepare(file_format="array_record")
    source = ip.create_source("tiny", 8, tfds_data_dir=str(tmp_path / "tfds"))
    assert source.class_names == ("moth", "butterfly") and sorted(source.labels.tolist()) == [0, 0, 1, 1]
    # tfds stores examples in a hashed order: each image must still carry its own label.
    by_image = {}
    for i, f in enumerate(files):
        with Image.open(f) as img:
            by_image[np.asarray(img.convert("RGB").resize((16, 16)).resize((8, 8), Image.Resampling.BICUBIC))
                     .tobytes()] = i % 2
    assert [by_image[img.tobytes()] for img in source.images] == source.labels.tolist()


# --------------------------------------------------------------------------------------------------------------------
# Model, label dropout, guidance.


def test_unet_label_embedding_and_null_label():
    model = unet.UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4, num_classes=3)
    apply = jax.jit(model.apply, static_argnames="train")
    x = jnp.tile(jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3)), (4, 1, 1, 1))
    t = jnp.tile(jnp.array([10, 40]), 4)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), x, t)["params"]
    assert params["label_embed"]["embedding"].shape == (4, 32)  # 3 classes + the null label, width 4 * ch
    params = _perturbed(params)
    # The same two noisy images under labels 0, 1, 2 and 3 (the null label), in one batch.
    outs = np.asarray(apply({"params": params}, x, t, labels=jnp.repeat(jnp.arange(4), 2))).reshape(4, 2, 8, 8, 3)
    for a in range(4):
        for b in range(a):
            assert not np.allclose(outs[a], outs[b], atol=1e-4), (a, b)
    none = np.asarray(apply({"params": params}, x, t)).reshape(4, 2, 8, 8, 3)
    for a in range(4):
        np.testing.assert_allclose(none[a], outs[3], rtol=0, atol=1e-6)  # labels=None is the null label

    plain = unet.UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4)
    plain_params = jax.eval_shape(plain.init, jax.random.PRNGKey(1), x, t)["params"]
    assert "label_embed" not in plain_params
    with pytest.raises(ValueError, match="unconditional UNet"):
        jax.eval_shape(lambda p: plain.apply({"params": p}, x, t, labels=jnp.zeros((2,), jnp.int32)), plain_params)


def test_label_dropout_rate_and_per_example_determinism():
    rng = jax.random.PRNGKey(7)
    ids = jnp.arange(20000)
    labels = jnp.asarray(np.random.default_rng(0).integers(0, 5, 20000), jnp.int32)
    dropped = np.asarray(conditioning.drop_labels(rng, ids, labels, 0.1, 5))
    nulls = dropped == 5
    assert abs(nulls.mean() - 0.1) < 0.01  # 3 standard deviations of a binomial(20000, 0.1) fraction are 0.0064
    assert np.array_equal(dropped[~nulls], np.asarray(labels)[~nulls])
    # An example's draw depends only on its global index: a device holding examples 700..799 agrees.
    part = conditioning.drop_labels(rng, ids[700:800], labels[700:800], 0.1, 5)
    np.testing.assert_array_equal(part, dropped[700:800])
    assert not np.array_equal(conditioning.drop_labels(jax.random.PRNGKey(8), ids, labels, 0.1, 5), dropped)
    np.testing.assert_array_equal(conditioning.drop_labels(rng, ids, labels, 0.0, 5), labels)


def test_guidance_formula_and_one_batched_call():
    calls = []

    def model_fn(x, t, c):  # an analytic "network" whose output depends on the label
        calls.append(x.shape[0])
        return jnp.sin(x) * (c[:, None, None, None] + 1.0) + t[:, None, None, None] / 100.0

    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 3))
    t = jnp.array([5, 50, 500])
    labels = jnp.array([0, 1, 2])
    plain = conditioning.guided_denoise_fn(model_fn, labels, 3, 0.0)(x, t)
    np.testing.assert_array_equal(plain, model_fn(x, t, labels))
    assert calls == [3, 3]  # w = 0: one conditional call, no unconditional one
    calls.clear()
    for w in (1.0, 3.0):
        guided = conditioning.guided_denoise_fn(model_fn, labels, 3, w)(x, t)
        expected = (1 + w) * model_fn(x, t, labels) - w * model_fn(x, t, jnp.full((3,), 3))
        np.testing.assert_allclose(guided, expected, rtol=1e-6, atol=1e-6)
    assert calls == [6, 3, 3, 6, 3, 3]  # conditional and unconditional in one call of 2B

    # Guiding the x0 or v output is the same guidance as guiding eps: the conversions are affine in the output.
    sched = sch.make_schedule("cosine", 1000)
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    cond, uncond = (jax.random.normal(k, x.shape) for k in keys)
    for prediction in ("x0", "v"):
        x0_c, eps_c = sch.model_to_x0_eps(sched, x, t, cond, prediction)
        x0_u, eps_u = sch.model_to_x0_eps(sched, x, t, uncond, prediction)
        x0_g, eps_g = sch.model_to_x0_eps(sched, x, t, conditioning.guide(cond, uncond, 2.0), prediction)
        np.testing.assert_allclose(eps_g, conditioning.guide(eps_c, eps_u, 2.0), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(x0_g, conditioning.guide(x0_c, x0_u, 2.0), rtol=1e-4, atol=1e-4)


def test_grid_labels_and_columns():
    config = tiny_config()
    assert conditioning.grid_labels(config) is None
    config.model.num_classes, config.sampling.num_samples = 3, 8
    labels = conditioning.grid_labels(config)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and conditioning.grid_columns(labels) == 3
    config.sampling.class_label = 2
    assert conditioning.grid_labels(config).tolist() == [2] * 8
    assert conditioning.grid_columns(conditioning.grid_labels(config)) is None
    for key, value, message in [("sampling.class_label", 3, "class in [0, 2]"),
                                ("training.label_dropout", 1.0, "must be in [0, 1)"),
                                ("data.class_names", ("a", "b"), "has 2 names but model.num_classes=3")]:
        bad = tiny_config()
        bad.model.num_classes = 3
        section, name = key.split(".")
        bad[section][name] = value
        with pytest.raises(config_checks.ConfigError, match=re.escape(message)):
            config_checks.validate(bad, num_devices=1)
    unconditional = tiny_config()
    unconditional.sampling.guidance_scale = 2.0
    with pytest.raises(config_checks.ConfigError, match="needs a class-conditional model"):
        config_checks.validate(unconditional, num_devices=1)


# --------------------------------------------------------------------------------------------------------------------
# Training and sampling.


def test_eight_devices_equal_one_device_for_a_conditional_model(class_tree):
    config = tiny_config(str(class_tree), 8)
    config.model.num_classes = 3
    config.training.label_dropout = 0.5  # many dropped labels: a device-dependent draw would change the loss
    source = ip.create_source(config.data.dataset, 8)
    steps = [ip.batch_indices(s, 16, len(source), 0) for s in range(2)]
    batches = [(source.get_batch(i), source.get_labels(i)) for i in steps]
    model = unet.create_model(config)
    tx = train.create_optimizer(config)
    losses = {}
    for mesh in (parallel.make_mesh(), parallel.make_mesh(jax.devices()[:1])):
        state = train.init_train_state(config, model, tx, mesh)
        step_fn = train.make_train_step(config, model, train.create_schedule(config), tx, mesh)
        losses[mesh.size] = []
        for images, labels in batches:
            batch = (parallel.global_batch(mesh, images), parallel.global_batch(mesh, labels))
            state, scalars = step_fn(state, batch)
            losses[mesh.size].append(float(scalars["loss"]))
    np.testing.assert_allclose(losses[8], losses[1], rtol=1e-5)
    assert np.isfinite(losses[8]).all()


def test_conditional_train_and_sample_through_main(class_tree, tmp_path):
    workdir = tmp_path / "run"
    flags = [
        f"--config.data.dataset={class_tree}", "--config.model.num_classes=3", "--config.data.image_size=8",
        "--config.model.ch=8", "--config.model.ch_mult=(1,2)", "--config.model.num_res_blocks=1",
        "--config.model.attn_resolutions=(4,)", "--config.model.num_groups=4", "--config.diffusion.num_timesteps=50",
        "--config.training.batch_size=8", "--config.training.log_every_steps=2",
        "--config.training.checkpoint_every_steps=4", "--config.training.sample_every_steps=4",
        "--config.sampling.num_steps=5", "--config.sampling.num_samples=6", "--config.sampling.num_intermediates=2",
    ]
    trained = run_main(workdir, *flags, "--config.training.num_train_steps=4")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert json.loads((workdir / "classes.json").read_text())["class_names"] == list(CLASSES)
    # The periodic grid during training has one row per class: 3 rows of 2 samples (8x8 tiles, 2-pixel padding).
    assert Image.open(workdir / "samples" / "step_0000004.png").size == (2 * 10 + 2, 3 * 10 + 2)
    caption = json.loads((workdir / "samples" / "step_0000004_classes.json").read_text())
    assert caption["rows"] == list(CLASSES) and caption["labels"] == [0, 0, 1, 1, 2, 2]

    sampled = run_main(workdir, *flags, "--mode=sample", "--config.sampling.guidance_scale=2")
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    name = workdir / "samples" / "step_0000004_ddim5_eta0_w2"
    assert f"sample grid: {name}.png" in sampled.stdout and f"class captions: {name}_classes.json" in sampled.stdout
    assert Image.open(f"{name}.png").size == (2 * 10 + 2, 3 * 10 + 2)
    caption = json.loads(pathlib.Path(f"{name}_classes.json").read_text())
    assert caption["rows"] == list(CLASSES) and caption["guidance_scale"] == 2.0
    assert "grid row 1: b_smithsonian" in sampled.stderr
    samples = np.load(f"{name}.npz")["samples"]
    assert samples.shape == (6, 8, 8, 3) and samples.std() > 0

    # A conditional checkpoint and an unconditional config: the one-line shape error, and the workdir is kept.
    config = tiny_config(str(class_tree), 8)
    config.diffusion.num_timesteps = 50
    config.training.batch_size = 8
    with pytest.raises(checkpointing.CheckpointMismatchError) as info:
        generation.restore_ema_params(config, str(workdir), parallel.make_mesh())
    assert "the checkpoint has label_embed/embedding, the config does not" in str(info.value)
    assert "\n" not in str(info.value) and "new --workdir" in str(info.value)
    config.model.num_classes = 5
    with pytest.raises(checkpointing.CheckpointMismatchError, match=r"label_embed/embedding is \(4, 32\)"):
        generation.restore_ema_params(config, str(workdir), parallel.make_mesh())


def test_class_count_and_missing_labels_fail_before_compiling(class_tree, tmp_path):
    config = tiny_config(str(class_tree), 8)
    config.model.num_classes = 5
    with pytest.raises(config_checks.ConfigError) as info:
        train.train_and_evaluate(config, str(tmp_path / "a"))
    assert str(info.value) == (f"model.num_classes=5 but data.dataset={class_tree} has 3 classes "
                               "(a_caltech, b_smithsonian, c_caltech); set --config.model.num_classes=3")
    assert not (tmp_path / "a" / "checkpoints").exists()

    loose = tmp_path / "loose"
    loose.mkdir()
    for f in sorted(class_tree.glob("[!.]*/*.jpg"))[:3]:
        os.symlink(f, loose / f.name)
    config.data.dataset = str(loose)
    with pytest.raises(ip.DataError, match="model.num_classes=5 needs class labels, but data.dataset=.* has none"):
        train.train_and_evaluate(config, str(tmp_path / "b"))
    assert not (tmp_path / "b" / "checkpoints").exists()
