"""Metric writers: TensorBoard events, the JSON-lines scalar log that notebooks read, the progress line, the clock."""

import io
import json
import os
import time

import numpy as np
import pytest
from helpers import read_events
from PIL import Image

from ddpm_jax import metric_writers as metrics


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


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0s"), (45, "45s"), (59.9, "59s"), (60, "1m00s"), (185, "3m05s"), (3599, "59m59s"), (3600, "1h00m"),
     (7620, "2h07m"), (90061, "25h01m"), (-5, "0s")],
)
def test_format_duration(seconds, text):
    assert metrics.format_duration(seconds) == text


def test_progress_line_has_step_loss_lr_throughput_and_eta():
    scalars = {"loss": 0.123456, "grad_norm": 1.5, "learning_rate": 2e-4, "steps_per_sec": 10.0,
               "images_per_sec": 1280.0}
    line = metrics.progress_line(900, 1000, scalars)
    assert "\n" not in line
    for part in ("step 900/1000", "(90.0%)", "loss 0.1235", "grad_norm 1.500", "lr 2.00e-04", "10.00 steps/s",
                 "1280.0 img/s"):
        assert part in line, (part, line)
    assert line.endswith("ETA 10s")  # 100 steps left at 10 steps/s.
    assert metrics.progress_line(0, 1000, {**scalars, "steps_per_sec": 2.0}).endswith("ETA 8m20s")
    assert metrics.progress_line(1000, 1000, scalars).endswith("ETA 0s")
    # Before the first throughput measurement there is no ETA to give.
    no_rate = {k: v for k, v in scalars.items() if k not in ("steps_per_sec", "images_per_sec")}
    assert metrics.progress_line(5, 1000, no_rate).endswith("ETA ?")


def test_metric_writer_scalars_and_images_read_back(tmp_path):
    logdir = tmp_path / "tensorboard"
    writer = metrics.MetricWriter(str(logdir))
    writer.write_scalars(2, {"loss": 0.5, "learning_rate": np.float32(1e-3)})
    writer.write_scalars(4, {"loss": 0.25, "learning_rate": 2e-3})
    image = (np.arange(72) * 3 % 251).astype(np.uint8).reshape(4, 6, 3)
    writer.write_image(4, "samples", image)
    writer.close()
    writer.close()  # A second close is harmless.

    files = os.listdir(logdir)
    assert len(files) == 1 and files[0].startswith("events.out.tfevents.")
    events = read_events(logdir / files[0])
    scalars, pictures = {}, {}
    for event in events:
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars[(event.step, value.tag)] = value.simple_value
            elif value.HasField("image"):
                pictures[(event.step, value.tag)] = value.image
    assert scalars == {
        (2, "loss"): pytest.approx(0.5), (2, "learning_rate"): pytest.approx(1e-3),
        (4, "loss"): pytest.approx(0.25), (4, "learning_rate"): pytest.approx(2e-3),
    }
    assert list(pictures) == [(4, "samples")]
    png = pictures[(4, "samples")]
    assert (png.height, png.width, png.colorspace) == (4, 6, 3)
    with Image.open(io.BytesIO(png.encoded_image_string)) as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), image)


def test_step_clock_counts_steps_and_leaves_paused_time_out():
    clock = metrics.StepClock()
    assert clock.steps_per_sec() == 0.0
    clock.count(10)
    time.sleep(0.05)
    with clock.paused():
        time.sleep(0.3)  # Periodic work: not training time.
    rate = clock.steps_per_sec()
    assert 10 / 0.2 < rate < 10 / 0.04, rate  # About 10 steps in 0.05 s, not in 0.35 s.
    clock.restart()
    assert clock.steps_per_sec() == 0.0
