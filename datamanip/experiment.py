"""Wires a weighting run together: data, subsets, model, manipulation, engine, run directory."""

import dataclasses
import json
import logging
import statistics
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import balanced_accuracy_score, recall_score

from datamanip import distributed, tracking
from datamanip.checkpoint import Checkpoints, should_resume
from datamanip.config import RunConfig, resolve
from datamanip.data import Subsets, build_subsets, load_source
from datamanip.engine import TrainConfig, predict, train
from datamanip.errors import DatamanipError
from datamanip.images import encode_images
from datamanip.manipulations import WEIGHTING_METHODS
from datamanip.models import load_image_classifier, load_text_classifier
from datamanip.noise import noise_detection
from datamanip.rundir import RunDir
from datamanip.text import encode

logger = logging.getLogger(__name__)


def default_output_dir(config: RunConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    if config.imbalance is not None:
        setting = f"imb{config.imbalance}"
    elif config.imbalance_factor is not None:
        setting = f"lt{config.imbalance_factor:g}"
    else:
        setting = f"pc{config.per_class}" if config.per_class is not None else "full"
    return str(Path("runs") / f"{Path(config.dataset).stem}-{setting}-{config.method}-{stamp}")


def load_subsets(config: RunConfig) -> tuple[Subsets, int]:
    """The train, validation and test sets of ``config``, and the number of classes."""
    source = load_source(
        config.dataset,
        data_dir=config.data_dir,
        text_column=config.text_column,
        label_column=config.label_column,
    )
    if config.kind and source.kind != config.kind:
        raise DatamanipError(
            f"{config.dataset} holds {source.kind} examples, but the run was set up for "
            f"{config.kind}; a parquet file of images needs its images in a column of "
            "{bytes, path} structs (as datasets.Image stores them)"
        )
    classes = tuple(config.classes) if config.classes else None
    subsets = build_subsets(
        source,
        imbalance=config.imbalance,
        majority_size=config.majority_size,
        minority_label=config.minority_label,
        classes=classes,
        per_class=config.per_class,
        imbalance_factor=config.imbalance_factor,
        val_per_class=config.val_per_class,
        data_seed=config.data_seed,
        label_noise=config.label_noise,
        test_per_class=config.test_per_class,
    )
    for note in subsets.notes:
        logger.warning(note)
    if config.imbalance is not None and source.num_labels > 2:
        return two_class(subsets), 2
    return subsets, source.num_labels


def two_class(subsets: Subsets) -> Subsets:
    """Imbalance on data with more classes: the two chosen classes become labels 0 and 1
    (the smaller label first), so the classifier has a two-way head."""
    kept = sorted({int(k) for k in subsets.summary["train"]})
    mapping = {old: new for new, old in enumerate(kept)}

    def relabel(split):
        labels = np.array([mapping[int(x)] for x in split.labels], dtype=np.int64)
        return dataclasses.replace(split, labels=labels)

    summary = subsets.summary | {"label_map": {str(k): v for k, v in mapping.items()}}
    original = subsets.original_train_labels  # before --label-noise; None without it
    if original is not None:
        original = np.array([mapping[int(x)] for x in original], dtype=np.int64)
    return dataclasses.replace(
        subsets,
        train=relabel(subsets.train),
        val=relabel(subsets.val),
        test=relabel(subsets.test),
        summary=summary,
        original_train_labels=original,
    )


def run_weighting(config: RunConfig, progress_factory=None) -> dict:
    """Runs ``datamanip weight``: one training seed, or each of ``config.seeds``.

    Returns the results dict of the run, or for several seeds a summary with every seed's
    results and the mean ± std of test accuracy.
    """
    config = resolve(config)
    output_dir = config.output_dir or distributed.same_on_every_process(default_output_dir(config))
    config = dataclasses.replace(config, output_dir=output_dir)
    if not config.seeds:
        return run_one(config, *load_subsets(config), progress_factory)

    root = RunDir(
        config.output_dir,
        overwrite=config.overwrite,
        resume=config.resume,
        main=distributed.launched_as_main(),
    )
    subsets, num_labels = load_subsets(config)  # one subset for every seed: only the seed varies
    return run_seeds(config, root, run_one, subsets, num_labels, progress_factory)


def run_seeds(config: RunConfig, root: RunDir, run_one, subsets, num_labels, progress_factory):
    """Runs ``run_one`` for each of ``config.seeds`` into ``ROOT/seed_K`` on the same subsets,
    skipping seeds a resumed run already finished; ``summary.json`` is rewritten after each.
    Returns the summary (an empty dict on processes other than the main one)."""
    runs = []
    for seed in config.seeds:
        seed_config = dataclasses.replace(
            config,
            seed=seed,
            seeds=None,
            resume=False,  # a started seed continues by itself (its checkpoints)
            output_dir=str(root.path / f"seed_{seed}"),
        )
        done = finished_seed(config.resume, seed_config)
        runs.append(
            done
            if done is not None
            else run_one(seed_config, subsets, num_labels, progress_factory)
        )
        if runs[-1]:  # the main process's; the others return nothing
            summary = summarise(config, runs)
            root.write_json("summary.json", summary)
    return summary if runs[-1] else {}


def finished_seed(resume: bool, config: RunConfig) -> dict | None:
    """With --resume, the results of a seed that already finished (None otherwise)."""
    done = Path(config.output_dir) / "results.json"
    if resume and done.exists():
        logger.info("seed %d finished before: %s", config.seed, done)
        return json.loads(done.read_text()) if distributed.launched_as_main() else {}
    return None


def summarise(config: RunConfig, runs: list[dict]) -> dict:
    accs = [r["test_accuracy"] for r in runs]
    return {
        "method": config.method,
        "dataset": config.dataset,
        "setup": config.setup,
        "seeds": [r["seed"] for r in runs],
        "test_accuracy": accs,
        "test_accuracy_mean": statistics.mean(accs),
        "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "runs": [r["output_dir"] for r in runs],
    }


def train_settings(config: RunConfig) -> TrainConfig:
    """The loop's settings from a resolved run config."""
    return TrainConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        warmup_epochs=config.warmup_epochs,
        seed=config.seed,
        log_every=config.log_every,
        reward_every=config.reward_every,
        val_batch_size=config.val_batch_size,
        manipulate_until=config.manipulate_until,
    )


def build_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, kind: str = "adamw"
) -> torch.optim.Optimizer:
    """The run's optimiser (SPEC §5): for text, AdamW with L2 on weights and none on biases and
    LayerNorm; for images (``kind="sgd"``), SGD with momentum 0.9 and L2 on every parameter,
    as the paper's CIFAR-10 setups train."""
    if kind == "sgd":
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            skip = name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name
            (no_decay if skip else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr)


def make_manipulation(config: RunConfig, labels: torch.Tensor, num_labels: int):
    cls = WEIGHTING_METHODS[config.method]
    if config.method == "weighting":
        return cls(
            labels,
            num_labels,
            w_init=config.w_init,
            w_decay=config.w_decay,
            norm=config.norm,
            temperature=config.temperature,
        )
    return cls(labels, num_labels)


def run_one(config: RunConfig, subsets: Subsets, num_labels: int, progress_factory=None) -> dict:
    """One training seed: trains, evaluates the best-validation epoch, writes the run directory."""
    from accelerate.utils import set_seed

    started = time.perf_counter()
    options = tracking.accelerator_options(config.log_with, Path(config.output_dir))
    accelerator, rundir = open_run(config, **options)
    main = accelerator.is_main_process
    set_seed(config.seed)  # also fixes the fresh classification head
    model, tokenizer, (train_enc, val_enc, test_enc), truncated = load_model_and_data(
        config, subsets, num_labels
    )
    distributed.seed_processes(config.seed)

    resolved = config.to_dict() | distributed.batch_record(config.batch_size)
    resolved["subsets"] = subsets.summary
    rundir.write_config(resolved)
    tracking.start_trackers(accelerator, config.log_with, rundir.path.name, resolved)
    optimizer = build_optimizer(model, config.lr, config.weight_decay, config.optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    manipulation = make_manipulation(config, train_enc.labels, num_labels)
    checkpoints = run_checkpoints(config, rundir, accelerator, model, optimizer, manipulation)

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
        metrics=tracking.metrics_sink(rundir.log_metrics, accelerator, config.log_with),
        progress=progress,
        checkpoints=checkpoints,
    )
    tracking.finish(accelerator)
    if not main:  # the main process evaluates and writes; every process holds the same model
        distributed.barrier()
        return {}

    # Final weight and loss of every training example, under the model at the end of training.
    inner = accelerator.unwrap_model(model)
    scored = train_enc.plain() if hasattr(train_enc, "plain") else train_enc  # no crop or flip
    _, train_losses = predict(inner, scored, accelerator.device)
    weights = weights_table(subsets, manipulation.example_weights(), train_losses)
    rundir.write_weights(weights)

    # The reported numbers come from the epoch of best validation accuracy (SPEC §5).
    inner.load_state_dict(result.best_state)
    test_preds, _ = predict(inner, test_enc, accelerator.device)
    rundir.save_model(inner, tokenizer)
    results = run_results(config, subsets, num_labels, test_preds, result, started, rundir)
    results["truncated"] = truncated
    if "flipped" in weights:
        results["label_noise"] = noise_detection(weights, config.method)  # datamanip.noise
    rundir.write_json("results.json", results)
    checkpoints.remove()
    distributed.barrier()
    return results


def open_run(config: RunConfig, keep=(), **accelerator_options):
    """The run's accelerator and run directory: a fresh run, or a resumed one whose settings
    match, checked by every process before any of them changes the directory."""
    accelerator = distributed.make_accelerator(config.mixed_precision, **accelerator_options)
    settings = config.to_dict() | distributed.batch_record(config.batch_size)
    resume = should_resume(Path(config.output_dir), config.resume, config.overwrite, settings)
    rundir = RunDir(
        config.output_dir,
        overwrite=config.overwrite,
        keep=keep,
        resume=resume,
        main=accelerator.is_main_process,
    )
    distributed.barrier()
    return accelerator, rundir


def run_checkpoints(
    config: RunConfig, rundir: RunDir, accelerator, model, optimizer, manipulation
) -> Checkpoints:
    """The run's checkpoints (every ``--save-every`` steps and each epoch end); the loop
    resumes from the newest one, which must have been made with the same settings."""
    resolved = config.to_dict() | distributed.batch_record(config.batch_size)  # as should_resume
    return Checkpoints(
        rundir.path / "checkpoints",
        accelerator.unwrap_model(model, keep_fp32_wrapper=False),
        optimizer,
        manipulation,
        resolved,
        appended=(rundir.path / "metrics.jsonl", rundir.path / "samples.jsonl"),
        save_every=config.save_every,
    )


def load_model_and_data(config: RunConfig, subsets: Subsets, num_labels: int):
    """The classifier and the encoded train, val and test subsets, for text or images.

    Returns:
        ``(model, tokenizer, (train, val, test), truncated)``: the tokenizer is None for images,
        ``truncated`` counts the texts cut at ``--max-length`` per subset (empty for images).
    """
    if config.kind == "image":
        model = load_image_classifier(config.model, num_labels, config.pretrained)
        splits = encode_images(
            subsets.train,
            subsets.val,
            subsets.test,
            dataset=config.dataset,
            crop_flip=config.crop_flip,
            seed=config.seed,
        )
        return model, None, splits, {}

    model, tokenizer = load_text_classifier(config.model, num_labels)
    splits = tuple(
        encode(tokenizer, split.inputs, split.labels, config.max_length)
        for split in (subsets.train, subsets.val, subsets.test)
    )
    truncated = {part: enc.truncated for part, enc in zip(("train", "val", "test"), splits)}
    if any(truncated.values()):
        logger.warning(
            "examples longer than --max-length %d were cut: %s", config.max_length, truncated
        )
    return model, tokenizer, splits, truncated


def run_results(config, subsets, num_labels, test_preds, result, started, rundir) -> dict:
    """What every run's ``results.json`` holds: test metrics at the best-validation epoch,
    the subsets' sizes and notes, the processes and the wall time."""
    return test_metrics(subsets.test.labels, test_preds, num_labels) | {
        "method": config.method,
        "seed": config.seed,
        "val_accuracy": result.best_val_accuracy,
        "best_epoch": result.best_epoch,
        "epochs": config.epochs,
        "test_split": subsets.test_split,
        "test_size": len(subsets.test),
        "train_size": len(subsets.train),
        "val_size": len(subsets.val),
        "notes": subsets.notes,
        **distributed.batch_record(config.batch_size),
        "train_wall_time_s": result.wall_time_s,
        "wall_time_s": time.perf_counter() - started,
        "output_dir": str(rundir.path),
    }


def test_metrics(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> dict:
    present = sorted(set(labels.tolist()))
    recalls = recall_score(labels, preds, labels=present, average=None, zero_division=0)
    return {
        "test_accuracy": float((labels == preds).mean()),
        "test_balanced_accuracy": float(balanced_accuracy_score(labels, preds)),
        "per_class_recall": {f"class_{k}": float(r) for k, r in zip(present, recalls)},
    }


def weights_table(subsets: Subsets, weights: np.ndarray, losses: np.ndarray) -> pd.DataFrame:
    """Every training example's final weight and loss; with label noise, which were flipped."""
    train = subsets.train
    columns = {"id": train.ids}
    if subsets.summary.get("kind", "text") == "text":
        columns["text"] = train.inputs
    else:  # images: the file an image came from, where it has one (the pixels stay in the source)
        columns["path"] = [v.get("path") if isinstance(v, dict) else None for v in train.inputs]
    table = pd.DataFrame(
        columns
        | {
            "label": train.labels,
            "weight": weights.astype(np.float64),
            "loss": losses.astype(np.float64),
        }
    )
    if subsets.original_train_labels is not None:
        table["flipped"] = subsets.flipped()
        table["original_label"] = subsets.original_train_labels
    return table
