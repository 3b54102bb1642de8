"""Image data, encoding, models and subsets: real CIFAR-10, local image folders, tiny ResNets."""

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image as PILImage
from typer.testing import CliRunner

from datamanip.cli import app
from datamanip.config import RunConfig, resolve
from datamanip.data import build_subsets, dataset_kind, load_source
from datamanip.data.sources import Source, Split
from datamanip.errors import DatamanipError
from datamanip.images import (
    CROP_PADDING,
    channel_stats,
    crop_flip,
    decode_images,
    encode_images,
    random_crop_flip,
)
from datamanip.models import load_image_classifier
from tests.models import tiny_resnet

runner = CliRunner()


def write_image_folder(root, per_class=12, size=16, classes=("cat", "dog"), seed=0):
    """Writes ``root/CLASS/NNN.png``: class k's images are bright in channel k, so learnable."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 100, (size, size, 3), dtype=np.uint8)
            pixels[..., label % 3] += 150
            PILImage.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


# --- the data layer ----------------------------------------------------------------------------


def test_cifar10_decodes_through_datasets_image(shared_data):
    source = load_source("cifar10", data_dir=shared_data)
    assert source.kind == "image" and source.num_labels == 10
    assert len(source.splits["train"]) == 50_000 and len(source.splits["test"]) == 10_000

    subsets = build_subsets(source, imbalance=0.02)  # the paper's pair: 0 minority, 1 majority
    assert subsets.summary["train"] == {"0": 20, "1": 1000}
    assert subsets.summary["val"] == {"0": 10, "1": 10}
    assert subsets.summary["test"] == {"0": 1000, "1": 1000}
    assert any("classes 0 and 1" in note for note in subsets.notes)

    pixels = decode_images(subsets.val, "val subset of cifar10")
    assert pixels.shape == (20, 3, 32, 32) and pixels.dtype == torch.uint8
    # Reference: PIL on the stored JPEG bytes, without datasets in between.
    stored = subsets.val.inputs[3]["bytes"]
    direct = np.asarray(PILImage.open(io.BytesIO(stored)).convert("RGB"))
    np.testing.assert_array_equal(pixels[3].permute(1, 2, 0).numpy(), direct)


def test_cifar10_low_data_and_long_tailed_subsets(shared_data):
    source = load_source("cifar10", data_dir=shared_data)
    low = build_subsets(source, per_class=40, val_per_class=2)
    assert set(low.summary["train"].values()) == {40} and len(low.summary["train"]) == 10
    assert set(low.summary["val"].values()) == {2} and len(low.test) == 10_000

    tail = build_subsets(source, imbalance_factor=100, val_per_class=10)
    counts = [tail.summary["train"][str(c)] for c in range(10)]
    assert counts[0] == 4990  # 5000 per class less 10 validation
    assert counts[-1] == 49  # 4990 / 100
    assert all(a > b for a, b in zip(counts, counts[1:]))
    # Exponential profile: equal ratios between neighbouring classes, factor 100 end to end.
    ratios = np.array(counts[:-1]) / np.array(counts[1:])
    np.testing.assert_allclose(ratios, 100 ** (1 / 9), rtol=0.03)
    assert tail.summary["mode"] == "long-tailed" and len(tail.test) == 10_000


def test_image_folder_with_corrupt_image_names_its_id(tmp_path):
    folder = write_image_folder(tmp_path / "pets")
    (folder / "dog" / "005.png").write_bytes(b"not a png at all")
    source = load_source(folder)
    assert source.kind == "image" and source.label_names == ["cat", "dog"]
    train = source.splits["train"]
    assert np.bincount(train.labels).tolist() == [12, 12]

    with pytest.raises(DatamanipError) as excinfo:
        decode_images(train, "train split of pets")
    message = str(excinfo.value)
    assert "\n" not in message
    assert "cannot decode 1 image" in message and "id 17" in message  # 12 cats, then dog 005
    assert "005.png" in message and "replace or remove" in message


def test_image_folder_with_split_folders(tmp_path):
    root = tmp_path / "shapes"
    write_image_folder(root / "train", per_class=6, classes=("a", "b", "c"))
    write_image_folder(root / "test", per_class=2, classes=("a", "c"), seed=1)
    source = load_source(root)
    assert set(source.splits) == {"train", "test"} and source.num_labels == 3
    assert sorted(set(source.splits["test"].labels.tolist())) == [0, 2]  # "c" is label 2

    write_image_folder(root / "validation", per_class=1, classes=("z",))
    with pytest.raises(DatamanipError, match="class folder of the validation split"):
        load_source(root)


def test_images_of_different_sizes_are_refused(tmp_path):
    folder = write_image_folder(tmp_path / "pets")
    PILImage.new("RGB", (20, 20)).save(folder / "cat" / "big.png")
    with pytest.raises(DatamanipError, match="differ in size.*resize"):
        decode_images(load_source(folder).splits["train"], "train split of pets")


def test_dataset_kind(tmp_path, shared_data):
    assert dataset_kind("cifar10") == "image" and dataset_kind("sst2") == "text"
    assert dataset_kind(write_image_folder(tmp_path / "pets")) == "image"
    frame = pd.read_parquet(shared_data / "cifar10" / "test.parquet").head(30)
    frame.to_parquet(tmp_path / "few.parquet")
    assert dataset_kind(tmp_path / "few.parquet") == "image"
    pd.DataFrame({"text": ["a b", "c d"], "label": [0, 1]}).to_parquet(tmp_path / "t.parquet")
    assert dataset_kind(tmp_path / "t.parquet") == "text"


# --- encoding ----------------------------------------------------------------------------------


def test_crop_flip_matches_a_per_example_loop():
    images = torch.rand(5, 3, 6, 7, generator=torch.Generator().manual_seed(0))
    offsets = torch.tensor([[0, 0], [4, 4], [8, 8], [1, 7], [6, 2]])
    flips = torch.tensor([False, False, True, True, False])
    fast = crop_flip(images, offsets, flips)

    p = CROP_PADDING
    for i in range(5):
        padded = np.zeros((3, 6 + 2 * p, 7 + 2 * p))
        padded[:, p:-p, p:-p] = images[i].numpy()
        top, left = offsets[i].tolist()
        slow = padded[:, top : top + 6, left : left + 7]
        slow = slow[:, :, ::-1] if flips[i] else slow
        np.testing.assert_allclose(fast[i].numpy(), slow, atol=0)
    assert torch.equal(fast[1], images[1])  # centred and not flipped: the image itself


def test_random_crop_flip_draws_from_its_generator():
    images = torch.rand(64, 3, 8, 8)
    a = random_crop_flip(images, torch.Generator().manual_seed(3))
    b = random_crop_flip(images, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, images)


def test_channel_stats_and_normalised_batches():
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8, generator=g)
    mean, std = channel_stats(pixels)
    values = pixels.numpy().astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1) / 255
    np.testing.assert_allclose(mean.numpy(), values.mean(1), rtol=1e-6)
    np.testing.assert_allclose(std.numpy(), values.std(1, ddof=1), rtol=1e-6)


def test_encode_images_normalises_by_the_training_subset(tmp_path):
    source = load_source(write_image_folder(tmp_path / "pets"))
    train = source.splits["train"]
    val, test = train.take([0, 20]), train.take([1, 2, 21])
    enc_train, enc_val, _ = encode_images(train, val, test, dataset="pets", crop_flip=True, seed=0)
    plain = enc_train.plain().batch(torch.arange(len(train))).inputs["pixel_values"]
    assert plain.shape == (24, 3, 16, 16)
    torch.testing.assert_close(plain.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(plain.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)

    cropped = enc_train.batch(torch.arange(len(train))).inputs["pixel_values"]
    assert not torch.equal(cropped, plain)  # training batches are cropped and flipped
    first = enc_val.batch(torch.arange(2)).inputs["pixel_values"]
    assert torch.equal(first, enc_val.batch(torch.arange(2)).inputs["pixel_values"])


# --- models and settings -----------------------------------------------------------------------


def test_image_models_take_pixel_values(tmp_path):
    model = load_image_classifier("resnet-small", num_labels=10)
    logits = model(pixel_values=torch.randn(2, 3, 32, 32)).logits
    assert logits.shape == (2, 10)

    tiny_resnet(num_labels=3).save_pretrained(tmp_path / "tiny")
    loaded = load_image_classifier(str(tmp_path / "tiny"), num_labels=2)
    fresh = load_image_classifier(str(tmp_path / "tiny"), num_labels=2, pretrained=False)
    key = "resnet.embedder.embedder.convolution.weight"
    assert torch.equal(loaded.state_dict()[key], tiny_resnet().state_dict()[key])
    assert not torch.equal(fresh.state_dict()[key], loaded.state_dict()[key])
    assert loaded.classifier[-1].out_features == 2  # a fresh head for the task's classes

    with pytest.raises(DatamanipError, match="could not load image model.*resnet-small"):
        load_image_classifier(str(tmp_path), num_labels=2)


def test_image_setups_take_the_papers_cifar_settings():
    imbalanced = resolve(RunConfig(dataset="cifar10", imbalance=0.05))
    assert (imbalanced.kind, imbalanced.optimizer, imbalanced.model) == ("image", "sgd", "resnet34")
    assert imbalanced.lr == 1e-3 and imbalanced.batch_size == 20 and imbalanced.epochs == 15
    assert imbalanced.w_decay == 2.0 and imbalanced.val_per_class == 10

    low = resolve(RunConfig(dataset="cifar10", per_class=40, method="weighting"))
    assert (low.batch_size, low.epochs, low.warmup_epochs, low.val_per_class) == (10, 20, 5, 2)
    plain = resolve(RunConfig(dataset="cifar10", per_class=40, method="none"))
    assert (plain.epochs, plain.warmup_epochs) == (15, 0)
    text = resolve(RunConfig(dataset="sst2", imbalance=0.05))
    assert (text.optimizer, text.model, text.lr) == ("adamw", "minilm", 4e-5)

    with pytest.raises(DatamanipError, match="--imbalance-factor"):
        resolve(RunConfig(dataset="cifar10", imbalance_factor=100, per_class=40))


def test_long_tail_options_are_checked():
    labels = np.repeat(np.arange(3), 30)
    source = Source(
        "toy", "image", {"train": Split(np.arange(90), [None] * 90, labels)}, 3, None, "made up"
    )
    sizes = build_subsets(source, imbalance_factor=4, val_per_class=2).summary["train"]
    assert sizes == {"0": 28, "1": 14, "2": 7}  # 28 · 4^(-c/2)
    with pytest.raises(DatamanipError, match="below 1"):
        build_subsets(source, imbalance_factor=0.5)
    with pytest.raises(DatamanipError, match="only one of them"):
        build_subsets(source, imbalance_factor=4, per_class=3)


# --- the command end to end --------------------------------------------------------------------


def test_weight_command_on_an_image_folder(tmp_path):
    folder = write_image_folder(tmp_path / "pets", per_class=30)
    tiny_resnet().save_pretrained(tmp_path / "tiny")
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "weight",
            "--dataset",
            str(folder),
            "--imbalance",
            "0.5",
            "--majority-size",
            "20",
            "--val-per-class",
            "4",
            "--model",
            str(tmp_path / "tiny"),
            "--method",
            "weighting",
            "--epochs",
            "2",
            "--batch-size",
            "6",
            "--log-every",
            "2",
            "--output-dir",
            str(out),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["kind"], config["optimizer"], config["crop_flip"]) == ("image", "sgd", True)
    assert config["subsets"]["train"] == {"0": 10, "1": 20}
    results = json.loads((out / "results.json").read_text())
    assert results["train_size"] == 30 and results["test_split"] == "train-remainder"
    weights = pd.read_parquet(out / "weights.parquet")
    assert len(weights) == 30 and weights["path"].str.endswith(".png").all()
    assert weights["weight"].between(0, 1).all() and weights["weight"].nunique() > 1
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("reward_loss" in record for record in steps)
    assert (out / "model" / "config.json").is_file()


def test_weight_command_reports_a_corrupt_image_in_one_line(tmp_path):
    folder = write_image_folder(tmp_path / "pets", per_class=30)
    (folder / "cat" / "002.png").write_bytes(b"\x89PNG broken")
    tiny_resnet().save_pretrained(tmp_path / "tiny")
    args = ["weight", "--dataset", str(folder), "--per-class", "20", "--val-per-class", "5"]
    args += ["--model", str(tmp_path / "tiny"), "--output-dir", str(tmp_path / "run"), "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "id 2 " in errors[0] and "002.png" in errors[0]


@pytest.mark.parametrize("method", ["none", "proportion", "ren", "weighting"])
def test_weight_command_on_real_cifar10(shared_data, tmp_path, method):
    """Every weighting method on the real two-class CIFAR-10, one short epoch of a tiny ResNet."""
    tiny_resnet().save_pretrained(tmp_path / "tiny")
    out = tmp_path / method
    args = ["weight", "--dataset", "cifar10", "--data-dir", str(shared_data), "--imbalance"]
    args += ["0.05", "--majority-size", "60", "--method", method, "--epochs", "1"]
    args += ["--model", str(tmp_path / "tiny"), "--output-dir", str(out), "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["train_size"] == 63 and results["test_size"] == 2000
    assert 0 <= results["test_accuracy"] <= 1


def test_image_recipe_runs_as_its_first_line_says(shared_data, tmp_path):
    """`datamanip run cifar10_imbalance_0.05 --seeds ... --data-dir ...`, shortened by overrides."""
    tiny_resnet().save_pretrained(tmp_path / "tiny")
    args = ["run", "cifar10_imbalance_0.05", "--seeds", "0", "--data-dir", str(shared_data)]
    args += [f"model={tmp_path / 'tiny'}", "majority_size=40", "epochs=1", "--methods", "none"]
    args += ["--output-dir", str(tmp_path / "runs"), "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    config = yaml.safe_load(next((tmp_path / "runs").rglob("config.yaml")).read_text())
    assert config["data_dir"] == str(shared_data) and config["subsets"]["train"] == {
        "0": 2,
        "1": 40,
    }


def test_weight_command_long_tailed_without_crop_flip(tmp_path):
    folder = tmp_path / "shapes"
    write_image_folder(folder / "train", per_class=20, classes=("a", "b", "c"))
    write_image_folder(folder / "test", per_class=3, classes=("a", "b", "c"), seed=1)
    tiny_resnet(num_labels=3).save_pretrained(tmp_path / "tiny")
    out = tmp_path / "run"
    args = ["weight", "--dataset", str(folder), "--imbalance-factor", "4", "--val-per-class"]
    args += ["2", "--method", "proportion", "--epochs", "1", "--no-crop-flip", "--model"]
    args += [str(tmp_path / "tiny"), "--output-dir", str(out), "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["setup"] == "long-tailed" and config["crop_flip"] is False
    assert config["subsets"]["train"] == {"0": 18, "1": 9, "2": 4}  # 18 · 4^(-c/2)
    assert json.loads((out / "results.json").read_text())["test_size"] == 9
