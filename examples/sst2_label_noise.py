"""The noisy-label figure: precision of the most down-weighted examples at finding flipped labels.

Runs (or reads) the ``sst2_label_noise_0.2`` recipe, writes one JSON line per run to
``examples/sst2_label_noise_results.jsonl`` and the report to ``examples/sst2_label_noise/``::

    OMP_NUM_THREADS=1 nice -n 10 datamanip run sst2_label_noise_0.2 data_dir=../shared/data \\
        --output-dir runs/noise02
    python examples/sst2_label_noise.py runs/noise02
"""

import argparse
import json
from pathlib import Path

from datamanip.noise import noise_detection
from datamanip.report import build_report, find_runs

KEEP = ("method", "seed", "test_accuracy", "best_epoch", "train_size", "wall_time_s", "label_noise")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="the recipe's output folder (datamanip run --output-dir)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "sst2_label_noise"))
    args = parser.parse_args()

    lines = []
    for run in find_runs([args.root]):
        row = {k: run.results[k] for k in KEEP if k in run.results}
        # Recomputed from weights.parquet, so runs made before a ranking was added have it too.
        row["label_noise"] = noise_detection(run.weights, run.method)
        row["config"] = {k: run.config[k] for k in ("dataset", "per_class", "label_noise", "model",
                                                     "epochs", "batch_size", "data_seed")}  # fmt: skip
        lines.append(json.dumps(row))
    target = Path(__file__).parent / "sst2_label_noise_results.jsonl"
    target.write_text("\n".join(lines) + "\n")
    written = build_report([args.root], args.out)
    print(f"wrote {target} and {written['out']}/report.html")


if __name__ == "__main__":
    main()
