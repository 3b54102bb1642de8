"""``datamanip augment``: learned augmentation and its baselines: a masked LM for text (SPEC §4),
learnable transforms for images."""

import typer
from rich.console import Console

from datamanip.cli.app import app, setup_logging, user_errors
from datamanip.cli.weight import parse_int_list, show


@app.command()
def augment(
    dataset: str = typer.Option(
        "sst5",
        help="sst2, sst5, imdb, trec, cifar10, a CSV/JSONL/parquet file or folder, or a folder "
        "of images DIR/CLASS/*.png.",
    ),
    data_dir: str = typer.Option(
        None, help="Local mirror DIR/NAME/SPLIT.parquet (else $DATAMANIP_DATA_DIR, then the hub)."
    ),
    text_column: str = typer.Option(None, help="Text column of local data."),
    label_column: str = typer.Option(None, help="Label column of local data."),
    per_class: int = typer.Option(
        None, help="Low-data setup: this many training examples per class."
    ),
    val_per_class: int = typer.Option(
        None, help="Validation examples per class, from the training split."
    ),
    test_per_class: int = typer.Option(
        None,
        help="Score on this many test examples per class (fixed by --data-seed) instead of the "
        "whole test split: faster evaluation on large test sets such as IMDB's 25,000.",
    ),
    imbalance: float = typer.Option(
        None, help="Imbalanced setup: 1000 majority, round(1000 r) minority."
    ),
    data_seed: int = typer.Option(0, help="Fixes which examples form the subsets."),
    model: str = typer.Option(
        None,
        help="Classifier. Text: minilm (default, packaged), hub id or folder. Images: resnet34 "
        "(default), resnet18, resnet-small (built offline), hub id or folder.",
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
    method: str = typer.Option(
        "learned",
        help="learned (trained by the reward), fixed (never updated: CBERT for text, the "
        "transforms' initial settings for images) or none.",
    ),
    augmenter_model: str = typer.Option(
        "minilm", help="Masked LM to fine-tune into the augmenter (hub id or local folder)."
    ),
    augmenter: str = typer.Option(
        None, help="A fine-tuned augmenter folder (RUN/augmenter_finetuned): skips the MLM stage."
    ),
    finetune_only: bool = typer.Option(
        False, help="Run the MLM stage alone and save the augmenter for later runs."
    ),
    mlm_epochs: int = typer.Option(60, help="Epochs of the MLM stage (best validation kept)."),
    mlm_batch_size: int = typer.Option(8, help="Batch size of the MLM stage."),
    mlm_lr: float = typer.Option(4e-5, help="Learning rate of the MLM stage."),
    num_samples: int = typer.Option(4, help="Augmented samples per example in the lookahead (K)."),
    tau: float = typer.Option(
        None,
        help="Relaxation temperature: Gumbel-softmax (text, 1), transform gates (images, 0.5).",
    ),
    augmenter_lr: float = typer.Option(
        None, help="Adam learning rate of the augmenter (text 4e-6, images 1e-2)."
    ),
    mlm_anchor: float = typer.Option(
        0.0,
        help="Text: coefficient λ of the augmenter's MLM loss beside the reward in its step "
        "(0: the reward alone, as the paper). Keeps the augmenter near the data.",
    ),
    epochs: int = typer.Option(None, help="Training epochs (setup default)."),
    batch_size: int = typer.Option(None, help="Training batch size (setup default)."),
    lr: float = typer.Option(
        None, help="Learning rate of the classifier (text: AdamW 4e-5; images: SGD 1e-3)."
    ),
    weight_decay: float = typer.Option(
        0.01, help="L2 (text: none on bias and LayerNorm; images: on every parameter)."
    ),
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
    """Trains a classifier on real plus augmented examples from a learned augmenter."""
    from datamanip.augment_run import run_augmentation
    from datamanip.config import RunConfig

    setup_logging(quiet, log_dir)
    console = Console()
    with user_errors():
        config = RunConfig(
            command="augment",
            dataset=dataset,
            data_dir=data_dir,
            text_column=text_column,
            label_column=label_column,
            imbalance=imbalance,
            per_class=per_class,
            val_per_class=val_per_class,
            test_per_class=test_per_class,
            data_seed=data_seed,
            model=model,
            pretrained=pretrained,
            crop_flip=crop_flip,
            max_length=max_length,
            method=method,
            augmenter=augmenter,
            augmenter_model=augmenter_model,
            finetune_only=finetune_only,
            mlm_epochs=mlm_epochs,
            mlm_batch_size=mlm_batch_size,
            mlm_lr=mlm_lr,
            num_samples=num_samples,
            tau=tau,
            augmenter_lr=augmenter_lr,
            mlm_anchor=mlm_anchor,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            seed=seed,
            seeds=parse_int_list(seeds, "--seeds"),
            mixed_precision=mixed_precision,
            reward_every=reward_every,
            val_batch_size=val_batch_size,
            manipulate_until=manipulate_until,
            log_every=log_every,
            output_dir=output_dir,
            overwrite=overwrite,
            save_every=save_every,
            resume=resume,
            log_dir=log_dir,
        )
        progress = None if quiet else _progress_factory
        outcome = run_augmentation(config, progress_factory=progress)
    if not outcome:  # another process than the main one: it prints nothing
        return
    if outcome.get("finetune_only"):
        console.print(
            f"augmenter fine-tuned: best validation MLM loss {outcome['best_val_mlm_loss']:.4f} "
            f"at epoch {outcome['best_epoch'] + 1}; saved to {outcome['augmenter']}"
        )
        return
    show(console, outcome)
    if "label_preservation" in outcome:
        console.print(
            f"label kept by {100 * outcome['label_preservation']:.1f}% of augmented training "
            f"examples (classifier on the unaltered examples: "
            f"{100 * outcome['train_accuracy_on_originals']:.1f}%)"
        )


def _progress_factory(config, stage: str = "train"):
    from datamanip.cli.progress import RichProgress

    if stage == "mlm":
        return RichProgress("augmenter MLM stage", measure="val MLM loss")
    return RichProgress(f"{config.method} seed {config.seed}")
