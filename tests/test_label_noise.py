"""--label-noise: which labels flip is fixed by the data seed, recorded, and found again."""

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from datamanip.cli import app
from datamanip.data import build_subsets, load_source
from datamanip.errors import DatamanipError
from datamanip.noise import precision_at_k, ranked
from tests.models import save_tiny_text_model


def test_flips_are_seeded_recorded_and_change_the_class(tiny_mirror):
    source = load_source("sst2", data_dir=tiny_mirror)
    clean = build_subsets(source, per_class=40, val_per_class=5, data_seed=3)
    noisy = build_subsets(source, per_class=40, val_per_class=5, data_seed=3, label_noise=0.25)
    again = build_subsets(source, per_class=40, val_per_class=5, data_seed=3, label_noise=0.25)
    other = build_subsets(source, per_class=40, val_per_class=5, data_seed=4, label_noise=0.25)

    # The same examples are drawn; only training labels change, exactly a quarter of them.
    assert np.array_equal(clean.train.ids, noisy.train.ids)
    assert np.array_equal(clean.val.labels, noisy.val.labels)
    assert np.array_equal(noisy.original_train_labels, clean.train.labels)
    flipped = noisy.flipped()
    assert flipped.sum() == 20
    assert np.all(noisy.train.labels[flipped] != clean.train.labels[flipped])
    assert np.array_equal(noisy.train.labels[~flipped], clean.train.labels[~flipped])

    assert np.array_equal(again.train.labels, noisy.train.labels)
    assert not np.array_equal(other.flipped(), flipped)

    record = noisy.summary["label_noise"]
    assert record["flipped"] == 20
    assert record["flipped_ids"] == noisy.train.ids[flipped].tolist()
    assert record["original_labels"] == clean.train.labels[flipped].tolist()
    assert not clean.flipped().any() and "label_noise" not in clean.summary


def test_flips_are_uniform_over_the_other_classes(tmp_path):
    """Five classes: a flipped label lands on each of the four others about equally often."""
    rows = [(i, f"text {i}", i % 5) for i in range(5000)]
    frame = pd.DataFrame(rows, columns=["idx", "text", "label"])
    frame.to_parquet(tmp_path / "train.parquet")
    frame.head(50).to_parquet(tmp_path / "test.parquet")
    source = load_source(str(tmp_path))
    noisy = build_subsets(source, per_class=900, val_per_class=2, label_noise=0.5)
    flipped = noisy.flipped()
    moves = pd.crosstab(noisy.original_train_labels[flipped], noisy.train.labels[flipped])
    assert (np.diag(moves.reindex(columns=range(5), fill_value=0).to_numpy()) == 0).all()
    share = moves.to_numpy().sum(axis=0) / flipped.sum()
    assert np.allclose(share, 0.2, atol=0.03)


@pytest.mark.parametrize("p", [-0.1, 1.0, float("nan")])
def test_bad_fraction_is_a_one_line_error(tiny_mirror, p):
    source = load_source("sst2", data_dir=tiny_mirror)
    with pytest.raises(DatamanipError, match="--label-noise"):
        build_subsets(source, per_class=10, val_per_class=2, label_noise=p)


def test_precision_at_k_against_a_hand_count():
    table = pd.DataFrame(
        {
            "weight": [0.5, 1e-5, 1e-5, 0.3, 0.9, 0.2],
            "loss": [0.1, 2.0, 3.0, 0.4, 0.2, 1.0],
            "flipped": [False, True, False, True, False, True],
        }
    )
    # Lowest weight first, ties by higher loss: rows 2, 1, 5, 3, 0, 4.
    assert list(ranked(table).index) == [2, 1, 5, 3, 0, 4]
    assert precision_at_k(table, 1) == 0.0
    assert precision_at_k(table, 3) == pytest.approx(2 / 3)
    assert precision_at_k(table, 2, by="loss") == 0.5  # rows 2 and 1
    assert precision_at_k(table, 100) == 0.5
    # Weight alone: ties at 1e-5 stay in table order: rows 1, 2, 5, ...
    assert list(ranked(table, "weight_alone").index) == [1, 2, 5, 3, 0, 4]
    assert precision_at_k(table, 1, by="weight_alone") == 1.0


def test_weight_cli_marks_flipped_examples(tiny_mirror, tmp_path):
    model = str(save_tiny_text_model(tmp_path / "tiny"))
    out = tmp_path / "run"
    args = ["weight", "--dataset", "sst2", "--data-dir", str(tiny_mirror), "--model", model]
    args += ["--per-class", "20", "--val-per-class", "4", "--epochs", "1", "--batch-size", "10"]
    args += ["--warmup-epochs", "0"]
    args += ["--label-noise", "0.2", "--output-dir", str(out), "--quiet"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output

    weights = pd.read_parquet(out / "weights.parquet")
    assert weights["flipped"].sum() == 8
    flipped = weights[weights["flipped"]]
    assert (flipped["label"] != flipped["original_label"]).all()
    results = json.loads((out / "results.json").read_text())
    noise = results["label_noise"]
    assert noise["base_rate"] == pytest.approx(0.2) and noise["flipped"] == 8
    assert noise["precision_at_50_lowest_weight"] == precision_at_k(weights, 50)
    assert noise["precision_at_50_weight_alone"] == precision_at_k(weights, 50, "weight_alone")
    lowest = weights["weight"] == weights["weight"].min()
    assert noise["flipped_at_lowest_weight"] == weights["flipped"][lowest].sum()


def test_real_sst2_noise(shared_data):
    source = load_source("sst2", data_dir=shared_data)
    noisy = build_subsets(source, per_class=500, val_per_class=10, label_noise=0.2)
    assert noisy.flipped().sum() == 200
    assert set(np.unique(noisy.train.labels[noisy.flipped()])) == {0, 1}


def test_noise_survives_the_two_class_relabelling(tmp_path):
    """--imbalance with --classes 1,3 on five classes: labels become 0/1, the record follows."""
    from datamanip.config import RunConfig, resolve
    from datamanip.experiment import load_subsets

    rows = [(i, f"text {i}", i % 5) for i in range(1000)]
    frame = pd.DataFrame(rows, columns=["idx", "text", "label"])
    frame.to_parquet(tmp_path / "train.parquet")
    frame.head(100).to_parquet(tmp_path / "test.parquet")
    config = RunConfig(dataset=str(tmp_path), imbalance=0.5, majority_size=100, classes=[1, 3])
    config.minority_label = 1
    config = resolve(RunConfig(**(config.to_dict() | {"label_noise": 0.1, "val_per_class": 5})))
    subsets, num_labels = load_subsets(config)
    assert num_labels == 2
    assert set(subsets.train.labels) == {0, 1} and set(subsets.original_train_labels) == {0, 1}
    assert subsets.flipped().sum() == 15
