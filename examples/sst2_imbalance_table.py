"""Runs the SST-2 imbalance table (SPEC §6) with the default model, and prints it.

Every (imbalance, method, seed) run goes to its own run directory under ``--root`` and, when it
finishes, appends its numbers to ``--results`` (a JSON-lines file kept in the repository). A run
already in that file is skipped, so the script can be stopped and started again, and split over
processes with ``--shard I/N``. The table is built from that file; ``--table`` only prints it.

    python examples/sst2_imbalance_table.py --data-dir ../shared/data --root runs/sst2_table
    python examples/sst2_imbalance_table.py --table --readme README.md
"""

import argparse
import json
import statistics
from pathlib import Path

PAPER = {  # SPEC §6, BERT-base, test accuracy %: (none, ren, weighting)
    0.02: ("54.91 ± 5.98", "74.61 ± 3.54", "75.08 ± 4.98"),
    0.05: ("67.73 ± 9.20", "76.89 ± 5.07", "79.35 ± 2.59"),
    0.1: ("75.04 ± 4.51", "80.73 ± 2.19", "81.82 ± 1.88"),
}
METHODS = ("none", "proportion", "ren", "weighting")
KEYS = (
    "method",
    "seed",
    "test_accuracy",
    "test_balanced_accuracy",
    "per_class_recall",
    "val_accuracy",
    "best_epoch",
    "wall_time_s",
)


def jobs(imbalances, seeds, methods):
    return [(r, m, s) for s in seeds for r in imbalances for m in methods]  # coverage first


def run_jobs(args) -> None:
    from datamanip.config import RunConfig
    from datamanip.experiment import run_weighting

    index, count = (int(x) for x in args.shard.split("/"))
    done = {(r["imbalance"], r["method"], r["seed"]) for r in read_results(args.results)}
    todo = jobs(args.imbalance, args.seeds, args.methods)[index::count]
    for imbalance, method, seed in todo:
        if (imbalance, method, seed) in done:
            continue
        out = Path(args.root) / f"imb{imbalance}" / method / f"seed_{seed}"
        config = RunConfig(
            dataset="sst2",
            data_dir=args.data_dir,
            imbalance=imbalance,
            method=method,
            seed=seed,
            output_dir=str(out),
            overwrite=True,
        )
        result = run_weighting(config)
        with Path(args.results).open("a") as f:
            f.write(json.dumps({"imbalance": imbalance} | {k: result[k] for k in KEYS}) + "\n")
        print(
            f"imbalance {imbalance} {method} seed {seed}: test {result['test_accuracy']:.4f} "
            f"({result['wall_time_s']:.0f} s)",
            flush=True,
        )


def read_results(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(results: list[dict]) -> str:
    rows = [
        "| imbalance | method | test accuracy % (ours, MiniLM) | seeds | paper (BERT-base) | "
        "wall time per run |",
        "|---|---|---|---|---|---|",
    ]
    for imbalance in sorted(PAPER):
        for method in METHODS:
            cell = sorted(
                (r for r in results if r["imbalance"] == imbalance and r["method"] == method),
                key=lambda r: r["seed"],
            )
            if not cell:
                continue
            accs = [100 * r["test_accuracy"] for r in cell]
            std = f"{statistics.stdev(accs):.2f}" if len(accs) > 1 else "– (1 seed)"
            paper = {
                "none": PAPER[imbalance][0],
                "ren": PAPER[imbalance][1],
                "weighting": PAPER[imbalance][2],
            }.get(method, "-")
            wall = statistics.mean(r["wall_time_s"] for r in cell)
            seeds = ",".join(str(r["seed"]) for r in cell)
            rows.append(
                f"| {imbalance} | {method} | {statistics.mean(accs):.2f} ± {std} | "
                f"{seeds} | {paper} | {wall / 60:.1f} min |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/sst2_table")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--imbalance", type=float, nargs="+", default=[0.05, 0.02, 0.1])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shard", default="0/1", help="I/N: run every N-th job from the I-th")
    parser.add_argument("--table", action="store_true", help="only print the table")
    parser.add_argument("--readme", help="also write the table into this file between markers")
    parser.add_argument(
        "--results",
        default=str(Path(__file__).with_name("sst2_imbalance_results.jsonl")),
        help="JSON-lines file of finished runs: read to skip them, appended to, table source",
    )
    args = parser.parse_args()
    if not args.table:
        run_jobs(args)
    text = table(read_results(args.results))
    print(text)
    if args.readme:
        write_between_markers(Path(args.readme), text)


def write_between_markers(path: Path, text: str) -> None:
    start, end = "<!-- table:start -->", "<!-- table:end -->"
    page = path.read_text()
    head, rest = page.split(start, 1)
    path.write_text(f"{head}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")


if __name__ == "__main__":
    main()
