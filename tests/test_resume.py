"""Checkpoints and resuming: a run killed partway and resumed ends exactly where an uninterrupted
run ends; a kill during a save, a corrupt checkpoint and changed settings are handled.

The runs are real CLI runs in subprocesses (``python -m datamanip``), one thread each, so that a
kill is a real SIGKILL and the arithmetic of every run is the same; the tiny model keeps its
dropout (0.1), so the RNG states in the checkpoint are part of what is checked.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from datamanip.checkpoint import Checkpoints, latest, listed
from datamanip.cli import app
from datamanip.engine import LoopState
from datamanip.manipulations import LearnedWeighting
from tests.models import save_tiny_text_model, tiny_classifier

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_tiny_text_model(tmp_path_factory.mktemp("tiny_bert")))


def run_args(mirror, model, out, *extra):
    # 50 examples, batch 10: 5 steps an epoch, 15 in all, a checkpoint every 2 steps.
    return [
        "weight",
        "--dataset",
        "sst2",
        "--data-dir",
        str(mirror),
        "--model",
        model,
        "--imbalance",
        "0.25",
        "--majority-size",
        "40",
        "--val-per-class",
        "4",
        "--epochs",
        "3",
        "--batch-size",
        "10",
        "--log-every",
        "1",
        "--save-every",
        "2",
        "--output-dir",
        str(out),
        "--quiet",
        *extra,
    ]


def start(args) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "datamanip", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output.decode()


def kill_after_checkpoints(process: subprocess.Popen, folder: Path, count: int) -> None:
    """SIGKILLs ``process`` as soon as ``count`` checkpoints are complete in ``folder``."""
    deadline = time.monotonic() + 300
    while len(listed(folder)) < count:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()


def metrics_without_timing(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "examples_per_s"} for r in records]


def test_killed_run_resumes_to_the_same_end(tiny_mirror, tiny_model, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    uninterrupted = start(run_args(tiny_mirror, tiny_model, whole))
    interrupted = start(run_args(tiny_mirror, tiny_model, killed))
    kill_after_checkpoints(interrupted, killed / "checkpoints", 2)
    assert not (killed / "results.json").exists()
    stopped_at = json.loads(latest(killed / "checkpoints").read_text())["global_step"]
    assert 0 < stopped_at < 15

    # A copy of the killed run with its newest checkpoint cut short, for the corruption check.
    corrupt = tmp_path / "corrupt"
    shutil.copytree(killed, corrupt)

    # The same command again continues from the last checkpoint; here in this process (no
    # second start-up), on one thread like the subprocesses, so the arithmetic is theirs.
    in_one_thread(run_args(tiny_mirror, tiny_model, killed))
    finish(uninterrupted)

    # Exactly equal on CPU: the checkpoint holds every state the rest of the run reads.
    a, b = pd.read_parquet(whole / "weights.parquet"), pd.read_parquet(killed / "weights.parquet")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    results = [json.loads((d / "results.json").read_text()) for d in (whole, killed)]
    for key in ("test_accuracy", "val_accuracy", "best_epoch", "per_class_recall"):
        assert results[0][key] == results[1][key], key
    assert metrics_without_timing(whole / "metrics.jsonl") == metrics_without_timing(
        killed / "metrics.jsonl"
    )  # no line lost, none written twice
    models = [load_file(d / "model" / "model.safetensors") for d in (whole, killed)]
    for name, tensor in models[0].items():
        assert torch.equal(tensor, models[1][name]), name
    assert not (killed / "checkpoints").exists()  # removed once the run finished

    # A truncated checkpoint: one line naming it and the previous good one.
    newest, previous = (m.with_suffix(".pt") for m in listed(corrupt / "checkpoints")[::-1][:2])
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    result = CliRunner().invoke(app, run_args(tiny_mirror, tiny_model, corrupt))
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    assert str(newest) in message and str(previous) in message and "corrupt" in message

    # Other settings on the same run directory: the error names the keys that differ.
    result = CliRunner().invoke(
        app, run_args(tiny_mirror, tiny_model, corrupt, "--resume", "--lr", "1e-4", "--seed", "3")
    )
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert "lr (4e-05 → 0.0001)" in message and "seed (0 → 3)" in message, message


def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    model = tiny_classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    weighting = LearnedWeighting(torch.tensor([0, 1, 0, 1]), 2)
    checkpoints = Checkpoints(tmp_path, model, optimizer, weighting, {"lr": 1e-3})
    checkpoints.save(LoopState(epoch=0, step_in_epoch=3, global_step=3))

    # What a kill leaves at each point of the next save: a partial temporary file; the
    # renamed .pt without its record. Neither counts.
    (tmp_path / "step_0000004.pt.tmp").write_bytes(b"partial")
    shutil.copy(tmp_path / "step_0000003.pt", tmp_path / "step_0000005.pt")
    weighting.weights[:] = 7.0
    state = checkpoints.restore(LoopState)
    assert state.global_step == 3 and state.step_in_epoch == 3
    assert torch.all(weighting.weights == 0.01)  # the weights as they were saved


def test_resume_without_a_checkpoint_says_so(tiny_mirror, tiny_model, tmp_path):
    result = CliRunner().invoke(
        app, run_args(tiny_mirror, tiny_model, tmp_path / "new", "--resume")
    )
    assert result.exit_code == 2
    assert "no checkpoint" in result.stderr and "without --resume" in result.stderr


def in_one_thread(args):
    """Runs the CLI in this process on one thread, as the subprocesses run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(app, args)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output


def test_killed_real_sst2_run_resumes_exactly(shared_data, tiny_model, tmp_path):
    def args(out):
        # 105 real sentences (5 negative : 100 positive), batch 25: 5 steps an epoch, 2 epochs.
        return run_args(shared_data, tiny_model, out, "--imbalance", "0.05", "--majority-size",
                        "100", "--batch-size", "25", "--epochs", "2", "--val-per-class", "10")  # fmt: skip

    killed = tmp_path / "killed"
    interrupted = start(args(killed))
    kill_after_checkpoints(interrupted, killed / "checkpoints", 1)
    assert not (killed / "results.json").exists()
    in_one_thread(args(killed))  # continues from the checkpoint
    in_one_thread(args(tmp_path / "whole"))

    a, b = (pd.read_parquet(d / "weights.parquet") for d in (tmp_path / "whole", killed))
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    results = [json.loads((d / "results.json").read_text()) for d in (tmp_path / "whole", killed)]
    assert results[0]["test_size"] == 1821
    assert results[0]["test_accuracy"] == results[1]["test_accuracy"]
