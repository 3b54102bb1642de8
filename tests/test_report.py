"""Reports from real run directories (tiny model, tiny mirror), checked in a headless browser."""

import json
import re
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from datamanip.cli import app
from datamanip.errors import DatamanipError
from datamanip.report import PAPER, build_report, find_runs, results_rows
from tests.models import save_tiny_text_model

runner = CliRunner()


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory):
    """`datamanip run` of a tiny recipe: none and weighting, two seeds, 20% flipped labels."""
    from tests.conftest import TINY_TEST_PER_CLASS, TINY_TRAIN_PER_CLASS, sst2_frame

    root = tmp_path_factory.mktemp("report")
    from datamanip.data import write_mirror

    frames = {"train": sst2_frame(TINY_TRAIN_PER_CLASS), "test": sst2_frame(TINY_TEST_PER_CLASS)}
    mirror = root / "mirror"
    write_mirror(frames, mirror, "sst2")
    model = save_tiny_text_model(root / "tiny")
    recipe = root / "tiny.yaml"
    recipe.write_text(
        "# datamanip run tiny.yaml\n"
        "command: weight\nmethods: [none, weighting]\n"
        f"dataset: sst2\ndata_dir: {mirror}\nmodel: {model}\n"
        "imbalance: 0.25\nmajority_size: 40\nval_per_class: 4\nlabel_noise: 0.2\n"
        "epochs: 2\nbatch_size: 10\nwarmup_epochs: 0\nlog_every: 2\n"
    )
    out = root / "runs"
    args = ["run", str(recipe), "--seeds", "0,1", "--output-dir", str(out), "--quiet"]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def test_report_files_and_table(recipe_runs, tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(app, ["report", str(recipe_runs), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output

    runs = find_runs([recipe_runs])
    assert len(runs) == 4 and {r.method for r in runs} == {"none", "weighting"}
    rows = {r["method"]: r for r in results_rows(runs)}
    for method in ("none", "weighting"):
        accs = [100 * r.results["test_accuracy"] for r in runs if r.method == method]
        assert rows[method]["mean"] == pytest.approx(sum(accs) / 2)
        assert rows[method]["seeds"] == [0, 1]

    md = (out / "report.md").read_text()
    for name in re.findall(r"\]\(([^)]+\.png)\)", md):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Finding flipped labels" in md and "most down-weighted" in md
    noise = [line for line in md.splitlines() if line.startswith("| sst2") and "seed 0 |" in line]
    rankings = [(line.split(" | ")[0].split(" · ")[1], line.split(" | ")[1]) for line in noise]
    assert rankings == [
        ("none", "highest loss"),
        ("weighting", "lowest weight, ties by higher loss"),
        ("weighting", "lowest weight, ties in training order"),
        ("weighting", "highest loss"),
    ]  # plain training has no weights to rank by
    assert "Sample rewrites" not in md  # no samples.jsonl in weighting runs
    html = (out / "report.html").read_text()
    assert 'src="data:image/png;base64,' in html and 'src="' + "accuracy" not in html
    assert len(re.findall(r"<img ", html)) == len(re.findall(r"!\[", md))


def test_report_paper_numbers_beside_ours(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("dataset: sst2\nimbalance: 0.05\nmethod: ren\nseed: 3\n")
    (run / "results.json").write_text(json.dumps({"test_accuracy": 0.8, "method": "ren"}))
    written = build_report([run], tmp_path / "out")
    assert written["methods"] == ["ren"]
    md = (tmp_path / "out" / "report.md").read_text()
    mean, std = PAPER[("sst2", "imbalance 0.05")]["ren"]
    assert (
        f"| sst2 | imbalance 0.05 | ren | 80.00 (1 seed) | 3 | ? | {mean:.2f} ± {std:.2f} |" in md
    )


def test_report_shows_samples_and_transforms(tmp_path):
    """Augmentation runs: samples.jsonl rows and transform/ log values become a table and a plot."""
    run = tmp_path / "aug"
    run.mkdir()
    (run / "config.yaml").write_text("dataset: sst5\nper_class: 40\nmethod: learned\n")
    (run / "results.json").write_text(json.dumps({"test_accuracy": 0.37}))
    sample = {
        "original": "a dull film",
        "label": 0,
        "augmented": "a flat film",
        "masked_positions": [1],
    }
    (run / "samples.jsonl").write_text(json.dumps(sample) + "\n")
    steps = [{"kind": "step", "step": s, "transform/rotate": 0.1 * s} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    build_report([run], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| 0 | a dull film | a flat film | 1 |" in md
    assert "Learned image transforms" in md and "37.00" in md and "37.03" in md


def test_report_errors(tmp_path):
    with pytest.raises(DatamanipError, match="no run under"):
        build_report([tmp_path], tmp_path / "out")
    result = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "is not a folder" in result.output


def browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHECK = """
<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const rows = [...document.querySelectorAll("#results tbody tr")];
  const result = {
    images: images.length,
    decoded: images.filter((i) => i.complete && i.naturalWidth > 0).length,
    methods: rows.map((r) => r.dataset.method),
  };
  const out = document.createElement("pre");
  out.id = "check";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>
"""


def test_report_in_headless_chromium(recipe_runs, tmp_path):
    """The real HTML in Debian's chromium: it loads, every image decodes, a row per method."""
    binary = browser()
    if binary is None:
        pytest.skip("no headless browser: install Debian's chromium (apt-get install chromium)")
    build_report([recipe_runs], tmp_path / "out")
    page = tmp_path / "checked.html"
    page.write_text(
        (tmp_path / "out" / "report.html").read_text().replace("</body>", CHECK + "</body>")
    )
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    flags += [f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    done = subprocess.run(
        [binary, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    )
    found = re.search(r'<pre id="check">(.*?)</pre>', done.stdout)
    assert found, f"the page did not load or run: {done.stderr[-2000:]}"
    check = json.loads(found.group(1).replace("&quot;", '"'))
    assert check["images"] >= 5  # curves, 2 noise, weight per class, weight vs loss
    assert check["decoded"] == check["images"]
    assert sorted(check["methods"]) == ["none", "weighting"]
