"""Wires an augmentation run together (``datamanip augment``): data, classifier, augmenter
(fine-tuned first, or reused), the manipulation, the engine and the run directory.

Beyond a weighting run's files, the run directory holds::

    augmenter_finetuned/   the augmenter after the MLM stage (reuse it: --augmenter PATH)
    augmenter/             the augmenter at the end of training (learned: moved by the reward)
    samples.jsonl          rewrites of a fixed set of training examples at the end of each epoch
"""

import dataclasses
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from datamanip import distributed
from datamanip.augmenter import (
    check_vocabularies,
    finetune_augmenter,
    load_augmenter,
    read_augmenter_info,
    save_augmenter,
)
from datamanip.config import RunConfig, resolve
from datamanip.data import Subsets
from datamanip.engine import predict, train
from datamanip.errors import DatamanipError
from datamanip.experiment import (
    build_optimizer,
    default_output_dir,
    load_subsets,
    open_run,
    run_checkpoints,
    run_results,
    run_seeds,
    train_settings,
)
from datamanip.manipulations import NoManipulation
from datamanip.manipulations.text_augment import TextAugmentation
from datamanip.models import load_text_classifier
from datamanip.rundir import RunDir
from datamanip.text import EncodedSplit, encode

logger = logging.getLogger(__name__)

SAMPLES_SHOWN = 8  # training examples rewritten into samples.jsonl at each epoch end
SAMPLE_SEED = 12345  # fixes their masked positions, so epochs can be compared


def run_augmentation(config: RunConfig, progress_factory=None) -> dict:
    """Runs ``datamanip augment``: one training seed, or each of ``config.seeds``.

    The MLM stage runs once (unless ``config.augmenter`` names a fine-tuned augmenter) and its
    result serves every seed and method. Image data has no MLM stage: its augmenter is a set of
    learnable transforms (:mod:`datamanip.image_augment_run`).
    """
    config = resolve(dataclasses.replace(config, command="augment"))
    output_dir = config.output_dir or distributed.same_on_every_process(default_output_dir(config))
    config = dataclasses.replace(config, output_dir=output_dir)
    subsets, num_labels = load_subsets(config)
    check_classes(subsets, num_labels)
    run_one = run_one_augmentation
    if config.kind == "image":  # learnable transforms: no MLM stage, nothing to fine-tune
        from datamanip.image_augment_run import check_image_options, run_one_image_augmentation

        check_image_options(config)
        run_one = run_one_image_augmentation
    needs_stage = config.kind != "image" and config.method != "none" and config.augmenter is None
    if (needs_stage or config.finetune_only) and distributed.launched_processes() > 1:
        raise DatamanipError(
            "the augmenter's MLM stage runs in one process: run it first without the launcher "
            "(--finetune-only), then launch the training with --augmenter RUN/augmenter_finetuned"
        )
    if config.finetune_only or (needs_stage and not config.seeds):
        return finetune_stage(config, subsets, num_labels, progress_factory)
    if not config.seeds:
        return run_one(config, subsets, num_labels, progress_factory)

    root = RunDir(
        config.output_dir,
        overwrite=config.overwrite,
        resume=config.resume,
        main=distributed.launched_as_main(),
    )
    if needs_stage:
        stage = finetune_stage(
            dataclasses.replace(config, output_dir=str(root.path), overwrite=True, seeds=None),
            subsets,
            num_labels,
            progress_factory,
            standalone=False,
        )
        config = dataclasses.replace(config, augmenter=stage["augmenter"])
    return run_seeds(config, root, run_one, subsets, num_labels, progress_factory)


def check_classes(subsets: Subsets, num_labels: int) -> None:
    present = sorted({int(k) for k in np.unique(subsets.train.labels)})
    if num_labels < 2 or len(present) < 2:
        raise DatamanipError(
            f"augmentation needs at least two classes in the training set, found {present}; "
            "check --label-column and the data"
        )


def finetune_stage(
    config: RunConfig, subsets: Subsets, num_labels: int, progress_factory=None, standalone=True
) -> dict:
    """The MLM stage alone: fine-tunes the augmenter and saves it to the run directory.

    Standalone (``--finetune-only``, or a single-seed run that needs an augmenter) it owns the
    run directory; otherwise it writes into the multi-seed root. Returns ``results`` with the
    augmenter's folder; a single-seed run then continues with it.
    """
    rundir = RunDir(config.output_dir, overwrite=config.overwrite) if standalone else None
    path = Path(config.output_dir) / "augmenter_finetuned"
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    classifier, tokenizer = load_text_classifier(config.model, num_labels)
    augmenter, aug_tokenizer = load_augmenter(config.augmenter_model, num_labels, config.seed)
    check_vocabularies(classifier, tokenizer, augmenter, aug_tokenizer)
    del classifier
    train_enc, val_enc, _, truncated = encode_subsets(aug_tokenizer, subsets, config.max_length)
    progress = progress_factory(config, stage="mlm") if progress_factory else None
    result = finetune_augmenter(
        augmenter,
        aug_tokenizer,
        train_enc,
        val_enc,
        epochs=config.mlm_epochs,
        batch_size=config.mlm_batch_size,
        lr=config.mlm_lr,
        seed=config.seed,
        progress=progress,
    )
    info = {
        "augmenter_model": config.augmenter_model,
        "dataset": config.dataset,
        "setup": config.setup,
        "data_seed": config.data_seed,
        "num_labels": num_labels,
        "mlm_epochs": config.mlm_epochs,
        "best_epoch": result.best_epoch,
        "best_val_mlm_loss": result.best_val_loss,
        "wall_time_s": result.wall_time_s,
        "mlm_history": result.history,
    }
    save_augmenter(path, augmenter, aug_tokenizer, info)
    logger.info("fine-tuned augmenter saved to %s", path)
    if config.finetune_only:
        rundir.write_config(config.to_dict() | {"subsets": subsets.summary})
        results = info | {
            "augmenter": str(path),
            "truncated": truncated,
            "output_dir": str(rundir.path),
            "total_wall_time_s": time.perf_counter() - started,
        }
        rundir.write_json("results.json", results)
        return results | {"finetune_only": True}
    if not standalone:
        return {"augmenter": str(path), "finetune_wall_time_s": result.wall_time_s}
    rundir_config = dataclasses.replace(config, augmenter=str(path), overwrite=True)
    return run_one_augmentation(
        rundir_config, subsets, num_labels, progress_factory, keep=("augmenter_finetuned",)
    ) | {"finetune_wall_time_s": result.wall_time_s}


def encode_subsets(tokenizer, subsets: Subsets, max_length: int):
    train = encode(tokenizer, subsets.train.inputs, subsets.train.labels, max_length)
    val = encode(tokenizer, subsets.val.inputs, subsets.val.labels, max_length)
    test = encode(tokenizer, subsets.test.inputs, subsets.test.labels, max_length)
    truncated = {"train": train.truncated, "val": val.truncated, "test": test.truncated}
    if any(truncated.values()):
        logger.warning("examples longer than --max-length %d were cut: %s", max_length, truncated)
    return train, val, test, truncated


def load_finetuned(config: RunConfig, num_labels: int):
    """The augmenter named by ``--augmenter``, checked against the task."""
    path = Path(config.augmenter).expanduser()
    if not (path / "config.json").is_file():
        raise DatamanipError(
            f"--augmenter {path} holds no augmenter (no config.json); pass the "
            "augmenter_finetuned folder of an earlier run, or leave --augmenter out to fine-tune"
        )
    info = read_augmenter_info(path)
    if info and info.get("num_labels") != num_labels:
        raise DatamanipError(
            f"the augmenter in {path} was fine-tuned for {info.get('num_labels')} classes, this "
            f"task has {num_labels}; fine-tune one for this data (leave --augmenter out)"
        )
    if info and (info.get("dataset"), info.get("data_seed")) != (config.dataset, config.data_seed):
        logger.warning(
            "the augmenter in %s was fine-tuned on %s (data seed %s), not on this run's data",
            path,
            info.get("dataset"),
            info.get("data_seed"),
        )
    return load_augmenter(str(path), num_labels, config.seed)


def run_one_augmentation(
    config: RunConfig, subsets: Subsets, num_labels: int, progress_factory=None, keep=()
) -> dict:
    """One training seed of augmentation: trains, evaluates, writes the run directory."""
    from accelerate.utils import set_seed

    started = time.perf_counter()
    accelerator, rundir = open_run(config, keep=keep)
    main = accelerator.is_main_process
    set_seed(config.seed)
    model, tokenizer = load_text_classifier(config.model, num_labels)
    distributed.seed_processes(config.seed)
    train_enc, val_enc, test_enc, truncated = encode_subsets(tokenizer, subsets, config.max_length)

    augmentation = None
    if config.method != "none":
        augmenter, aug_tokenizer = load_finetuned(config, num_labels)
        check_vocabularies(model, tokenizer, augmenter, aug_tokenizer)
        augmenter.to(accelerator.device)
        augmentation = TextAugmentation(
            augmenter,
            special_ids=list(aug_tokenizer.all_special_ids),
            mask_id=aug_tokenizer.mask_token_id,
            learned=config.method == "learned",
            num_samples=config.num_samples,
            tau=config.tau,
            lr=config.augmenter_lr,
            mlm_anchor=config.mlm_anchor,
            seed=config.seed + 1_000_003 * distributed.rank(),  # each process its own masks
        )
    manipulation = augmentation or NoManipulation(train_enc.labels, num_labels)

    resolved = config.to_dict() | distributed.batch_record(config.batch_size)
    resolved["subsets"] = subsets.summary
    rundir.write_config(resolved)
    optimizer = build_optimizer(model, config.lr, config.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)
    checkpoints = run_checkpoints(config, rundir, accelerator, model, optimizer, manipulation)

    shown = sample_positions(len(train_enc), num_labels, train_enc.labels)

    def write_samples(epoch: int) -> None:
        if augmentation is not None:
            records = sample_records(augmentation, train_enc, tokenizer, shown, accelerator)
            for record in records:
                rundir.append_jsonl("samples.jsonl", record | {"epoch": epoch})
            token, share = top_token([t for r in records for t in r["augmented_tokens"]])
            rundir.log_metrics(
                {"kind": "samples", "epoch": epoch, "top_token": token, "top_token_share": share}
            )

    train_config = train_settings(config)
    progress = progress_factory(config) if progress_factory and main else None
    result = train(
        model,
        optimizer,
        manipulation,
        train_enc,
        val_enc,
        train_config,
        accelerator,
        metrics=rundir.log_metrics,
        progress=progress,
        on_epoch_end=write_samples,
        checkpoints=checkpoints,
    )
    if not main:  # the main process evaluates and writes; every process holds the same model
        distributed.barrier()
        return {}
    if augmentation is not None:
        rundir.save_model(augmentation.augmenter, tokenizer, "augmenter")

    inner.load_state_dict(result.best_state)
    test_preds, _ = predict(inner, test_enc, accelerator.device)
    rundir.save_model(inner, tokenizer)
    results = run_results(config, subsets, num_labels, test_preds, result, started, rundir)
    results |= {"command": "augment", "truncated": truncated}
    if augmentation is not None:
        device = accelerator.device
        results |= label_preservation(augmentation, inner, train_enc, device, tokenizer)
        results["augmenter"] = config.augmenter
        warn_if_collapsed(results)
    rundir.write_json("results.json", results)
    checkpoints.remove()
    distributed.barrier()
    return results


def sample_positions(count: int, num_labels: int, labels: torch.Tensor) -> list[int]:
    """A fixed set of training examples to show: the first few of each class, in turn."""
    by_class = [torch.nonzero(labels == k).flatten().tolist() for k in range(num_labels)]
    shown: list[int] = []
    while len(shown) < min(SAMPLES_SHOWN, count) and any(by_class):
        for rows in by_class:
            if rows and len(shown) < SAMPLES_SHOWN:
                shown.append(rows.pop(0))
    return shown


def sample_records(
    augmentation: TextAugmentation, data: EncodedSplit, tokenizer, shown: list[int], accelerator
) -> list[dict]:
    """One record per shown example: the original, its label and the most likely rewrite, the
    rewritten words marked ``[[...]]``, and the token positions that were masked."""
    batch = data.batch(torch.tensor(shown)).to(accelerator.device)
    ids, rows, cols = augmentation.rewrite(batch, seed=SAMPLE_SEED)
    records = []
    for i, position in enumerate(shown):
        length = int(batch.inputs["attention_mask"][i].sum())
        original = batch.inputs["input_ids"][i, :length].tolist()
        rewritten = ids[i, :length].tolist()
        masked = sorted(cols[rows == i].tolist())
        records.append(
            {
                "position": position,
                "label": int(batch.labels[i]),
                "original": tokenizer.decode(original, skip_special_tokens=True),
                "augmented": marked_text(tokenizer, rewritten, masked),
                "masked_positions": masked,
                "original_tokens": tokenizer.convert_ids_to_tokens([original[j] for j in masked]),
                "augmented_tokens": tokenizer.convert_ids_to_tokens([rewritten[j] for j in masked]),
            }
        )
    return records


def marked_text(tokenizer, ids: list[int], masked: list[int]) -> str:
    """The sentence of ``ids`` with the tokens at ``masked`` wrapped in ``[[...]]``."""
    tokens = tokenizer.convert_ids_to_tokens(ids)
    special = set(tokenizer.all_special_tokens)
    words = []
    for j, token in enumerate(tokens):
        if token in special:
            continue
        words.append(f"[[{token}]]" if j in masked else token)
    return tokenizer.convert_tokens_to_string(words)


def top_token(tokens: list) -> tuple:
    """The most frequent token (or id) among ``tokens`` and its share (None, 0 when empty)."""
    if not tokens:
        return None, 0.0
    token, count = Counter(tokens).most_common(1)[0]
    return token, count / len(tokens)


COLLAPSE_SHARE = 0.5  # one token at half the masked positions: the augmenter writes one word
# The fine-tuned MiniLM augmenters change 83-87% of the masked tokens; the ones the reward broke
# changed 99.8-100% (README): they no longer write the original token at all.
DRIFT_CHANGE_RATE = 0.99


def warn_if_collapsed(results: dict) -> None:
    fix = "try a lower --augmenter-lr (README, low-data text augmentation)"
    if results.get("rewrite_top_token_share", 0.0) >= COLLAPSE_SHARE:
        logger.warning(
            "the augmenter wrote %r at %.0f%% of the masked positions: it has collapsed to one "
            "token (word dropout, not augmentation); %s",
            results["rewrite_top_token"],
            100 * results["rewrite_top_token_share"],
            fix,
        )
    elif results.get("rewrite_change_rate", 0.0) >= DRIFT_CHANGE_RATE:
        logger.warning(
            "the augmenter changed %.1f%% of the masked tokens: it no longer writes the "
            "original words and has drifted from the data; %s",
            100 * results["rewrite_change_rate"],
            fix,
        )


@torch.no_grad()
def label_preservation(augmentation, classifier, data: EncodedSplit, device, tokenizer) -> dict:
    """How often the final classifier gives a rewrite its example's label.

    Every training example is rewritten once by a categorical sample at its masked positions
    (what training sees, made hard); the rate is set beside the classifier's accuracy on the
    unaltered sentences, which bounds it in practice, the share of masked tokens that the
    rewrite changed, and the token written most often with its share of the masked positions.
    """
    classifier.eval()
    kept = agree = changed = masked_total = 0
    written = []  # the token ids the rewrites put at masked positions
    for positions in torch.arange(len(data)).split(64):
        batch = data.batch(positions).to(device)
        ids, rows, cols = augmentation.rewrite(batch, seed=int(positions[0]), most_likely=False)
        original = batch.inputs["input_ids"]
        changed += (ids[rows, cols] != original[rows, cols]).sum().item()
        masked_total += len(rows)
        written += ids[rows, cols].tolist()
        rewritten = classifier(input_ids=ids, attention_mask=batch.inputs["attention_mask"])
        plain = classifier(**batch.inputs)
        kept += (rewritten.logits.argmax(-1) == batch.labels).sum().item()
        agree += (plain.logits.argmax(-1) == batch.labels).sum().item()
    top, share = top_token(written)
    return {
        "label_preservation": kept / len(data),
        "train_accuracy_on_originals": agree / len(data),
        "rewrite_change_rate": changed / max(masked_total, 1),
        # one token written at most masked positions is the collapse the README describes
        "rewrite_top_token": tokenizer.convert_ids_to_tokens(top) if written else None,
        "rewrite_top_token_share": share,
    }
