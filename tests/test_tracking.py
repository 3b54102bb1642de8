"""--log-with tensorboard: the tracker receives the same metrics as metrics.jsonl."""

import json

import pytest
from typer.testing import CliRunner

from datamanip.cli import app
from datamanip.config import RunConfig, resolve
from datamanip.errors import DatamanipError
from datamanip.tracking import scalars
from tests.models import save_tiny_text_model

runner = CliRunner()


def test_tensorboard_gets_the_metrics_file(tiny_mirror, tmp_path):
    pytest.importorskip(
        "tensorboard", reason="tensorboard is not installed (pip install tensorboard)"
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = str(save_tiny_text_model(tmp_path / "tiny"))
    out = tmp_path / "run"
    args = ["weight", "--dataset", "sst2", "--data-dir", str(tiny_mirror), "--model", model]
    args += ["--imbalance", "0.25", "--majority-size", "40", "--val-per-class", "4"]
    args += ["--epochs", "2", "--batch-size", "10", "--log-every", "2", "--log-with", "tensorboard"]
    args += ["--output-dir", str(out), "--quiet"]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for tag, value in scalars(record).items():
            expected.setdefault(tag, []).append((record["step"], value))
    assert "epoch/val_accuracy" in expected and "step/weight_mean/class_0" in expected

    events = list((out / "trackers").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file under the run directory"
    acc = EventAccumulator(str(events[0].parent)).Reload()
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points]
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6)


def test_unknown_or_missing_tracker_is_a_one_line_error():
    with pytest.raises(DatamanipError, match="not a tracker Accelerate knows"):
        resolve(RunConfig(log_with=["tensorbored"]))
    import importlib.util

    absent = next(
        (
            n
            for n in ("aim", "swanlab", "dvclive", "clearml")
            if importlib.util.find_spec(n) is None
        ),
        None,
    )
    if absent is None:
        pytest.skip("every optional tracker is installed here")
    with pytest.raises(DatamanipError, match=f"pip install {absent}"):
        resolve(RunConfig(log_with=[absent]))
