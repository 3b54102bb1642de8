"""The README's showcase: the CPU-sized SST-2 imbalance recipe over 5 seeds, and its report.

Reads the recipe's run directories, copies each without its model into
``examples/sst2_imbalance_0.05/runs/`` (so the report can be rebuilt from the repository with
``datamanip report examples/sst2_imbalance_0.05/runs``), writes one JSON line per run to
``examples/sst2_imbalance_0.05/results.jsonl`` and the report beside them::

    datamanip run sst2_imbalance_0.05 --seeds 0-4 data_dir=../shared/data --output-dir runs/showcase
    python examples/sst2_imbalance_showcase.py runs/showcase
"""

import argparse
import json
import os
import shutil
from pathlib import Path

from datamanip.report import build_report, find_runs

KEEP = (
    "method",
    "seed",
    "test_accuracy",
    "test_balanced_accuracy",
    "per_class_recall",
    "val_accuracy",
    "best_epoch",
    "train_wall_time_s",
    "wall_time_s",
)
LEFT_OUT = ("model", "checkpoints")  # 90 MB each; the report does not read them


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", help="the recipe's output folder(s)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "sst2_imbalance_0.05"))
    args = parser.parse_args()

    out = Path(args.out)
    copies = out / "runs"
    shutil.rmtree(copies, ignore_errors=True)
    lines = []
    for run in find_runs(args.roots):
        target = copies / run.method / f"seed_{run.seed}"
        shutil.copytree(run.path, target, ignore=shutil.ignore_patterns(*LEFT_OUT))
        lines.append(json.dumps({k: run.results[k] for k in KEEP if k in run.results}))
    (out / "results.jsonl").write_text("\n".join(lines) + "\n")
    written = build_report([os.path.relpath(copies)], out)  # relative paths in the report
    print(f"{len(lines)} runs; wrote {out}/results.jsonl and {written['out']}/report.html")


if __name__ == "__main__":
    main()
