"""The learned image augmenter: transforms, their gradients, the reward gradient through the
lookahead, and the manipulation's φ and θ steps."""

import math
from contextlib import nullcontext

import pytest
import torch
from torch import nn

from datamanip.engine import (
    function_reward_gradients,
    reward_gradients,
    trainable,
    validation_gradient,
)
from datamanip.image_transforms import TRANSFORMS, ImageAugmenter, draw
from datamanip.lookahead import lookahead
from datamanip.manipulations.base import Batch, Step
from datamanip.manipulations.image_augment import ImageAugmentation

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)  # a normalisation that is not the identity
SIDE = 12  # image side of the tiny tests


def tiny_resnet(num_labels=2, seed=0):
    """A random-init transformers ResNet: 2 stages of hidden size 8 and 16, one block each."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    config = ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=num_labels,
    )
    return ResNetForImageClassification(config)


def normalised(pixels):
    mean = torch.tensor(MEAN, dtype=pixels.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels - mean) / std


def image_batch(batch=4, num_labels=2, seed=0, dtype=torch.float64):
    """Random images in pixel space [0, 1], normalised as the model sees them."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(batch, 3, SIDE, SIDE, generator=generator, dtype=dtype)
    labels = torch.arange(batch) % num_labels
    return Batch(torch.arange(batch), labels, {"pixel_values": normalised(pixels)})


def augmenter(names=tuple(TRANSFORMS), dtype=torch.float64, **kwargs):
    return ImageAugmenter(names, mean=MEAN, std=STD, **kwargs).to(dtype)


# --- the transforms ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_transform_at_zero_magnitude_is_the_identity(name, dtype):
    aug = augmenter((name,), dtype, probabilities={name: 0.99})
    with torch.no_grad():
        aug.magnitude.zero_()
    batch = image_batch(dtype=dtype)
    draws = draw(4, aug.names, torch.Generator().manual_seed(1))
    out = aug(batch.inputs["pixel_values"], draws)
    torch.testing.assert_close(out, batch.inputs["pixel_values"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_each_transform_at_its_initial_magnitude_changes_the_images(name):
    aug = augmenter((name,), probabilities={name: 0.99})
    batch = image_batch()
    out = aug(batch.inputs["pixel_values"], draw(4, aug.names, torch.Generator().manual_seed(1)))
    changed = (out - batch.inputs["pixel_values"]).abs().flatten(1).amax(1)
    assert (changed > 1e-2).sum() >= 3  # u near 0 may leave one example almost unchanged


def test_transforms_do_what_they_say_on_a_known_image():
    aug = augmenter(("translation",), probabilities={"translation": 0.99})
    pixels = torch.zeros(1, 3, SIDE, SIDE, dtype=torch.float64)
    pixels[..., 4, 4] = 1.0
    draws = draw(1, aug.names, torch.Generator())
    draws.strength[:], draws.gate[:] = 1.0, 1 - 1e-12  # full strength, gate ≈ 1
    draws.direction[:] = torch.tensor([[1.0, 0.0]])  # along x only
    with torch.no_grad():
        aug.magnitude.fill_(2 / SIDE)  # two pixels
    out = aug(normalised(pixels), draws)
    back = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    # the grid samples the input at x + t: the bright pixel moves to the left by two pixels
    assert back[0, 0, 4].argmax().item() == 2
    assert back[0, 0, 4, 2].item() == pytest.approx(1.0, abs=1e-3)

    cut = augmenter(("cutout",), probabilities={"cutout": 0.99})
    draws = draw(1, cut.names, torch.Generator())
    draws.strength[:], draws.gate[:] = 1.0, 1 - 1e-12
    draws.centre[:] = 0.0
    with torch.no_grad():
        cut.magnitude.fill_(0.5)  # a 6 × 6 square in the middle of 12 × 12
    ones = torch.ones(1, 3, SIDE, SIDE, dtype=torch.float64)
    out = cut(normalised(ones), draws)
    assert out[0, :, SIDE // 2, SIDE // 2].abs().max() < 0.05  # filled with the mean: 0
    torch.testing.assert_close(out[0, :, 0, 0], normalised(ones)[0, :, 0, 0], atol=1e-3, rtol=0)


def _phi_loss(aug, model, batch, draws):
    logits = model(pixel_values=aug(batch.inputs["pixel_values"], draws)).logits
    return nn.functional.cross_entropy(logits, batch.labels)


def test_gradients_of_every_magnitude_and_probability_match_finite_differences():
    model = tiny_resnet().double().train()  # batch statistics, as the lookahead's forwards
    aug = augmenter(probabilities={n: 0.6 for n in TRANSFORMS})
    batch = image_batch()
    draws = draw(4, aug.names, torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(_phi_loss(aug, model, batch, draws), [aug.magnitude, aug.logit])
    assert all(torch.isfinite(g).all() for g in grads)

    h = 1e-6
    for param, grad in zip((aug.magnitude, aug.logit), grads):
        for k, name in enumerate(aug.names):
            with torch.no_grad():
                param[k] += h
                plus = _phi_loss(aug, model, batch, draws).item()
                param[k] -= 2 * h
                minus = _phi_loss(aug, model, batch, draws).item()
                param[k] += h
            numeric = (plus - minus) / (2 * h)
            assert abs(numeric) > 1e-7, name  # every transform moves the loss
            assert grad[k].item() == pytest.approx(numeric, rel=1e-5, abs=1e-9), name


def test_straight_through_gates_are_hard_forward_with_finite_gradients():
    aug = augmenter(straight_through=True)
    draws = draw(64, aug.names, torch.Generator().manual_seed(0))
    gates = aug.gates(draws)
    assert set(gates.detach().unique().tolist()) == {0.0, 1.0}
    # the share of gates on is the probability (0.5 at the start)
    assert abs(gates.detach().mean().item() - 0.5) < 0.05
    model = tiny_resnet().double().eval()
    batch = image_batch(batch=8)
    loss = _phi_loss(aug, model, batch, draw(8, aug.names, torch.Generator()))
    grads = torch.autograd.grad(loss, [aug.magnitude, aug.logit])
    assert all(torch.isfinite(g).all() and g.abs().max() > 0 for g in grads)


def test_relaxed_gates_follow_the_probability():
    aug = augmenter(probabilities={n: 0.2 for n in TRANSFORMS})
    gates = aug.gates(draw(4000, aug.names, torch.Generator().manual_seed(0))).detach()
    # P(b > 1/2) is the Bernoulli probability for any temperature
    assert (gates > 0.5).double().mean().item() == pytest.approx(0.2, abs=0.02)


def test_projection_keeps_magnitudes_in_range_and_unknown_names_are_refused():
    aug = augmenter()
    with torch.no_grad():
        aug.magnitude.copy_(torch.linspace(-1, 5, len(TRANSFORMS)))
    aug.project()
    assert (aug.magnitude >= 0).all() and (aug.magnitude <= aug.largest).all()
    assert aug.settings()["transform/rotation/magnitude"] == pytest.approx(math.pi / 2)
    with pytest.raises(ValueError, match="unknown transforms"):
        ImageAugmenter(("brightness", "hue"))


# --- the reward gradient through the lookahead -------------------------------------------------


def _setup(optimizer_kind="sgd", learned=True, samples=2):
    classifier = tiny_resnet().double()
    classifier.train()
    params = trainable(classifier)[1]
    if optimizer_kind == "sgd":
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-2)
    # one real step so that the optimiser has state (the momentum buffer, Adam's moments)
    batch = image_batch(seed=3)
    nn.functional.cross_entropy(classifier(**batch.inputs).logits, batch.labels).backward()
    optimizer.step()
    optimizer.zero_grad()
    augmentation = ImageAugmentation(
        augmenter(probabilities={n: 0.6 for n in TRANSFORMS}),
        learned=learned,
        num_samples=samples,
        seed=3,
    )
    val = [image_batch(batch=6, seed=5)]
    return classifier, optimizer, augmentation, Step(image_batch(), classifier), val


def _reward_at(classifier, optimizer, augmentation, step, val, state):
    """L_val(θ'(φ)) by the real lookahead, for a fixed draw."""
    augmentation.generator.set_state(state)
    loss_at, _ = augmentation.lookahead_function(step)
    names, params = trainable(classifier)
    grads = torch.autograd.grad(loss_at(None), params, allow_unused=True, materialize_grads=True)
    new_params, _ = lookahead(optimizer, params, list(grads))
    loss, _ = validation_gradient(classifier, dict(zip(names, new_params)), val, nullcontext)
    return loss


def test_reward_gradient_matches_finite_differences_of_the_real_lookahead():
    classifier, optimizer, augmentation, step, val = _setup("sgd")
    state = augmentation.generator.get_state()
    loss_at, phi = augmentation.lookahead_function(step)
    grads, _ = function_reward_gradients(classifier, optimizer, loss_at, phi, val)
    assert all(torch.isfinite(g).all() for g in grads)

    h = 1e-6
    for param, grad in zip(phi, grads):
        for k in range(len(param)):
            with torch.no_grad():
                param[k] += h
            plus = _reward_at(classifier, optimizer, augmentation, step, val, state)
            with torch.no_grad():
                param[k] -= 2 * h
            minus = _reward_at(classifier, optimizer, augmentation, step, val, state)
            with torch.no_grad():
                param[k] += h
            numeric = (plus - minus) / (2 * h)
            assert abs(numeric) > 1e-9
            assert grad[k].item() == pytest.approx(numeric, rel=1e-4, abs=1e-10)


@pytest.mark.parametrize("optimizer_kind", ["sgd", "adamw"])
def test_fast_path_matches_the_exact_double_backward(optimizer_kind):
    classifier, optimizer, augmentation, step, val = _setup(optimizer_kind)
    state = augmentation.generator.get_state()
    loss_at, phi = augmentation.lookahead_function(step)
    fast, fast_val = function_reward_gradients(classifier, optimizer, loss_at, phi, val)
    augmentation.generator.set_state(state)
    loss, phi = augmentation.lookahead_loss(step)
    exact, exact_val = reward_gradients(classifier, optimizer, loss, phi, val)
    assert fast_val == pytest.approx(exact_val, rel=1e-12)
    fast_flat, exact_flat = torch.cat(fast), torch.cat(exact)
    scale = exact_flat.abs().max()
    assert scale > 0
    assert (fast_flat - exact_flat).abs().max() / scale < 1e-6


def test_the_lookahead_leaves_the_batch_norm_statistics_alone():
    classifier, optimizer, augmentation, step, val = _setup("sgd")
    before = {n: b.clone() for n, b in classifier.named_buffers()}
    loss_at, phi = augmentation.lookahead_function(step)
    function_reward_gradients(classifier, optimizer, loss_at, phi, val)
    for name, value in classifier.named_buffers():
        assert torch.equal(value, before[name]), name


def test_learned_reward_step_moves_the_settings_and_fixed_never_does():
    classifier, optimizer, augmentation, step, val = _setup("sgd")
    before = [p.detach().clone() for p in augmentation.phi]
    loss_at, phi = augmentation.lookahead_function(step)
    grads, _ = function_reward_gradients(classifier, optimizer, loss_at, phi, val)
    augmentation.reward_step(step, grads)
    assert all(not torch.equal(p, b) for p, b in zip(augmentation.phi, before))
    logged = augmentation.log_values()
    assert logged["augmenter_grad_norm"] > 0
    assert {f"transform/{n}/{k}" for n in TRANSFORMS for k in ("magnitude", "probability")} <= set(
        logged
    )

    classifier, optimizer, fixed, step, val = _setup("sgd", learned=False)
    assert not fixed.uses_reward and fixed.optimizer is None
    loss = fixed.train_loss(step)
    loss.backward()
    assert all(p.grad is None for p in fixed.augmenter.parameters())
    assert all(p.grad is not None for p in classifier.parameters())
    assert fixed.log_values()["augmented_loss"] > 0


# --- the command end to end --------------------------------------------------------------------


def png_bytes(pixels) -> bytes:
    """[H, W, 3] uint8 as PNG bytes."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def cifar_frame(per_class, num_labels=3, seed=0):
    """Made-up cifar10-shaped rows: ``img`` {bytes, path} PNGs of SIDE × SIDE, ``label``; each
    class a colour, so that a tiny model can learn something."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(per_class * num_labels):
        label = i % num_labels
        pixels = rng.integers(0, 80, (SIDE, SIDE, 3))
        pixels[..., label] += 150
        rows.append(({"bytes": png_bytes(pixels.astype("uint8")), "path": None}, label))
    return pd.DataFrame(rows, columns=["img", "label"]).astype({"label": "int64"})


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    """A folder of cifar10-shaped parquet files with three classes, and a tiny ResNet folder."""
    from datamanip.data import write_mirror

    root = tmp_path_factory.mktemp("image_augment")
    frames = {"train": cifar_frame(12), "test": cifar_frame(4, seed=1)}
    write_mirror(frames, root, "images")
    tiny_resnet(num_labels=3).save_pretrained(root / "resnet")
    return root / "images", root / "resnet"


def image_augment_args(data, model, out, *extra, per_class="6"):
    """``datamanip augment`` on ``data``: a folder of parquet files, or a mirror of cifar10."""
    named = (data / "cifar10").is_dir()
    return [
        "augment",
        "--dataset",
        "cifar10" if named else str(data),
        *(("--data-dir", str(data)) if named else ("--text-column", "img")),
        "--model",
        str(model),
        "--per-class",
        per_class,
        "--val-per-class",
        "2",
        "--epochs",
        "2",
        "--batch-size",
        "6",
        "--num-samples",
        "2",
        "--log-every",
        "1",
        "--output-dir",
        str(out),
        "--quiet",
        *extra,
    ]


def invoke(args):
    from typer.testing import CliRunner

    from datamanip.cli import app

    return CliRunner().invoke(app, args, catch_exceptions=False)


def read_jsonl(path):
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


def test_image_augment_end_to_end(tiny_cifar, tmp_path):
    import json

    mirror, model = tiny_cifar
    out = tmp_path / "run"
    result = invoke(image_augment_args(mirror, model, out))
    assert result.exit_code == 0, result.output
    assert "label kept by" in result.output

    for name in ("config.yaml", "metrics.jsonl", "results.json", "samples.png", "augmenter.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "learned" and results["command"] == "augment"
    assert results["train_size"] == 18 and results["val_size"] == 6
    assert 0 <= results["label_preservation"] <= 1
    assert 0 <= results["test_accuracy_last_epoch"] <= 1

    # the reward moved the settings, and metrics.jsonl followed them step by step
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "step"]
    assert len(steps) == 6 and all(r["augmenter_grad_norm"] > 0 for r in steps)
    series = [r["transform/rotation/magnitude"] for r in steps]
    assert len(set(series)) == len(series)
    settings = json.loads((out / "augmenter.json").read_text())
    assert settings["initial"] != settings["final"]
    assert settings["final"]["transform/rotation/magnitude"] == series[-1]

    # samples.png: 8 columns of images (sample_positions), rows of originals and of 2 epochs
    from PIL import Image

    width, height = Image.open(out / "samples.png").size
    assert height / width == pytest.approx((3 * 1.25) / (8 * 1.2), rel=0.05)  # figsize per row


def test_image_fixed_and_none_and_seeds(tiny_cifar, tmp_path):
    import json

    mirror, model = tiny_cifar
    fixed = tmp_path / "fixed"
    result = invoke(image_augment_args(mirror, model, fixed, "--method", "fixed", "--seeds", "0,1"))
    assert result.exit_code == 0, result.output
    summary = json.loads((fixed / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["method"] == "fixed"
    settings = json.loads((fixed / "seed_0" / "augmenter.json").read_text())
    assert settings["initial"] == settings["final"]  # fixed: never updated
    steps = [r for r in read_jsonl(fixed / "seed_0" / "metrics.jsonl") if r["kind"] == "step"]
    assert all("reward_loss" not in r and r["augmented_loss"] > 0 for r in steps)

    none = tmp_path / "none"
    result = invoke(image_augment_args(mirror, model, none, "--method", "none"))
    assert result.exit_code == 0, result.output
    assert not (none / "samples.png").exists() and not (none / "augmenter.json").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--finetune-only",), "no such stage"),
        (("--augmenter", "somewhere"), "drop --augmenter"),
        (("--mlm-anchor", "0.1"), "drop --mlm-anchor"),
        (("--method", "ren"), "learned, fixed, none"),
    ],
)
def test_text_only_options_on_images_are_refused(tiny_cifar, tmp_path, extra, message):
    from typer.testing import CliRunner

    from datamanip.cli import app

    mirror, model = tiny_cifar
    result = CliRunner().invoke(app, image_augment_args(mirror, model, tmp_path / "run", *extra))
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_real_cifar10_augment_few_steps(shared_data, tmp_path):
    """Real CIFAR-10 through the whole command: 10 classes of 32 × 32 JPEG-decoded images, the
    small ResNet, 2 training images per class, one epoch."""
    import json

    out = tmp_path / "run"
    args = image_augment_args(shared_data, "resnet-small", out, per_class="2")
    args[args.index("--epochs") + 1] = "1"
    args[args.index("--val-per-class") + 1] = "1"
    result = invoke([*args, "--batch-size", "10"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["train_size"] == 20 and results["test_size"] == 10_000
    assert 0.0 <= results["test_accuracy"] <= 1.0
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "step"]
    assert len(steps) == 2 and all(r["reward_loss"] > 0 for r in steps)


def test_image_augment_recipe_runs_through_datamanip_run(tiny_cifar, tmp_path):
    import json

    data, model = tiny_cifar
    out = tmp_path / "recipe"
    overrides = [
        f"dataset={data}",
        "text_column=img",
        f"model={model}",
        "per_class=6",
        "val_per_class=2",
        "epochs=1",
        "batch_size=6",
        "num_samples=1",
    ]
    args = ["run", "cifar10_lowdata_augment", *overrides, "--methods", "none,learned"]
    result = invoke([*args, "--output-dir", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    for method in ("none", "learned"):
        results = json.loads((out / method / "results.json").read_text())
        assert results["method"] == method and results["command"] == "augment"
    assert (out / "learned" / "samples.png").is_file()
