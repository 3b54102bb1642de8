"""``datamanip weight``: learned weighting and its baselines (SPEC §3)."""

import json
import statistics

import typer
from rich.console import Console

from datamanip.cli.app import app, setup_logging, user_errors
from datamanip.errors import DatamanipError


def parse_int_list(text: str | None, flag: str) -> list[int] | None:
    """``0,1,2`` or ``0-4`` (inclusive) as a list of ints."""
    if text is None:
        return None
    try:
        if "-" in text and "," not in text:
            first, last = (int(t) for t in text.split("-"))
            values = list(range(first, last + 1))
        else:
            values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values:
        raise DatamanipError(f"{flag} takes integers like 0,1,2 or 0-4, not {text!r}")
    return values


@app.command()
def weight(
    dataset: str = typer.Option(
        "sst2",
        help="sst2, sst5, imdb, trec, cifar10, a CSV/JSONL/parquet file or folder, or a folder "
        "of images DIR/CLASS/*.png.",
    ),
    data_dir: str = typer.Option(
        None, help="Local mirror DIR/NAME/SPLIT.parquet (else $DATAMANIP_DATA_DIR, then the hub)."
    ),
    text_column: str = typer.Option(None, help="Text column of local data."),
    label_column: str = typer.Option(None, help="Label column of local data."),
    imbalance: float = typer.Option(
        None, help="Imbalanced setup: 1000 majority, round(1000 r) minority."
    ),
    majority_size: int = typer.Option(1000, help="Majority-class examples kept by --imbalance."),
    minority_label: int = typer.Option(0, help="The minority class for --imbalance."),
    classes: str = typer.Option(
        None, help="The two classes A,B for --imbalance on data with more (images: 0,1)."
    ),
    per_class: int = typer.Option(
        None, help="Low-data setup: this many training examples per class."
    ),
    imbalance_factor: float = typer.Option(
        None, help="Long-tailed setup over all classes: largest to smallest class, e.g. 100."
    ),
    val_per_class: int = typer.Option(
        None, help="Validation examples per class, from the training split."
    ),
    test_per_class: int = typer.Option(
        None,
        help="Score on this many test examples per class (fixed by --data-seed) instead of the "
        "whole test split: faster evaluation on large test sets such as IMDB's 25,000.",
    ),
    data_seed: int = typer.Option(0, help="Fixes which examples form the subsets."),
    label_noise: float = typer.Option(
        0.0, help="Flip this fraction of training labels (fixed by --data-seed; recorded)."
    ),
    model: str = typer.Option(
        None,
        help="Text: minilm (default, packaged), hub id or folder. Images: resnet34 (default), "
        "resnet18, resnet-small (built offline), hub id or folder.",
    ),
    pretrained: bool = typer.Option(
        None,
        "--pretrained/--no-pretrained",
        help="Images: load the weights (resnet18/34: ImageNet from the hub) or only the "
        "architecture. Default: weights for a hub id or folder, random for resnet*.",
    ),
    crop_flip: bool = typer.Option(
        True, help="Images: random crop (4-pixel padding) and horizontal flip in training."
    ),
    max_length: int = typer.Option(64, help="Longer examples are cut (counted in results.json)."),
    method: str = typer.Option("weighting", help="weighting, ren, proportion or none."),
    w_init: float = typer.Option(
        0.01, help="Initial weight of every example (paper: 1; see README)."
    ),
    w_decay: float = typer.Option(
        None, help="Divisor on the old weight per update (setup default)."
    ),
    norm: str = typer.Option(
        "linear", help="Weight normalisation in the batch: linear or softmax."
    ),
    temperature: float = typer.Option(1.0, help="Softmax temperature for --norm softmax."),
    epochs: int = typer.Option(None, help="Training epochs (setup default)."),
    batch_size: int = typer.Option(None, help="Training batch size (setup default)."),
    lr: float = typer.Option(None, help="Learning rate (text: AdamW 4e-5; images: SGD 1e-3)."),
    weight_decay: float = typer.Option(
        0.01, help="L2 (text: none on bias and LayerNorm; images: on every parameter)."
    ),
    warmup_epochs: int = typer.Option(None, help="Plain epochs before the manipulation starts."),
    seed: int = typer.Option(0, help="Training seed."),
    seeds: str = typer.Option(None, help="Several training seeds, 0,1,2 or 0-4: mean ± std."),
    mixed_precision: str = typer.Option("no", help="no, bf16 or fp16."),
    reward_every: int = typer.Option(
        1, help="Update the manipulation every k-th step (cheaper; 1: every step, as the paper)."
    ),
    val_batch_size: int = typer.Option(
        None, help="Validation examples per reward step, drawn at random (default: all)."
    ),
    manipulate_until: float = typer.Option(
        1.0, help="Manipulate this fraction of the steps after warm-up, then train plainly."
    ),
    log_every: int = typer.Option(10, help="Steps between lines of metrics.jsonl."),
    log_with: str = typer.Option(
        None, help="Trackers for the same metrics: tensorboard, wandb, mlflow, ... (comma list)."
    ),
    output_dir: str = typer.Option(
        None, help="Run directory (default runs/DATASET-SETUP-METHOD-TIME)."
    ),
    overwrite: bool = typer.Option(False, help="Replace a run already in --output-dir."),
    save_every: int = typer.Option(
        0, help="Steps between checkpoints (also at each epoch end; 0: epoch ends only)."
    ),
    resume: bool = typer.Option(
        False, help="Continue the run in --output-dir from its last checkpoint."
    ),
    log_dir: str = typer.Option(
        None, help="Every process also logs to LOG_DIR/process_RANK.log (many processes)."
    ),
    quiet: bool = typer.Option(False, help="No progress bar, warnings only."),
) -> None:
    """Trains a classifier while learning a weight for every training example."""
    from datamanip.config import RunConfig
    from datamanip.experiment import run_weighting

    setup_logging(quiet, log_dir)
    console = Console()
    with user_errors():
        config = RunConfig(
            dataset=dataset,
            data_dir=data_dir,
            text_column=text_column,
            label_column=label_column,
            imbalance=imbalance,
            majority_size=majority_size,
            minority_label=minority_label,
            classes=parse_int_list(classes, "--classes"),
            per_class=per_class,
            imbalance_factor=imbalance_factor,
            val_per_class=val_per_class,
            test_per_class=test_per_class,
            data_seed=data_seed,
            label_noise=label_noise,
            model=model,
            pretrained=pretrained,
            crop_flip=crop_flip,
            max_length=max_length,
            method=method,
            w_init=w_init,
            w_decay=w_decay,
            norm=norm,
            temperature=temperature,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            seed=seed,
            seeds=parse_int_list(seeds, "--seeds"),
            mixed_precision=mixed_precision,
            reward_every=reward_every,
            val_batch_size=val_batch_size,
            manipulate_until=manipulate_until,
            log_every=log_every,
            log_with=log_with.split(",") if log_with else None,
            output_dir=output_dir,
            overwrite=overwrite,
            save_every=save_every,
            resume=resume,
            log_dir=log_dir,
        )
        progress = None if quiet else _progress_factory
        outcome = run_weighting(config, progress_factory=progress)
    if outcome:  # the main process's; the others print nothing
        show(console, outcome)


def _progress_factory(config):
    from datamanip.cli.progress import RichProgress

    return RichProgress(f"{config.method} seed {config.seed}")


def show(console: Console, outcome: dict) -> None:
    from datamanip.cli.progress import results_table

    if "runs" in outcome:
        rows = [json.loads(open(f"{d}/results.json").read()) for d in outcome["runs"]]
        console.print(results_table(rows, f"{outcome['method']} on {outcome['dataset']}"))
        accs = [100 * a for a in outcome["test_accuracy"]]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        console.print(
            f"test accuracy {statistics.mean(accs):.2f} ± {std:.2f} over {len(accs)} seeds"
        )
        return
    console.print(results_table([outcome], f"{outcome['method']}: {outcome['output_dir']}"))
    for note in outcome["notes"]:
        console.print(f"note: {note}")
