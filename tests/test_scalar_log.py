"""The JSON-lines scalar log (workdir/metrics.jsonl) that notebooks read the loss curve from."""

import json

import numpy as np
import pytest

from ddpm_jax import metrics


def _writer(workdir):
    return metrics.MetricWriter(str(workdir / "tensorboard"), str(workdir / metrics.SCALARS_FILE))


def test_one_json_object_per_log_step_read_back_as_series(tmp_path):
    writer = _writer(tmp_path)
    writer.write_scalars(2, {"loss": 0.5, "learning_rate": np.float32(1e-3)})
    writer.write_scalars(4, {"loss": 0.25, "learning_rate": 2e-3, "skipped_updates": 1.0})
    # Lines reach the file at once, before close: a run that dies keeps what it logged.
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 2, "loss": 0.5, "learning_rate": pytest.approx(1e-3)},
        {"step": 4, "loss": 0.25, "learning_rate": 2e-3, "skipped_updates": 1.0},
    ]
    writer.close()
    assert any(p.name.startswith("events.out.tfevents.") for p in (tmp_path / "tensorboard").iterdir())

    series = metrics.read_scalars(str(tmp_path))
    assert sorted(series) == ["learning_rate", "loss", "skipped_updates"]
    steps, loss = series["loss"]
    assert steps.tolist() == [2, 4] and loss.tolist() == [0.5, 0.25]
    assert series["skipped_updates"][0].tolist() == [4]  # A name logged at some steps only.


def test_a_resumed_run_replaces_the_steps_it_logs_again(tmp_path):
    first = _writer(tmp_path)
    for step in (2, 4, 6, 8):
        first.write_scalars(step, {"loss": float(step)})
        if step == 4:
            first.write_scalars(step, {"fid_20": 40.0})  # A second record of the same step is no resume.
    first.close()
    # The run died mid-write at step 10, after its checkpoint at step 4.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "lo')
    resumed = _writer(tmp_path)
    resumed.write_scalars(6, {"loss": -6.0})
    steps, loss = metrics.read_scalars(str(tmp_path))["loss"]
    # Steps 8 and 10 of the first run are dropped: they belong to the history the resumed run replaces.
    assert steps.tolist() == [2, 4, 6] and loss.tolist() == [2.0, 4.0, -6.0]
    resumed.write_scalars(8, {"loss": -8.0})
    resumed.write_scalars(8, {"fid_20": 30.0})
    resumed.close()
    series = metrics.read_scalars(str(tmp_path))
    steps, loss = series["loss"]
    assert steps.tolist() == [2, 4, 6, 8] and loss.tolist() == [2.0, 4.0, -6.0, -8.0]
    assert series["fid_20"][0].tolist() == [4, 8] and series["fid_20"][1].tolist() == [40.0, 30.0]


def test_a_writer_without_a_scalars_path_writes_no_log(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path / "tensorboard"))
    writer.write_scalars(1, {"loss": 1.0})
    writer.close()
    assert not (tmp_path / "metrics.jsonl").exists()
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        metrics.read_scalars(str(tmp_path))


def test_in_a_bucket_the_log_is_rewritten_whole(monkeypatch, tmp_path):
    from ddpm_jax import fileio

    store = {"gs://bucket/run/metrics.jsonl": '{"step": 2, "loss": 1.0}\n{"step": 4, "loss": 0.5}\n'}
    monkeypatch.setattr(fileio, "is_remote", lambda path: str(path).startswith("gs://"))
    monkeypatch.setattr(fileio, "exists", lambda path: path in store)
    monkeypatch.setattr(fileio, "read_text", lambda path: store[path])
    monkeypatch.setattr(fileio, "write_text", lambda path, text: store.__setitem__(path, text))
    writer = metrics.MetricWriter(str(tmp_path / "tensorboard"), "gs://bucket/run/metrics.jsonl")
    writer.write_scalars(4, {"loss": 0.25})  # Objects cannot be appended to: the whole file is written again.
    assert store["gs://bucket/run/metrics.jsonl"].splitlines()[-1] == '{"step": 4, "loss": 0.25}'
    writer.close()
    steps, loss = metrics.read_scalars("gs://bucket/run")["loss"]
    assert steps.tolist() == [2, 4] and loss.tolist() == [1.0, 0.25]
    assert not list(tmp_path.glob("gs*"))  # Nothing went to a local folder named like the bucket.
