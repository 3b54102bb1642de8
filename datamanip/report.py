"""Reports: run directories turned into a table beside the paper's numbers, and pictures.

``build_report(run_dirs, out)`` finds every run under the folders given (a run directory holds
``results.json``; a multi-seed or recipe folder holds several), groups the runs by setting and
method, and writes ``report.md`` (images as PNG files beside it), ``report.html`` (one
self-contained file, images as data URIs) and the PNGs.

What it shows, where the runs have it:

- test accuracy per method and setting, mean ± std over seeds, beside the paper's (SPEC §6);
- validation accuracy per epoch of every run (``metrics.jsonl``);
- weighting: the mean weight per class over training (the ``weight_mean/class_k`` log
  values), final weight against final loss, and the 20 most down-weighted training examples
  (``weights.parquet``), with their text or image;
- label noise: the precision of the k most down-weighted examples at finding flipped labels,
  beside the base rate and beside ranking by loss;
- augmentation: sample rewrites (``samples.jsonl``: original, label, augmented, masked
  positions) and learned image-transform settings over training (step log values whose name
  starts with ``transform/``).
"""

import base64
import html
import io
import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from datamanip.errors import DatamanipError
from datamanip.noise import RANKINGS, ranked

logger = logging.getLogger(__name__)

# SPEC §6, test accuracy %: (mean, std or None). Keys: dataset, setting, method.
PAPER = {
    ("sst2", "imbalance 0.02"): {"none": (54.91, 5.98), "ren": (74.61, 3.54), "weighting": (75.08, 4.98)},
    ("sst2", "imbalance 0.05"): {"none": (67.73, 9.20), "ren": (76.89, 5.07), "weighting": (79.35, 2.59)},
    ("sst2", "imbalance 0.1"): {"none": (75.04, 4.51), "ren": (80.73, 2.19), "weighting": (81.82, 1.88)},
    ("cifar10", "imbalance 0.02"): {"none": (70.65, 4.98), "ren": (76.68, None), "weighting": (79.07, 5.02)},
    ("cifar10", "imbalance 0.05"): {"none": (79.52, 4.81), "ren": (77.34, None), "weighting": (82.65, 5.13)},
    ("cifar10", "imbalance 0.1"): {"none": (86.12, 3.37), "ren": (78.57, None), "weighting": (87.63, 3.72)},
    ("sst5", "per class 40"): {
        "none": (33.32, 4.04), "fixed": (34.84, None), "learned": (37.03, None),
        "ren": (36.09, 2.26), "weighting": (36.51, 2.54),
    },
    ("imdb", "per class 40"): {
        "none": (63.55, None), "fixed": (63.65, None), "learned": (65.62, None),
        "ren": (63.01, None), "weighting": (64.78, None),
    },
    ("trec", "per class 40"): {
        "none": (88.25, None), "fixed": (88.28, None), "learned": (89.15, None),
        "ren": (88.60, None), "weighting": (89.01, None),
    },
}  # fmt: skip

MOST_DOWN_WEIGHTED = 20


@dataclass
class Run:
    """One run directory, read."""

    path: Path
    config: dict
    results: dict
    metrics: list[dict]
    weights: pd.DataFrame | None
    samples: list[dict] | None

    @property
    def method(self) -> str:
        return self.results.get("method") or self.config.get("method", "?")

    @property
    def seed(self) -> int:
        return int(self.results.get("seed", self.config.get("seed", 0)))

    @property
    def setting(self) -> tuple[str, str]:
        return setting_of(self.config)


@dataclass
class Figure:
    name: str  # file name of the PNG
    title: str
    png: bytes = field(repr=False)


def setting_of(config: dict) -> tuple[str, str]:
    """(dataset, setting) of a run's config, e.g. ("sst2", "imbalance 0.05")."""
    dataset = Path(str(config.get("dataset", "?"))).stem
    if config.get("imbalance") is not None:
        setting = f"imbalance {config['imbalance']:g}"
    elif config.get("per_class") is not None:
        setting = f"per class {config['per_class']}"
    else:
        setting = "full"
    if config.get("label_noise"):
        setting += f", label noise {config['label_noise']:g}"
    # The budget knobs away from their defaults change the run: they name the setting too.
    if config.get("manipulate_until", 1.0) != 1.0:
        setting += f", manipulate until {config['manipulate_until']:g}"
    if config.get("reward_every", 1) != 1:
        setting += f", reward every {config['reward_every']}"
    if config.get("val_batch_size") is not None:
        setting += f", validation batch {config['val_batch_size']}"
    return dataset, setting


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Every run directory under ``paths`` (a folder holding ``results.json``), read."""
    found = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise DatamanipError(f"{path} is not a folder; pass run directories (or their parent)")
        dirs = sorted({p.parent for p in path.rglob("results.json")})
        if not dirs:
            raise DatamanipError(
                f"no run under {path} (no results.json); pass a finished run directory"
            )
        found += [read_run(d) for d in dirs]
    return sorted(found, key=lambda r: (r.setting, r.method, r.seed, str(r.path)))


def read_run(path: Path) -> Run:
    config = (
        yaml.safe_load((path / "config.yaml").read_text())
        if (path / "config.yaml").exists()
        else {}
    )
    results = json.loads((path / "results.json").read_text())
    metrics = _read_jsonl(path / "metrics.jsonl") or []
    weights = (
        pd.read_parquet(path / "weights.parquet") if (path / "weights.parquet").exists() else None
    )
    return Run(path, config, results, metrics, weights, _read_jsonl(path / "samples.jsonl"))


def _read_jsonl(path: Path) -> list[dict] | None:
    if not path.exists():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- the table -----------------------------------------------------------------------------


def results_rows(runs: list[Run]) -> list[dict]:
    """One row per (setting, method): test accuracy mean ± std over seeds, and the paper's."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault((*run.setting, run.method), []).append(run)
    rows = []
    for (dataset, setting, method), members in groups.items():
        accs = [100 * r.results["test_accuracy"] for r in members]
        paper = PAPER.get((dataset, setting), {}).get(method)
        rows.append(
            {
                "dataset": dataset,
                "setting": setting,
                "method": method,
                "seeds": [r.seed for r in members],
                "mean": statistics.mean(accs),
                "std": statistics.stdev(accs) if len(accs) > 1 else None,
                "paper": paper,
                "model": Path(str(members[0].config.get("model", "?"))).name,
                "epochs": members[0].config.get("epochs"),
            }
        )
    return rows


def _pm(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def table_cells(row: dict) -> list[str]:
    ours = _pm(row["mean"], row["std"])
    if row["std"] is None:
        ours += " (1 seed)"
    paper = _pm(*row["paper"]) if row["paper"] else "–"
    seeds = ",".join(map(str, row["seeds"]))
    return [row["dataset"], row["setting"], row["method"], ours, seeds, row["model"], paper]


TABLE_HEAD = ["dataset", "setting", "method", "test accuracy %", "seeds", "model", "paper"]


def noisy_runs(runs: list[Run]) -> list[Run]:
    return [r for r in runs if r.weights is not None and "flipped" in r.weights]


def noise_rows(runs: list[Run]) -> list[dict]:
    """For runs with flipped labels, one row per ranking: precision at k, at the k of
    (10, 50, 100, 200) below the smallest training set, beside the base rate."""
    runs = noisy_runs(runs)
    smallest = min(len(r.weights) for r in runs)
    ks = [k for k in (10, 50, 100, 200) if k < smallest] or [max(1, smallest // 2)]
    rows = []
    for run in runs:
        w = run.weights
        for by, name in RANKINGS.items():
            if by != "loss" and run.method == "none":
                continue  # plain training gives every example weight 1: no ranking
            row = {"run": _short(run), "ranking": name, "base rate": w["flipped"].mean()}
            top = ranked(w, by)["flipped"]
            rows.append(row | {f"@{k}": top.head(k).mean() for k in ks})
    return rows


def _cell(value) -> str:
    if value is None:
        return "–"
    return value if isinstance(value, str) else f"{value:.3f}"


def _short(run: Run) -> str:
    return f"{run.setting[0]} {run.setting[1]} · {run.method} · seed {run.seed}"


# --- the figures ---------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display: PNGs only
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buffer.getvalue()


def _slug(*parts) -> str:
    text = "_".join(str(p) for p in parts)
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def accuracy_curves(runs: list[Run]) -> list[Figure]:
    """Validation accuracy per epoch, one panel per setting, one line per run."""
    plt = _plt()
    figures = []
    settings = sorted({r.setting for r in runs})
    for dataset, setting in settings:
        members = [r for r in runs if r.setting == (dataset, setting)]
        if not any(m.get("kind") == "epoch" for r in members for m in r.metrics):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6))
        methods = sorted({r.method for r in members})
        colours = {m: f"C{i}" for i, m in enumerate(methods)}
        for run in members:
            epochs = [m for m in run.metrics if m.get("kind") == "epoch"]
            if epochs:
                x = [m["epoch"] + 1 for m in epochs]
                y = [100 * m["val_accuracy"] for m in epochs]
                ax.plot(x, y, marker="o", color=colours[run.method], alpha=0.8,
                        label=f"{run.method} seed {run.seed}")  # fmt: skip
        ax.set(xlabel="epoch", ylabel="validation accuracy %", title=f"{dataset}, {setting}")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)
        name = f"accuracy_{_slug(dataset, setting)}.png"
        figures.append(
            Figure(name, f"Validation accuracy per epoch: {dataset}, {setting}", _png(fig))
        )
    return figures


def first_runs(runs: list[Run], want) -> list[Run]:
    """The lowest-seed run of each (setting, method) for which ``want(run)`` holds."""
    chosen = {}
    for run in runs:
        if want(run):
            chosen.setdefault((run.setting, run.method), run)
    return list(chosen.values())


def weight_figures(run: Run) -> list[Figure]:
    """Mean weight per class over training, and final weight against final loss."""
    plt = _plt()
    figures, slug = [], _slug(*run.setting, run.method, "seed", run.seed)
    steps = [m for m in run.metrics if m.get("kind") == "step"]
    keys = sorted({k for m in steps for k in m if k.startswith("weight_mean/")})
    if keys:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for key in keys:
            points = [(m["step"], m[key]) for m in steps if m.get(key) is not None]
            ax.plot(*zip(*points), label=key.split("/", 1)[1])
        ax.set(xlabel="step", ylabel="mean weight", yscale="log", title=_short(run))
        ax.legend(fontsize=8)
        figures.append(
            Figure(
                f"weight_per_class_{slug}.png",
                f"Mean weight per class over training: {_short(run)}",
                _png(fig),
            )
        )
    w = run.weights
    if w is not None and len(w):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        flipped = w["flipped"] if "flipped" in w else pd.Series(False, index=w.index)
        for label in sorted(w["label"].unique()):
            part = w[(w["label"] == label) & ~flipped]
            ax.scatter(part["loss"], part["weight"], s=8, alpha=0.6, label=f"class {label}")
        if flipped.any():
            part = w[flipped]
            ax.scatter(
                part["loss"], part["weight"], s=14, marker="x", color="black", label="flipped label"
            )
        ax.set(xlabel="final loss", ylabel="final weight", yscale="log", title=_short(run))
        ax.legend(fontsize=8)
        figures.append(
            Figure(
                f"weight_vs_loss_{slug}.png",
                f"Final weight against final loss: {_short(run)}",
                _png(fig),
            )
        )
    return figures


def noise_figure(run: Run) -> Figure:
    """Precision at k of the lowest-weight and highest-loss rankings, against the base rate."""
    plt = _plt()
    w = run.weights
    ks = list(range(1, len(w) + 1))
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for by, name in RANKINGS.items():
        if by != "loss" and run.method == "none":
            continue
        hits = ranked(w, by)["flipped"].cumsum().to_numpy()
        ax.plot(ks, hits / ks, label=name)
    ax.axhline(w["flipped"].mean(), color="grey", linestyle="--", label="base rate")
    ax.set(xscale="log", xlabel="k", ylabel="precision at k (flipped labels found)", ylim=(0, 1.02))
    ax.set_title(_short(run))
    ax.legend(fontsize=8)
    slug = _slug(*run.setting, run.method, "seed", run.seed)
    return Figure(
        f"noise_precision_{slug}.png", f"Finding flipped labels: {_short(run)}", _png(fig)
    )


def transform_figure(run: Run) -> Figure | None:
    """Learned image-transform settings (step log values ``transform/...``) over training."""
    steps = [m for m in run.metrics if m.get("kind") == "step"]
    keys = sorted({k for m in steps for k in m if k.startswith("transform/")})
    if not keys:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for key in keys:
        points = [(m["step"], m[key]) for m in steps if m.get(key) is not None]
        ax.plot(*zip(*points), label=key.split("/", 1)[1])
    ax.set(xlabel="step", ylabel="setting", title=_short(run))
    ax.legend(fontsize=8)
    slug = _slug(*run.setting, run.method, "seed", run.seed)
    return Figure(
        f"transforms_{slug}.png", f"Learned image-transform settings: {_short(run)}", _png(fig)
    )


# --- writing -------------------------------------------------------------------------------


@dataclass
class Section:
    title: str
    text: str = ""
    figures: list[Figure] = field(default_factory=list)
    table: tuple[list[str], list[list[str]]] | None = None  # head, rows of cells
    row_methods: list[str] | None = None  # the method of each table row, for the HTML
    images: list[bytes | None] | None = None  # an image per table row (image data sets)


def down_weighted_section(run: Run) -> Section:
    w = run.weights
    top = ranked(w, "weight").head(MOST_DOWN_WEIGHTED)
    has_flip = "flipped" in top
    head = ["rank", "label", "weight", "loss"] + (["flipped (original label)"] if has_flip else [])
    head.append("text" if "text" in top else "example")
    rows, images = [], []
    for rank, (_, ex) in enumerate(top.iterrows(), 1):
        cells = [str(rank), str(ex["label"]), f"{ex['weight']:.2e}", f"{ex['loss']:.3f}"]
        if has_flip:
            cells.append(f"yes ({ex['original_label']})" if ex["flipped"] else "no")
        cells.append(str(ex["text"]) if "text" in top else "")
        rows.append(cells)
        images.append(_image_bytes(ex.get("image")))
    title = f"The {MOST_DOWN_WEIGHTED} most down-weighted training examples: {_short(run)}"
    return Section(title, table=(head, rows), images=images if any(images) else None)


def _image_bytes(value) -> bytes | None:
    if isinstance(value, dict):
        value = value.get("bytes")
    return value if isinstance(value, (bytes, bytearray)) else None


def samples_section(run: Run, limit: int = 10) -> Section:
    head = ["label", "original", "augmented", "masked positions"]
    rows = [
        [str(s.get("label", "")), str(s.get("original", "")), str(s.get("augmented", "")),
         ",".join(map(str, s.get("masked_positions", s.get("masked", [])) or []))]
        for s in run.samples[:limit]
    ]  # fmt: skip
    return Section(f"Sample rewrites: {_short(run)}", table=(head, rows))


def build_sections(runs: list[Run]) -> list[Section]:
    rows = results_rows(runs)
    methods = [r["method"] for r in rows]
    text = (
        "Test accuracy at the epoch of best validation accuracy, mean ± std over the seeds "
        "listed; the paper's numbers (SPEC §6) are BERT-base or ResNet-34 over 15 (text) or "
        "30 (image) runs."
    )
    sections = [
        Section("Test accuracy", text, table=(TABLE_HEAD, [table_cells(r) for r in rows]),
                row_methods=methods),
        Section("Accuracy curves", figures=accuracy_curves(runs)),
    ]  # fmt: skip
    noisy = noise_rows(runs) if noisy_runs(runs) else []
    if noisy:
        head = list(dict.fromkeys(k for r in noisy for k in r))  # plain runs lack weight columns
        cells = [[_cell(r.get(k)) for k in head] for r in noisy]
        figures = [noise_figure(r) for r in first_runs(noisy_runs(runs), lambda r: True)]
        text = (
            "Precision at k: the fraction of flipped labels among the k training examples ranked "
            "most suspect, beside the base rate (what a random pick of k finds). Rankings: lowest "
            "final weight with ties at the weight floor broken by the higher final loss; lowest "
            "weight alone (ties in training order); highest final loss alone."
        )
        sections.append(Section("Finding flipped labels", text, figures, table=(head, cells)))
    weighted = first_runs(runs, lambda r: r.method not in ("none",) and r.weights is not None)
    for run in weighted:
        sections.append(Section(f"Weights: {_short(run)}", figures=weight_figures(run)))
        sections.append(down_weighted_section(run))
    for run in first_runs(runs, lambda r: r.samples):
        sections.append(samples_section(run))
    for run in first_runs(runs, lambda r: transform_figure(r) is not None):
        sections.append(Section("Learned image transforms", figures=[transform_figure(run)]))
    return sections


def build_report(run_dirs: list[str | Path], out: str | Path) -> dict:
    """Writes ``report.md``, ``report.html`` and the PNGs for the runs under ``run_dirs``.

    Returns:
        ``{"out", "runs", "figures", "methods"}``: where it was written, how many runs, the PNG
        names, and the methods of the table's rows.
    """
    runs = find_runs(run_dirs)
    sections = build_sections(runs)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DatamanipError(
            f"cannot create {out} ({err.strerror}); choose another --out"
        ) from None
    figures = [f for s in sections for f in s.figures]
    for figure in figures:
        (out / figure.name).write_bytes(figure.png)
    sources = sorted({str(r.path) for r in runs})
    (out / "report.md").write_text(render_markdown(sections, sources))
    (out / "report.html").write_text(render_html(sections, sources))
    logger.info("report of %d runs written to %s", len(runs), out)
    return {
        "out": str(out),
        "runs": len(runs),
        "figures": [f.name for f in figures],
        "methods": sections[0].row_methods,
    }


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(sections: list[Section], sources: list[str]) -> str:
    lines = [
        "# datamanip report",
        "",
        f"{len(sources)} runs: " + ", ".join(f"`{s}`" for s in sources),
        "",
    ]
    for s in sections:
        lines += [f"## {s.title}", ""]
        if s.text:
            lines += [s.text, ""]
        if s.table:
            head, rows = s.table
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "---|" * len(head))
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            lines.append("")
        for f in s.figures:
            lines += [f"![{f.title}]({f.name})", ""]
    return "\n".join(lines)


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
figure { display: inline-block; margin: 0.5em; }
figcaption { font-size: 13px; color: #555; max-width: 640px; }
code { font-size: 12px; }
"""


def _data_uri(data: bytes) -> str:
    kind = "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "jpeg"
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def render_html(sections: list[Section], sources: list[str]) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>datamanip report</title>", f"<style>{STYLE}</style></head><body>",
             "<h1>datamanip report</h1>",
             f"<p>{len(sources)} runs: " + ", ".join(f"<code>{e(s)}</code>" for s in sources) + "</p>"]  # fmt: skip
    for index, s in enumerate(sections):
        parts.append(f"<h2>{e(s.title)}</h2>")
        if s.text:
            parts.append(f"<p>{e(s.text)}</p>")
        if s.table:
            head, rows = s.table
            table_id = ' id="results"' if index == 0 else ""
            parts.append(f"<table{table_id}><thead><tr>")
            parts += [f"<th>{e(h)}</th>" for h in head + (["image"] if s.images else [])]
            parts.append("</tr></thead><tbody>")
            for i, row in enumerate(rows):
                method = f' data-method="{e(s.row_methods[i])}"' if s.row_methods else ""
                cells = "".join(f"<td>{e(c)}</td>" for c in row)
                if s.images:
                    image = s.images[i]
                    cells += (
                        f'<td><img alt="example" src="{_data_uri(image)}"></td>'
                        if image
                        else "<td></td>"
                    )
                parts.append(f"<tr{method}>{cells}</tr>")
            parts.append("</tbody></table>")
        for f in s.figures:
            parts.append(
                f'<figure><img alt="{e(f.title)}" src="{_data_uri(f.png)}">'
                f"<figcaption>{e(f.title)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
