"""Runs the low-data CIFAR-10 augmentation table (40 training and 2 validation images per class)
with a small ResNet from scratch, and prints it beside the paper's base model (SPEC §6; the paper
has no image augmenter).

Methods: ``none`` (the crop-and-flip baseline alone), ``fixed`` (the learnable transforms at
their initial settings, never updated) and ``learned`` (the same transforms trained by the
reward). Every (method, seed) run has its own run directory under ``--root``; a run whose
``results.json`` exists is skipped, so the script can be stopped and started again. The table
is built from the run directories.

    python examples/cifar10_augment_table.py --data-dir ../shared/data --root runs/cifar10_augment
    python examples/cifar10_augment_table.py --root runs/cifar10_augment --table --readme README.md
"""

import argparse
import json
import statistics
from pathlib import Path

METHODS = ("none", "fixed", "learned")
# SPEC §6, ResNet-34 from scratch, test accuracy %: the paper's base model, and the reference
# repository's own logs; neither has an image augmenter.
PAPER = {"none": "22.98 (reference logs 24.68 ± 3.29)", "fixed": "–", "learned": "–"}


def run_jobs(args) -> None:
    from datamanip.augment_run import run_augmentation
    from datamanip.config import RunConfig

    for seed in args.seeds:  # every method gets a seed before any gets a second
        for method in args.methods:
            out = Path(args.root) / method / f"seed_{seed}"
            if (out / "results.json").exists():
                continue
            config = RunConfig(
                command="augment",
                dataset="cifar10",
                data_dir=args.data_dir,
                per_class=40,
                val_per_class=2,
                model=args.model,
                method=method,
                seed=seed,
                output_dir=str(out),
                overwrite=True,
            )
            result = run_augmentation(config)
            print(
                f"{method} seed {seed}: test {result['test_accuracy']:.4f} "
                f"({result['wall_time_s']:.0f} s)",
                flush=True,
            )


def table(root: Path) -> str:
    lines = [
        "| method | test accuracy % (ours, resnet-small from scratch) | at the last epoch | seeds "
        "| paper (ResNet-34 from scratch) | label kept by augmented images | wall time per run |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        found = sorted((root / method).glob("seed_*/results.json"))
        if not found:
            continue
        runs = [json.loads(p.read_text()) for p in found]
        runs.sort(key=lambda r: r["seed"])
        accs = [100 * r["test_accuracy"] for r in runs]
        std = f"{statistics.stdev(accs):.2f}" if len(accs) > 1 else "– (1 seed)"
        kept = (
            f"{100 * statistics.mean(r['label_preservation'] for r in runs):.0f}% (originals "
            f"{100 * statistics.mean(r['train_accuracy_on_originals'] for r in runs):.0f}%)"
            if "label_preservation" in runs[0]
            else "–"
        )
        wall = statistics.mean(r["wall_time_s"] for r in runs)
        lines.append(
            f"| {method} | {statistics.mean(accs):.2f} ± {std} | {last_epoch(runs)} | "
            f"{','.join(str(r['seed']) for r in runs)} | {PAPER[method]} | {kept} | "
            f"{wall / 60:.1f} min |"
        )
    return "\n".join(lines)


def last_epoch(runs: list[dict]) -> str:
    """Mean ± std of the test accuracy at the last epoch, free of the noisy best-epoch choice."""
    accs = [100 * r["test_accuracy_last_epoch"] for r in runs if "test_accuracy_last_epoch" in r]
    if len(accs) < len(runs):
        return "–"
    return f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else "–"


def learned_settings(root: Path) -> str:
    """Initial and final magnitude and probability of each transform: the mean over the learned
    runs' seeds, and the smallest and largest seed's."""
    found = sorted((root / "learned").glob("seed_*/augmenter.json"))
    if not found:
        return ""
    settings = [json.loads(p.read_text()) for p in found]
    names = sorted({k.split("/")[1] for k in settings[0]["initial"]})
    lines = [
        f"| transform | magnitude: initial → final, mean of {len(found)} seeds (range) | "
        "probability: initial → final (range) |",
        "|---|---|---|",
    ]
    for name in names:
        cells = []
        for key in ("magnitude", "probability"):
            start = settings[0]["initial"][f"transform/{name}/{key}"]
            ends = [s["final"][f"transform/{name}/{key}"] for s in settings]
            cells.append(
                f"{start:.2f} → {statistics.mean(ends):.2f} ({min(ends):.2f}-{max(ends):.2f})"
            )
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def write_between_markers(path: Path, text: str, name: str) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    page = path.read_text()
    head, rest = page.split(start, 1)
    path.write_text(f"{head}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/cifar10_augment")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--model", default="resnet-small")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--table", action="store_true", help="only print the table")
    parser.add_argument("--readme", help="also write the tables into this file between markers")
    args = parser.parse_args()
    if not args.table:
        run_jobs(args)
    text = table(Path(args.root))
    settings = learned_settings(Path(args.root))
    if settings:
        text += "\n\nLearned transform settings:\n\n" + settings
    print(text)
    if args.readme:
        write_between_markers(Path(args.readme), text, "cifar10-augment-table")


if __name__ == "__main__":
    main()
