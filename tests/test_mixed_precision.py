"""bf16 on CPU against float32: the weight gradients at the same θ, and whole runs.

Under ``--mixed-precision bf16`` the forwards of the training batch and of the validation set run
in bf16 (autocast); the parameters, the optimiser, the lookahead θ' and the central difference
that gives the weight gradients stay in float32. bf16 keeps 8 bits of mantissa (relative
rounding 4e-3), so the validation gradient, and with it every weight gradient, carries about
1% of error in scale; the direction is kept (cosine 0.99999994 measured). Were the two shifted
forwards of the central difference in bf16 too, their loss difference (about 3e-4 of the loss)
would sit below bf16's resolution: measured so, the error was 44% of the largest gradient.
"""

import json

import pandas as pd
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from typer.testing import CliRunner

from datamanip.cli import app
from datamanip.engine import example_reward_gradients, take_step
from datamanip.manipulations import LearnedWeighting
from datamanip.manipulations.base import Step
from tests.models import save_tiny_text_model, tiny_classifier
from tests.test_engine import tiny_split


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps one shared state per process: a bf16 one left behind would make the
    next test's ``Accelerator(cpu=True)`` autocast too."""
    yield
    AcceleratorState._reset_state()


def weight_gradients(mixed_precision: str) -> torch.Tensor:
    """The weight gradients of one batch after three plain float32 steps (so Adam has state),
    computed under ``mixed_precision``."""
    AcceleratorState._reset_state()
    model = tiny_classifier(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train, val = tiny_split(32, 0), tiny_split(16, 1)
    weighting = LearnedWeighting(train.labels, 2, w_init=1.0)
    val_batches = [val.batch(torch.arange(16))]
    for positions in torch.arange(24).split(8):
        take_step(model, optimizer, weighting, train.batch(positions), val_batches, False,
                  Accelerator(cpu=True))  # fmt: skip

    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # as the engine does
    step = Step(train.batch(torch.arange(24, 32)), inner, twice_differentiable=False)
    with accelerator.autocast():
        step.example_losses()
    coeffs, phi = weighting.lookahead_weights(step)
    grads, _ = example_reward_gradients(
        inner, optimizer, step, coeffs, phi, val_batches, accelerator.autocast
    )
    return grads[0]


def test_bf16_weight_gradients_match_float32():
    reference, bf16 = weight_gradients("no"), weight_gradients("bf16")
    assert (bf16 - reference).abs().max() < 3e-2 * reference.abs().max()
    assert torch.nn.functional.cosine_similarity(bf16, reference, dim=0) > 0.9999


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_tiny_text_model(tmp_path_factory.mktemp("tiny_bert")))


def run(data_dir, model, out, mixed_precision, majority):
    args = [
        "weight",
        "--dataset",
        "sst2",
        "--data-dir",
        str(data_dir),
        "--model",
        model,
        "--imbalance",
        "0.25",
        "--majority-size",
        str(majority),
        "--val-per-class",
        "4",
        "--epochs",
        "2",
        "--batch-size",
        "10",
        "--lr",
        "5e-3",
        "--mixed-precision",
        mixed_precision,
        "--output-dir",
        str(out),
        "--quiet",
    ]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    epochs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "loss": [r["loss"] for r in epochs if r["kind"] == "epoch"],
        "results": json.loads((out / "results.json").read_text()),
        "weights": pd.read_parquet(out / "weights.parquet")["weight"],
    }


@pytest.mark.parametrize("data", ["tiny", "real"])
def test_bf16_run_matches_float32(data, tiny_mirror, tiny_model, tmp_path, request):
    """Whole runs drift apart step by step (each step's bf16 rounding moves θ a little), so
    the tolerance is on what a user reads: the mean training loss per epoch within 1e-2
    (measured: 4e-3 at most), and which examples the weights favour, as the correlation of the
    two weight vectors, above 0.9 (measured on the tiny data: 0.99)."""
    data_dir = request.getfixturevalue("shared_data") if data == "real" else tiny_mirror
    majority = 100 if data == "real" else 40
    a = run(data_dir, tiny_model, tmp_path / "fp32", "no", majority)
    b = run(data_dir, tiny_model, tmp_path / "bf16", "bf16", majority)
    assert max(abs(x - y) for x, y in zip(a["loss"], b["loss"])) < 1e-2
    assert a["weights"].corr(b["weights"]) > 0.9
    assert b["results"]["num_processes"] == 1
