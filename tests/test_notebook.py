"""The Colab notebook, executed headless with nbclient in its tiny CPU setting on the real butterfly photos."""

import base64
import io
import json
import os
import pathlib

import nbformat
import numpy as np
from helpers import CACHE, REPO
from nbclient import NotebookClient
from PIL import Image

from ddpm_jax import metric_writers

NOTEBOOK = REPO / "notebooks" / "ddpm_jax_colab.ipynb"


def _not_blank(image: np.ndarray) -> bool:
    """More than a background: several colours and real spread (a blank or one-colour image has neither)."""
    return len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 4 and float(image.std()) > 5.0


def test_notebook_is_stored_without_outputs_and_has_one_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells and all(c.outputs == [] and c.execution_count is None for c in code_cells)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "PARAMETERS" in tagged[0].source and "DDPM_JAX_NOTEBOOK_CI" in tagged[0].source
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert "colab.research.google.com/github/" in nb.cells[0].source  # The Open-in-Colab badge.


def test_notebook_trains_plots_and_samples_headless(tmp_path, butterflies_dir):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    workdir = tmp_path / "workdir"
    env = {
        **os.environ,
        "DDPM_JAX_NOTEBOOK_CI": "1",
        "DDPM_JAX_NOTEBOOK_DATA": str(butterflies_dir),
        "DDPM_JAX_NOTEBOOK_WORKDIR": str(workdir),
        # The kernel is a fresh process: CPU only, 8 devices and the compile cache as in conftest. Its tiny setting
        # is tiny_config at 8x8, so it reuses the programs other tests compiled (26 s warm, 80 s with a cold cache).
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": os.environ["XLA_FLAGS"],  # This process's (conftest's and the defaults'): the same programs.
        "JAX_COMPILATION_CACHE_DIR": str(CACHE / "jax"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    # The kernel starts in an unrelated folder: the notebook must find the repository from the installed package.
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)

    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "on cpu: [CpuDevice(id=0), CpuDevice(id=1), CpuDevice(id=2)" in text, text[:2000]
    assert "trained to step 6" in text and "3 log steps; last loss" in text

    pngs = [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(o["data"]["image/png"]))).convert("RGB"))
        for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})
    ]
    assert len(pngs) == 3, "expected the loss curve, the sample grid and the denoising strip"
    assert all(_not_blank(p) for p in pngs)

    grid = workdir / "samples" / "step_0000006_ddim5_eta0.png"
    strip = workdir / "samples" / "step_0000006_ddim5_eta0_strip.png"
    for path in (grid, strip):
        assert _not_blank(np.asarray(Image.open(path).convert("RGB"))), path
    with np.load(workdir / "samples" / "step_0000006_ddim5_eta0.npz") as data:
        assert data["samples"].shape == (8, 8, 8, 3) and data["samples"].dtype == np.uint8

    steps, loss = metric_writers.read_scalars(str(workdir))["loss"]
    assert steps.tolist() == [2, 4, 6] and np.isfinite(loss).all()
    assert json.loads((workdir / "config.json").read_text())["data"]["dataset"] == str(butterflies_dir)
    assert pathlib.Path(workdir / "checkpoints" / "6").is_dir()
