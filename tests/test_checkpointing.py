"""Checkpoints: exact round trips, restore onto another mesh, retention, the model-shape check, damaged checkpoints,
the EMA restore of the modes, and the workdir checks before training."""

import hashlib
import json
import os
import re

import jax
import numpy as np
import optax
import pytest
from helpers import CLASSES, tiny_config

from ddpm_jax import checkpointing, parallel, train, train_state
from ddpm_jax.errors import CheckpointMismatchError, MissingCheckpointError, WorkdirError
from ddpm_jax.models import unet

SAVED_STEP = 7


def _config(**model_changes):
    """tiny_config() cut to one UNet level without attention: saving a state replicated on 8 devices costs per leaf."""
    config = tiny_config("", 8)
    config.model.ch_mult = (1,)
    config.model.attn_resolutions = ()
    for key, value in model_changes.items():
        config.model[key] = value
    return config


def _setup(config):
    model = unet.create_model(config)
    return model, train_state.create_optimizer(config)


def _random_state(abstract):
    """A train state with the layout of `abstract`, every leaf distinct random values (init would leave mu, nu and
    count at zero); built with device_put rather than init_train_state, which compiles a program of its own."""
    rng = np.random.default_rng(0)

    def fill(a):
        if np.issubdtype(a.dtype, np.floating):
            value = rng.standard_normal(a.shape).astype(a.dtype)
        else:
            value = rng.integers(1, 1000, a.shape).astype(a.dtype)
        return jax.device_put(value, a.sharding)

    state = jax.tree.map(fill, abstract)
    return state.replace(step=jax.device_put(np.asarray(SAVED_STEP, np.int32), abstract.step.sharding))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One small train state replicated on the 8-device mesh, saved once at SAVED_STEP; shared by the module."""
    config = _config()
    model, tx = _setup(config)
    mesh = parallel.make_mesh()
    abstract = train_state.abstract_train_state(config, model, tx, mesh)
    state = _random_state(abstract)
    directory = str(tmp_path_factory.mktemp("ckpt") / "checkpoints")
    ckpt = checkpointing.Checkpointer(directory, keep=3)
    assert ckpt.latest_step() is None
    assert ckpt.save(SAVED_STEP, state, config.to_dict())
    ckpt.close()
    return {
        "config": config, "model": model, "tx": tx, "mesh": mesh, "abstract": abstract, "state": state,
        "host": jax.device_get(state), "dir": directory,
    }


def _assert_bitwise_equal(restored, expected):
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
        a = np.asarray(jax.device_get(a))
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == np.asarray(b).tobytes()


def _listing(directory):
    """Every file and folder under `directory` with its size, mtime and content hash."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.stat(path)
            digest = None
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns, digest)
    return out


def test_save_then_restore_is_bitwise_identical(saved):
    """A fresh Checkpointer (as after a restart) finds the step and gives back every leaf and the config."""
    ckpt = checkpointing.Checkpointer(saved["dir"])
    try:
        assert ckpt.latest_step() == SAVED_STEP and ckpt.all_steps() == [SAVED_STEP]
        abstract = train_state.abstract_train_state(saved["config"], saved["model"], saved["tx"], saved["mesh"])
        restored, config = ckpt.restore(SAVED_STEP, abstract)
    finally:
        ckpt.close()
    assert isinstance(restored, train_state.TrainState)
    _assert_bitwise_equal(restored, saved["host"])
    assert int(restored.step) == SAVED_STEP
    # The optimizer state keeps its optax types, so tx.update can consume it after a resume.
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    adam = [s for s in jax.tree.leaves(restored.opt_state, is_leaf=is_adam) if is_adam(s)]
    assert len(adam) == 1
    assert int(adam[0].count) > 0  # The saved random count, not a freshly initialised zero.
    assert adam[0].mu["conv_out"]["kernel"].shape == saved["host"].params["conv_out"]["kernel"].shape
    assert config == json.loads(json.dumps(saved["config"].to_dict()))
    assert config["model"]["ch"] == 8 and config["model"]["ch_mult"] == [1]


def test_restore_from_eight_devices_onto_one(saved):
    assert len(saved["state"].params["conv_out"]["kernel"].sharding.device_set) == 8
    mesh1 = parallel.make_mesh(jax.devices()[:1])
    ckpt = checkpointing.Checkpointer(saved["dir"])
    try:
        abstract = train_state.abstract_train_state(saved["config"], saved["model"], saved["tx"], mesh1)
        restored, _ = ckpt.restore(SAVED_STEP, abstract)
    finally:
        ckpt.close()
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding.mesh == mesh1
        assert leaf.sharding.device_set == {jax.devices()[0]}
    _assert_bitwise_equal(restored, saved["host"])


def test_keep_retains_only_the_newest_checkpoints(tmp_path):
    """Retention does not depend on the tree, so a small one keeps this fast."""
    sharding = parallel.replicated(parallel.make_mesh())
    ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"), keep=2)
    try:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        for step in (1, 2, 3):
            tree = {"w": jax.device_put(np.full(4, step, np.float32), sharding)}
            assert ckpt.save(step, tree, {"step": step})
            ckpt.wait()
        assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
    finally:
        ckpt.close()
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["2", "3"]
    reopened = checkpointing.Checkpointer(str(tmp_path / "ckpt"), keep=2)
    try:
        assert reopened.all_steps() == [2, 3] and reopened.latest_step() == 3
        tree, config = reopened.restore(3, {"w": jax.ShapeDtypeStruct((4,), np.float32, sharding=sharding)})
    finally:
        reopened.close()
    assert config == {"step": 3}
    np.testing.assert_array_equal(tree["w"], np.full(4, 3, np.float32))


def test_relative_directory_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = checkpointing.Checkpointer("rel/ckpt")
    try:
        assert ckpt.directory == str(tmp_path / "rel" / "ckpt") and ckpt.latest_step() is None
    finally:
        ckpt.close()


def _wanted_params(saved, changes):
    if changes == "drop mid_attn":
        abstract = train_state.abstract_train_state(saved["config"], saved["model"], saved["tx"], saved["mesh"])
        params = dict(abstract.params)
        del params["mid_attn"]
        return params
    config = _config(**changes)
    model, tx = _setup(config)
    return train_state.abstract_train_state(config, model, tx, saved["mesh"]).params


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"ch": 16}, "shape"),  # Same parameter names, other shapes.
        ({"num_res_blocks": 2}, "missing"),  # More blocks: parameter names the checkpoint lacks.
        ({"attn_resolutions": (8,)}, "missing"),  # Attention layers the checkpoint lacks.
        ("drop mid_attn", "extra"),  # A model without some layers the checkpoint has.
    ],
    ids=["ch-8-vs-16", "num-res-blocks-1-vs-2", "attention-added", "layer-removed"],
)
def test_check_compatible_rejects_another_model_and_leaves_the_checkpoint_alone(saved, changes, expected):
    before = _listing(saved["dir"])
    assert any(name.startswith(f"{SAVED_STEP}/") for name in before)
    saved_shapes = checkpointing._shapes_by_path(saved["host"].params)
    wanted = _wanted_params(saved, changes)
    wanted_shapes = checkpointing._shapes_by_path(wanted)

    ckpt = checkpointing.Checkpointer(saved["dir"])  # Fresh instance: no restore has happened in it yet.
    try:
        # The matching model passes, so the check itself reads the metadata rather than always failing.
        ckpt.check_compatible(SAVED_STEP, saved["state"].params)
        with pytest.raises(CheckpointMismatchError) as err:
            ckpt.check_compatible(SAVED_STEP, wanted)
    finally:
        ckpt.close()
    message = str(err.value)
    assert "\n" not in message
    assert f"{saved['dir']}/{SAVED_STEP}" in message
    assert "use a new --workdir" in message
    if expected == "shape":
        m = re.search(r"\((\S+) is (\([\d, ]+\)) in the checkpoint but (\([\d, ]+\)) in the config\)", message)
        assert m, message
        path, in_ckpt, in_config = m.groups()
        assert in_ckpt == str(saved_shapes[path]) and in_config == str(wanted_shapes[path])
        assert in_ckpt != in_config
    elif expected == "missing":
        m = re.search(r"the config has (\S+/\S+), the checkpoint does not", message)
        assert m, message
        assert m.group(1) in wanted_shapes and m.group(1) not in saved_shapes
    else:
        m = re.search(r"the checkpoint has (\S+/\S+), the config does not", message)
        assert m, message
        assert m.group(1).startswith("mid_attn/") and m.group(1) in saved_shapes
    assert _listing(saved["dir"]) == before


def test_fresh_checkpointer_can_check_then_restore(saved):
    """The resume path of train.py in a new process: check_compatible first, then restore (metadata was once None)."""
    before = _listing(saved["dir"])
    assert any(name.startswith(f"{SAVED_STEP}/") for name in before)
    ckpt = checkpointing.Checkpointer(saved["dir"])
    try:
        abstract = train_state.abstract_train_state(saved["config"], saved["model"], saved["tx"], saved["mesh"])
        ckpt.check_compatible(ckpt.latest_step(), abstract.params)
        restored, _ = ckpt.restore(ckpt.latest_step(), abstract)
    finally:
        ckpt.close()
    _assert_bitwise_equal(restored.params, saved["host"].params)
    assert _listing(saved["dir"]) == before


def _damage(step_dir):
    """Truncates every data file of a saved checkpoint and deletes its state metadata."""
    for f in step_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and f.parent.name in ("d", "ocdbt.process_0"):
            with open(f, "r+b") as fh:
                fh.truncate(f.stat().st_size // 3)
    for f in step_dir.rglob("_METADATA"):
        f.unlink()


def test_a_damaged_latest_checkpoint_falls_back_to_an_intact_one(copy_run, trained_run):
    """Sampling reads around the damage; training sets it aside and resumes from the intact step, which it keeps."""
    _, config, _, _ = trained_run
    ckpts = copy_run / "checkpoints"
    _damage(ckpts / "40")
    good = {p: p.stat().st_mtime_ns for p in (ckpts / "20").rglob("*")}
    _, _, step = checkpointing.restore_ema_params(config, str(copy_run), parallel.make_mesh())
    assert step == 20 and (ckpts / "40").is_dir()  # Reading never moves anything.

    config = config.copy_and_resolve_references()
    config.training.fid_every_steps = config.training.sample_every_steps = 0
    config.training.num_train_steps = 22
    state = train.train_and_evaluate(config, str(copy_run))
    assert int(state.step) == 22
    assert [p.name for p in ckpts.iterdir() if p.name.startswith("damaged-40-")]
    assert {p: p.stat().st_mtime_ns for p in (ckpts / "20").rglob("*")} == good
    assert {"20", "22"} <= {p.name for p in ckpts.iterdir()}


def test_restore_ema_params_needs_checkpoints_of_this_model(tmp_path, conditional_run):
    mesh = parallel.make_mesh()
    config = tiny_config("", 8)
    with pytest.raises(MissingCheckpointError, match="no checkpoints in .*train first with --mode=train"):
        checkpointing.restore_ema_params(config, str(tmp_path / "empty"), mesh)
    (tmp_path / "bare" / "checkpoints").mkdir(parents=True)
    with pytest.raises(MissingCheckpointError, match="no intact checkpoint in"):
        checkpointing.restore_ema_params(config, str(tmp_path / "bare"), mesh)

    # A conditional checkpoint and an unconditional config, or another class count: one line, the workdir kept.
    workdir, conditional = conditional_run
    model, ema, step = checkpointing.restore_ema_params(conditional, str(workdir), mesh)
    assert step == 4 and ema["label_embed"]["embedding"].shape == (len(CLASSES) + 1, 32)
    config = tiny_config(str(conditional.data.dataset), 8)
    with pytest.raises(CheckpointMismatchError) as info:
        checkpointing.restore_ema_params(config, str(workdir), mesh)
    assert "the checkpoint has label_embed/embedding, the config does not" in str(info.value)
    assert "\n" not in str(info.value) and "new --workdir" in str(info.value)
    config.model.num_classes = 5
    with pytest.raises(CheckpointMismatchError, match=r"label_embed/embedding is \(4, 32\)"):
        checkpointing.restore_ema_params(config, str(workdir), mesh)


def test_unwritable_workdir_fails_at_start(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(WorkdirError, match="cannot write to --workdir=.*choose a writable directory"):
        checkpointing.check_workdir(str(blocker / "run"), 1000)


def test_full_disk_fails_at_start(tmp_path, monkeypatch):
    class Usage:
        total, used, free = 10 << 30, (10 << 30) - (5 << 20), 5 << 20

    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(WorkdirError, match="5 MiB free but checkpoints of this model need about"):
        checkpointing.check_workdir(str(tmp_path), 100 << 20)
    assert os.listdir(tmp_path) == []  # The probe file was removed.
