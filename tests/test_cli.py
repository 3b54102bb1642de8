"""The real CLI end to end on a tiny model and tiny data, and every bad input it must refuse."""

import json

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from datamanip.cli import app
from tests.models import save_tiny_text_model

runner = CliRunner()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return str(save_tiny_text_model(tmp_path_factory.mktemp("tiny_bert")))


def tiny_args(mirror, model, out, *extra):
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
        "2",
        "--batch-size",
        "10",
        "--log-every",
        "2",
        "--output-dir",
        str(out),
        "--quiet",
        *extra,
    ]


def invoke(args):
    return runner.invoke(app, args, catch_exceptions=False)


def test_weight_end_to_end(tiny_mirror, tiny_model, tmp_path):
    out = tmp_path / "run"
    result = invoke(tiny_args(tiny_mirror, tiny_model, out))
    assert result.exit_code == 0, result.output

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"] == "weighting" and config["batch_size"] == 10
    assert config["subsets"]["train"] == {"0": 10, "1": 40}

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [x for x in lines if x["kind"] == "epoch"]
    assert len(epochs) == 2 and any(x["kind"] == "step" for x in lines)
    for key in (
        "loss",
        "val_accuracy",
        "examples_per_s",
        "weight_mean/class_0",
        "weight_mean/class_1",
    ):
        assert key in epochs[-1]

    results = json.loads((out / "results.json").read_text())
    for key in (
        "val_accuracy",
        "test_accuracy",
        "test_balanced_accuracy",
        "per_class_recall",
        "best_epoch",
        "wall_time_s",
    ):
        assert key in results
    assert results["test_size"] == 24 and results["test_split"] == "test"

    weights = pd.read_parquet(out / "weights.parquet")
    assert list(weights.columns) == ["id", "text", "label", "weight", "loss"]
    assert len(weights) == 50 and weights["id"].is_unique
    assert (weights["weight"] >= 1e-5).all() and not (weights["weight"] == 1.0).all()
    assert (out / "model" / "model.safetensors").is_file()


def test_budget_knobs_end_to_end(tiny_mirror, tiny_model, tmp_path):
    """--reward-every, --val-batch-size and --manipulate-until reach the loop and the config."""
    out = tmp_path / "run"
    flags = ("--reward-every", "2", "--val-batch-size", "3", "--manipulate-until", "0.5")
    result = invoke(tiny_args(tiny_mirror, tiny_model, out, *flags))
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["reward_every"], config["val_batch_size"], config["manipulate_until"]) == (
        2,
        3,
        0.5,
    )
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [x for x in lines if x["kind"] == "epoch"]
    # 50 examples in batches of 10: 5 steps per epoch, 10 in all; the first 5 manipulated,
    # reward steps at manipulated steps 0, 2, 4.
    assert [x["reward_steps"] for x in epochs] == [3, 0]
    assert [x["manipulated"] for x in epochs] == [True, False]


def test_same_seeds_same_run(tiny_mirror, tiny_model, tmp_path):
    runs = []
    for name in ("a", "b"):
        assert invoke(tiny_args(tiny_mirror, tiny_model, tmp_path / name)).exit_code == 0
        runs.append(pd.read_parquet(tmp_path / name / "weights.parquet"))
    pd.testing.assert_frame_equal(runs[0], runs[1])


@pytest.mark.parametrize("method", ["none", "proportion", "ren"])
def test_baselines_run(method, tiny_mirror, tiny_model, tmp_path):
    out = tmp_path / method
    result = invoke(tiny_args(tiny_mirror, tiny_model, out, "--method", method, "--epochs", "1"))
    assert result.exit_code == 0, result.output
    weights = pd.read_parquet(out / "weights.parquet")
    if method == "proportion":  # inverse class frequency: 10 minority vs 40 majority
        by_class = weights.groupby("label")["weight"].first()
        assert by_class[0] == pytest.approx(4 * by_class[1])


def test_seeds_give_mean_and_std(tiny_mirror, tiny_model, tmp_path):
    out = tmp_path / "seeds"
    result = invoke(tiny_args(tiny_mirror, tiny_model, out, "--seeds", "0,1", "--epochs", "1"))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and len(summary["test_accuracy"]) == 2
    assert (out / "seed_0" / "results.json").is_file() and (
        out / "seed_1" / "results.json"
    ).is_file()
    assert "±" in result.output


def test_real_sst2_few_steps(shared_data, tiny_model, tmp_path):
    out = tmp_path / "real"
    args = [
        "weight",
        "--dataset",
        "sst2",
        "--data-dir",
        str(shared_data),
        "--model",
        tiny_model,
        "--imbalance",
        "0.05",
        "--majority-size",
        "200",
        "--epochs",
        "1",
        "--output-dir",
        str(out),
        "--quiet",
    ]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["train_size"] == 210 and results["val_size"] == 20
    assert results["test_size"] == 1821  # the labelled sentence-level test set
    assert len(pd.read_parquet(out / "weights.parquet")) == 210


# --- bad input: one line on stderr, exit status 2, no traceback --------------------------------


def assert_user_error(result, *words):
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    assert "Traceback" not in result.output
    for word in words:
        assert word in message, message


def csv_dataset(tmp_path, rows, header="text,label"):
    path = tmp_path / "data.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return str(path)


def test_unknown_dataset(tiny_model, tmp_path):
    result = runner.invoke(
        app,
        ["weight", "--dataset", "sst9", "--model", tiny_model, "--output-dir", str(tmp_path / "o")],
    )
    assert_user_error(result, "sst9", "sst2")


def test_missing_text_column(tiny_model, tmp_path):
    data = csv_dataset(tmp_path, [f"good film {i},{i % 2}" for i in range(40)])
    result = runner.invoke(
        app,
        [
            "weight",
            "--dataset",
            data,
            "--text-column",
            "review",
            "--model",
            tiny_model,
            "--output-dir",
            str(tmp_path / "o"),
        ],
    )
    assert_user_error(result, "review", "--text-column")


@pytest.mark.parametrize("label,word", [("pos", "integer"), ("7.5", "integer"), ("-3", "range")])
def test_bad_labels(label, word, tiny_model, tmp_path):
    rows = [f"good film {i},{i % 2}" for i in range(40)] + [f"odd film,{label}"]
    result = runner.invoke(
        app,
        [
            "weight",
            "--dataset",
            csv_dataset(tmp_path, rows),
            "--model",
            tiny_model,
            "--output-dir",
            str(tmp_path / "o"),
        ],
    )
    assert_user_error(result, word)


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1"])
def test_imbalance_out_of_range(value, tiny_mirror, tiny_model, tmp_path):
    result = runner.invoke(
        app,
        [
            "weight",
            "--dataset",
            "sst2",
            "--data-dir",
            str(tiny_mirror),
            "--imbalance",
            value,
            "--model",
            tiny_model,
            "--output-dir",
            str(tmp_path / "o"),
        ],
    )
    assert_user_error(result, "--imbalance", "(0, 1]")


def test_too_few_examples_for_subset(tiny_mirror, tiny_model, tmp_path):
    # 60 sentences per class in the tiny mirror; the default 1000 majority cannot be met.
    result = runner.invoke(
        app,
        [
            "weight",
            "--dataset",
            "sst2",
            "--data-dir",
            str(tiny_mirror),
            "--imbalance",
            "0.05",
            "--model",
            tiny_model,
            "--output-dir",
            str(tmp_path / "o"),
        ],
    )
    assert_user_error(result, "class 1", "1000")


def test_model_path_missing(tiny_mirror, tmp_path):
    result = runner.invoke(app, tiny_args(tiny_mirror, str(tmp_path / "no_model"), tmp_path / "o"))
    assert_user_error(result, "no_model", "does not exist")


def test_output_dir_holds_another_run(tiny_mirror, tiny_model, tmp_path):
    out = tmp_path / "run"
    assert invoke(tiny_args(tiny_mirror, tiny_model, out, "--epochs", "1")).exit_code == 0
    result = runner.invoke(app, tiny_args(tiny_mirror, tiny_model, out, "--epochs", "1"))
    assert_user_error(result, "holds another run", "--overwrite")
    again = invoke(tiny_args(tiny_mirror, tiny_model, out, "--epochs", "1", "--overwrite"))
    assert again.exit_code == 0


def test_bad_seeds_flag(tiny_mirror, tiny_model, tmp_path):
    result = runner.invoke(
        app, tiny_args(tiny_mirror, tiny_model, tmp_path / "o", "--seeds", "a,b")
    )
    assert_user_error(result, "--seeds")


def test_bf16_mixed_precision_runs(tiny_mirror, tiny_model, tmp_path):
    out = tmp_path / "bf16"
    result = invoke(
        tiny_args(tiny_mirror, tiny_model, out, "--mixed-precision", "bf16", "--epochs", "1")
    )
    assert result.exit_code == 0, result.output
    weights = pd.read_parquet(out / "weights.parquet")
    assert weights["weight"].notna().all() and weights["loss"].notna().all()


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--w-decay", "0"], ["--w-decay", "positive"]),
        (["--norm", "softmax", "--temperature", "0"], ["--temperature"]),
        (["--w-init", "0"], ["--w-init"]),
        (["--lr", "-1"], ["--lr"]),
        (["--seed", "-1"], ["seeds"]),
        (["--seeds", "0,0"], ["distinct"]),
        (["--seeds", "3-1"], ["--seeds"]),
        (["--log-every", "0"], ["--log-every"]),
        (["--max-length", "1"], ["--max-length"]),
        (["--epochs", "0"], ["--epochs"]),
        (["--mixed-precision", "fp16"], ["fp16", "bf16"]),
        (["--reward-every", "0"], ["--reward-every"]),
        (["--val-batch-size", "0"], ["--val-batch-size"]),
        (["--manipulate-until", "0"], ["--manipulate-until", "(0, 1]"]),
        (["--manipulate-until", "1.5"], ["--manipulate-until"]),
        (["--test-per-class", "0"], ["--test-per-class", "integer >= 1"]),
    ],
)
def test_bad_numbers(flags, words, tiny_mirror, tiny_model, tmp_path):
    result = runner.invoke(app, tiny_args(tiny_mirror, tiny_model, tmp_path / "o", *flags))
    assert_user_error(result, *words)


def test_model_folder_without_config(tiny_mirror, tmp_path):
    (tmp_path / "empty_model").mkdir()
    result = runner.invoke(
        app, tiny_args(tiny_mirror, str(tmp_path / "empty_model"), tmp_path / "o")
    )
    assert_user_error(result, "could not load model")


def test_output_dir_is_a_file_or_holds_a_model(tiny_mirror, tiny_model, tmp_path):
    (tmp_path / "file").write_text("x")
    assert_user_error(
        runner.invoke(app, tiny_args(tiny_mirror, tiny_model, tmp_path / "file")), "is a file"
    )
    keep = tmp_path / "od" / "model" / "keep.txt"
    keep.parent.mkdir(parents=True)
    keep.write_text("mine")
    assert_user_error(
        runner.invoke(app, tiny_args(tiny_mirror, tiny_model, tmp_path / "od")), "holds another run"
    )
    assert keep.read_text() == "mine"


def test_two_named_classes_of_many_get_a_two_way_head(tiny_model, tmp_path):
    rows = [f"film number {i} of kind {i % 3},{i % 3}" for i in range(150)]
    data = csv_dataset(tmp_path, rows)
    out = tmp_path / "three"
    args = [
        "weight",
        "--dataset",
        data,
        "--model",
        tiny_model,
        "--imbalance",
        "0.5",
        "--classes",
        "1,2",
        "--minority-label",
        "2",
        "--majority-size",
        "20",
        "--val-per-class",
        "3",
        "--epochs",
        "1",
        "--output-dir",
        str(out),
        "--quiet",
    ]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["subsets"]["label_map"] == {"1": 0, "2": 1}
    results = json.loads((out / "results.json").read_text())
    assert set(results["per_class_recall"]) == {"class_0", "class_1"}


def test_test_per_class_scores_on_that_many_test_examples(tiny_mirror, tiny_model, tmp_path):
    out = tmp_path / "run"
    result = invoke(tiny_args(tiny_mirror, tiny_model, out, "--test-per-class", "3"))
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["test_size"] == 6
    assert any("--test-per-class 3" in note for note in results["notes"])
