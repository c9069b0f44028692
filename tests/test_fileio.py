"""Workdir paths: local folders become absolute, bucket URLs stay URLs, and whole files appear at once."""

import importlib.util
import os

import pytest

from ddpm_jax import checkpointing, fileio


def test_resolve_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    assert fileio.resolve("gs://bucket/runs/a/") == "gs://bucket/runs/a"
    assert fileio.is_remote("gs://bucket/x") and not fileio.is_remote("/tmp/x")
    monkeypatch.chdir(tmp_path)
    assert fileio.resolve("run") == str(tmp_path / "run")
    assert fileio.resolve("~/run") == os.path.join(os.path.expanduser("~"), "run")


def test_write_bytes_creates_folders_and_leaves_no_partial_files(tmp_path):
    path = tmp_path / "a" / "b" / "x.bin"
    assert fileio.write_bytes(path, b"first") == str(path)
    fileio.write_text(path, "second")
    assert fileio.read_text(path) == "second"
    assert os.listdir(path.parent) == ["x.bin"]
    assert fileio.is_dir(tmp_path / "a") and fileio.exists(path) and not fileio.exists(tmp_path / "nope")


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs installed: would reach the network")
def test_bucket_workdir_without_the_gcs_extra_is_one_clear_error():
    with pytest.raises(checkpointing.WorkdirError, match=r"cannot write to --workdir=gs://.*gcs extra"):
        checkpointing.check_workdir("gs://ddpm-jax-no-such-bucket/run", 1 << 20)
