"""Runs the low-data augmentation table (SPEC §6: SST-5 and IMDB, 40 per class) and prints it.

Per data set the augmenter's MLM stage runs once (``--finetune-only``) and serves every method
and seed, as the paper's fine-tuned generator does. Every (data set, method, seed) run goes to
its own run directory under ``--root``; a run whose ``results.json`` exists is skipped, so the
script can be stopped and started again. Each finished run's numbers are appended to
``--results`` (a JSON-lines file kept in the repository), and the table is built from that file.

    python examples/lowdata_augment_table.py --data-dir ../shared/data
    python examples/lowdata_augment_table.py --table --readme README.md
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

PAPER = {  # SPEC §6, BERT-base, test accuracy %
    "sst5": {"none": "33.32 ± 4.04", "fixed": "34.84", "learned": "37.03"},
    "imdb": {"none": "63.55", "fixed": "63.65", "learned": "65.62"},
}
VALIDATION = {"sst5": 2, "imdb": 5}  # per class (SPEC §5)
METHODS = ("none", "fixed", "learned")
# Rows beside the paper's three: the learned augmenter at the classifier's learning rate, where
# it collapses onto one token, and with that collapse slowed by an MLM term (README).
VARIANTS = {
    "none": ["--method", "none"],
    "fixed": ["--method", "fixed"],
    "learned": ["--method", "learned"],  # the default --augmenter-lr 4e-6
    "learned, --augmenter-lr 4e-5": ["--method", "learned", "--augmenter-lr", "4e-5"],
    "learned, --augmenter-lr 4e-5 --mlm-anchor 0.01": [
        *("--method", "learned", "--augmenter-lr", "4e-5", "--mlm-anchor", "0.01"),
    ],
}
KEYS = (
    "method",
    "seed",
    "test_accuracy",
    "val_accuracy",
    "best_epoch",
    "label_preservation",
    "train_accuracy_on_originals",
    "rewrite_change_rate",
    "wall_time_s",
)
COLLAPSE_KEYS = ("rewrite_top_token", "rewrite_top_token_share")


def command(dataset: str, args, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "datamanip",
        "augment",
        "--dataset",
        dataset,
        "--per-class",
        "40",
        "--val-per-class",
        str(VALIDATION[dataset]),
        "--quiet",
        "--overwrite",
        *(["--data-dir", args.data_dir] if args.data_dir else []),
        *(["--test-per-class", str(args.test_per_class)] if args.test_per_class else []),
        *extra,
    ]


def run_jobs(args) -> None:
    root = Path(args.root)
    for dataset in args.datasets:
        stage = root / dataset / "stage"
        augmenter = stage / "augmenter_finetuned"
        needs = any(m != "none" for m in args.methods)
        if needs and not (stage / "results.json").exists():
            run(command(dataset, args, "--finetune-only", "--output-dir", str(stage)))
        for seed in args.seeds:
            for variant in args.methods:
                folder = variant.replace(", --", "_").replace(" --", "_").replace(" ", "")
                out = root / dataset / folder / f"seed_{seed}"
                if (out / "results.json").exists():
                    continue
                extra = [*VARIANTS[variant], "--seed", str(seed), "--output-dir", str(out)]
                if variant != "none":
                    extra += ["--augmenter", str(augmenter)]
                run(command(dataset, args, *extra))
                result = json.loads((out / "results.json").read_text())
                row = {"dataset": dataset, "variant": variant, "test_size": result["test_size"]}
                row |= {k: result.get(k) for k in KEYS + COLLAPSE_KEYS}
                row["last_epoch_top_rewrite"] = last_epoch_top_rewrite(out / "samples.jsonl")
                with open(args.results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(
                    f"{dataset} {variant} seed {seed}: test {result['test_accuracy']:.4f} "
                    f"({result['wall_time_s'] / 60:.1f} min)",
                    flush=True,
                )


def last_epoch_top_rewrite(samples: Path) -> list | None:
    """[token, share]: the most frequent most-likely rewrite among samples.jsonl's masked
    positions at the last epoch (one token everywhere is the collapse of the README)."""
    if not samples.is_file():
        return None
    records = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    last = max(r["epoch"] for r in records)
    from datamanip.augment_run import top_token  # the count a run logs at each epoch end

    return list(
        top_token([t for r in records if r["epoch"] == last for t in r["augmented_tokens"]])
    )


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)


def table(results: Path) -> str:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    lines = [
        "| data set | method | test accuracy % (ours, MiniLM) | seeds | paper (BERT-base) | "
        "label kept by rewrites | most frequent rewrite, last epoch | wall time per run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dataset in PAPER:
        for variant in VARIANTS:
            found = {
                r["seed"]: r
                for r in rows
                if (r["dataset"], r.get("variant", r["method"])) == (dataset, variant)
            }
            if not found:
                continue
            done = [found[s] for s in sorted(found)]
            accs = [100 * r["test_accuracy"] for r in done]
            std = f"{statistics.stdev(accs):.2f}" if len(accs) > 1 else "– (1 seed)"
            kept = "–"
            if done[0].get("label_preservation") is not None:
                rewrites = statistics.mean(r["label_preservation"] for r in done)
                originals = statistics.mean(r["train_accuracy_on_originals"] for r in done)
                kept = f"{100 * rewrites:.0f}% (originals {100 * originals:.0f}%)"
            shares = [r["last_epoch_top_rewrite"] for r in done if r.get("last_epoch_top_rewrite")]
            top = ", ".join(f"{t} {100 * share:.0f}%" for t, share in shares) if shares else "–"
            wall = statistics.mean(r["wall_time_s"] for r in done)
            paper = PAPER[dataset].get(variant, "–")
            name = "learned (`--augmenter-lr 4e-6`)" if variant == "learned" else variant
            lines.append(
                f"| {dataset} | {name} | {statistics.mean(accs):.2f} ± {std} | "
                f"{','.join(str(s) for s in sorted(found))} | {paper} | {kept} | {top} | "
                f"{wall / 60:.1f} min |"
            )
    return "\n".join(lines)


def write_between_markers(path: Path, text: str, name: str) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    page = path.read_text()
    head, rest = page.split(start, 1)
    path.write_text(f"{head}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/augment_table")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--datasets", nargs="+", default=list(PAPER))
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=list(VARIANTS), metavar="VARIANT"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--test-per-class",
        type=int,
        help="score on this many test examples per class (IMDB: 2500 of its 12,500 per class)",
    )
    parser.add_argument("--results", default="examples/lowdata_augment_results.jsonl")
    parser.add_argument("--table", action="store_true", help="only print the table")
    parser.add_argument("--readme", help="also write the table into this file between markers")
    args = parser.parse_args()
    if not args.table:
        run_jobs(args)
    text = table(Path(args.results))
    print(text)
    if args.readme:
        write_between_markers(Path(args.readme), text, "augment-table")


if __name__ == "__main__":
    main()
