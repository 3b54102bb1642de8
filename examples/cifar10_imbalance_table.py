"""Runs the two-class imbalanced CIFAR-10 table (SPEC §6) with a small ResNet, and prints it.

Class 1 (automobile) keeps 1000 training images, class 0 (airplane) 20, 50 or 100; the model is
``resnet-small`` trained from scratch (the paper: ImageNet-pretrained ResNet-34), with the
paper's other CIFAR settings (SGD with momentum 0.9, lr 1e-3, L2 0.01, batch 20, 15 epochs).
Every (imbalance, method, seed) run has its own run directory under ``--root``; a run whose
``results.json`` exists is skipped, so the script can be stopped and started again.

    python examples/cifar10_imbalance_table.py --data-dir ../shared/data --root runs/cifar10_table
    python examples/cifar10_imbalance_table.py --root runs/cifar10_table --table
"""

import argparse
import json
import statistics
from pathlib import Path

PAPER = {  # SPEC §6, ImageNet-pretrained ResNet-34, test accuracy %: (none, ren, weighting)
    0.02: ("70.65 ± 4.98", "76.68", "79.07 ± 5.02"),
    0.05: ("79.52 ± 4.81", "77.34", "82.65 ± 5.13"),
    0.1: ("86.12 ± 3.37", "78.57", "87.63 ± 3.72"),
}
METHODS = ("none", "proportion", "ren", "weighting")


def run_jobs(args) -> None:
    from datamanip.config import RunConfig
    from datamanip.experiment import run_weighting

    for seed in args.seeds:  # every cell gets a seed before any gets a second
        for imbalance in args.imbalance:
            for method in args.methods:
                out = Path(args.root) / f"imb{imbalance}" / method / f"seed_{seed}"
                if (out / "results.json").exists():
                    continue
                config = RunConfig(
                    dataset="cifar10",
                    data_dir=args.data_dir,
                    imbalance=imbalance,
                    model=args.model,
                    method=method,
                    seed=seed,
                    output_dir=str(out),
                    overwrite=True,
                )
                result = run_weighting(config)
                print(
                    f"imbalance {imbalance} {method} seed {seed}: test "
                    f"{result['test_accuracy']:.4f} ({result['wall_time_s']:.0f} s)",
                    flush=True,
                )


def table(root: Path) -> str:
    rows = [
        "| minority : 1000 | method | test accuracy % (ours, resnet-small from scratch) | seeds "
        "| paper (pretrained ResNet-34) | wall time per run |",
        "|---|---|---|---|---|---|",
    ]
    for imbalance in sorted(PAPER):
        for method in METHODS:
            found = sorted((root / f"imb{imbalance}" / method).glob("seed_*/results.json"))
            if not found:
                continue
            results = [json.loads(p.read_text()) for p in found]
            accs = [100 * r["test_accuracy"] for r in results]
            std = f"{statistics.stdev(accs):.2f}" if len(accs) > 1 else "– (1 seed)"
            paper = dict(zip(("none", "ren", "weighting"), PAPER[imbalance])).get(method, "–")
            wall = statistics.mean(r["wall_time_s"] for r in results)
            seeds = ",".join(str(r["seed"]) for r in results)
            rows.append(
                f"| {round(1000 * imbalance)} | {method} | {statistics.mean(accs):.2f} ± {std} "
                f"| {seeds} | {paper} | {wall:.0f} s |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/cifar10_table")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--model", default="resnet-small")
    parser.add_argument("--imbalance", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--table", action="store_true", help="only print the table")
    args = parser.parse_args()
    if not args.table:
        run_jobs(args)
    print(table(Path(args.root)))


if __name__ == "__main__":
    main()
