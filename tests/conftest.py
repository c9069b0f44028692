"""Test setup: 8 fake CPU devices and a persistent compilation cache, set before jax is imported; shared fixtures.

The expensive things are made once per session and shared: the trained tiny run (`trained_run`, which also covers
the training loop's logging, grids and FID) and the conditional one (`conditional_run`). Tests that change a trained
workdir work on a copy (`copy_run`).
"""

import os
import pathlib
import shutil
import subprocess

# LLVM's optimisations off: compiles of the tiny UNet take 30-70% less time, steps 25% more. The CLI tests (the
# reference run, kill -9, signals) and the XLA-flags parity test run with the flags users get.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from ddpm_jax import xla_flags  # noqa: E402

xla_flags.apply_defaults()  # The suite runs the XLA flags that `python -m ddpm_jax.main` runs with.

import jax  # noqa: E402
import pytest  # noqa: E402
import reference_run  # noqa: E402
from helpers import CACHE, CLASSES, REPO, conditional_config, tiny_config, tiny_extractor  # noqa: E402

jax.config.update("jax_compilation_cache_dir", str(CACHE / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# Subprocesses running `python -m ddpm_jax.main` share the same compilation cache.
os.environ.setdefault("DDPM_JAX_COMPILATION_CACHE", str(CACHE / "jax"))

FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")
TRAINED_STEPS = 40


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


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> pathlib.Path:
    """Debian's Fashion-MNIST IDX files; installed with apt-get when missing and allowed, else the test is skipped."""
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip(f"{FASHION_MNIST} missing; install the Debian package dataset-fashion-mnist")
        result = subprocess.run(
            # Test workers may ask at once: wait for dpkg's lock instead of failing on it.
            ["apt-get", "-o", "DPkg::Lock::Timeout=240", "install", "-y", "dataset-fashion-mnist"],
            capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0 or not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
            pytest.skip(f"apt-get install dataset-fashion-mnist failed: {result.stderr.strip()[-300:]}")
    return FASHION_MNIST


@pytest.fixture(scope="session")
def reference_run_arrays(tmp_path_factory, butterflies_dir):
    """tests/reference_run.py's run through the command line: (workdir, its recorded arrays)."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    return workdir, reference_run.record(workdir, str(butterflies_dir))


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
def butterfly_files(butterflies_dir) -> list[pathlib.Path]:
    """The butterfly JPEGs in the order the folder route loads them (sorted relative paths)."""
    files = sorted(butterflies_dir.rglob("*.jpg"), key=lambda p: p.relative_to(butterflies_dir).as_posix())
    assert len(files) == 101
    return files


@pytest.fixture
def offline(monkeypatch):
    """Guarantees the offline code paths: real sockets here (no network), simulated where a network exists."""
    from ddpm_jax.data import network

    if network.can_connect("storage.googleapis.com", timeout_s=2.0) or network.can_connect("huggingface.co",
                                                                                            timeout_s=2.0):
        monkeypatch.setattr(network, "can_connect", lambda *args, **kwargs: False)


@pytest.fixture
def tiny(butterflies_dir):
    """tiny_config() on the real butterfly photos at 8x8: the config every in-process training test shares."""
    return tiny_config(str(butterflies_dir), 8)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, butterflies_dir):
    """One run of the training loop on `tiny`, shared by every test that needs a trained workdir.

    TRAINED_STEPS steps with logs every 10, checkpoints at 20 and 40, a sample grid at 40 and FID (a small injected
    feature network instead of Inception) at 20 and 40. Returns (workdir, config, extractor, data loads by the run).
    Tests must not change the workdir; `copy_run` gives a private copy.
    """
    from ddpm_jax import data, train
    from ddpm_jax.evaluation import fid_evaluator

    config = tiny_config(str(butterflies_dir), 8)
    t = config.training
    t.num_train_steps, t.log_every_steps, t.checkpoint_every_steps = TRAINED_STEPS, 10, 20
    t.sample_every_steps, t.fid_every_steps, t.fid_num_samples = TRAINED_STEPS, 20, 8  # FID chunks = grid chunks.
    config.eval.fid_cache_dir = str(tmp_path_factory.mktemp("fid_cache"))
    workdir = tmp_path_factory.mktemp("trained") / "run"
    extractor = tiny_extractor()
    loads = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fid_evaluator, "load_extractor", lambda config, mesh: extractor)
        real = data.source_from_config
        mp.setattr(data, "source_from_config", lambda *a, **k: loads.append(k) or real(*a, **k))
        state = train.train_and_evaluate(config, str(workdir))
    assert int(state.step) == TRAINED_STEPS
    return workdir, config, extractor, loads


@pytest.fixture
def copy_run(trained_run, tmp_path):
    """A private copy of the trained workdir, for tests that change it."""
    workdir = tmp_path / "run"
    shutil.copytree(trained_run[0], workdir, symlinks=True)
    return workdir


@pytest.fixture(scope="session")
def conditional_run(tmp_path_factory, class_tree):
    """A class-conditional run on `class_tree` (3 classes): 4 steps, a per-class grid at step 4. (workdir, config)."""
    from ddpm_jax import train

    config = conditional_config(str(class_tree))
    t = config.training
    t.num_train_steps, t.checkpoint_every_steps, t.sample_every_steps = 4, 4, 4
    config.sampling.num_samples = 6
    workdir = tmp_path_factory.mktemp("conditional") / "run"
    train.train_and_evaluate(config, str(workdir))
    return workdir, config
