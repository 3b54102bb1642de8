"""`datamanip run` and `datamanip recipes`: every shipped recipe checked, overrides typed."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from datamanip.cli import app
from datamanip.config import resolve
from datamanip.errors import DatamanipError
from datamanip.recipe import COMMANDS, parse_overrides, read_recipe, shipped_recipes
from tests.models import save_tiny_text_model

runner = CliRunner()
TEXT_SETUPS = {"sst2_imbalance_0.02", "sst2_imbalance_0.05", "sst2_imbalance_0.1"}
TEXT_SETUPS |= {"sst5_lowdata", "imdb_lowdata", "trec_lowdata"}


def test_every_text_setup_has_a_paper_and_a_cpu_recipe():
    names = set(shipped_recipes())
    assert TEXT_SETUPS <= names
    assert {f"{n}_bert" for n in TEXT_SETUPS} <= names


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_shipped_recipe_resolves_for_every_method(name):
    recipe = read_recipe(name)
    assert recipe.command in COMMANDS and recipe.methods
    lines = recipe.path.read_text().splitlines()
    assert lines[0].startswith(f"# datamanip run {name}"), "first line: the command that runs it"
    assert "should give" in recipe.path.read_text().lower(), "the numbers it should give"
    raw = yaml.safe_load(recipe.path.read_text())
    assert "command" in raw, "a shipped recipe names its command"
    for method in recipe.methods:
        config = resolve(recipe.config(method))
        assert config.method == method and config.epochs >= 1
        if config.method in ("weighting", "ren"):
            assert config.warmup_epochs < config.epochs
    if name.endswith("_bert"):
        assert recipe.settings["model"] == "bert-base-uncased"


def test_paper_settings_of_low_data():
    recipe = read_recipe("sst5_lowdata_bert")
    none, weighting = resolve(recipe.config("none")), resolve(recipe.config("weighting"))
    assert (none.epochs, none.warmup_epochs) == (10, 0)
    assert (weighting.epochs, weighting.warmup_epochs) == (13, 3)  # SPEC §5: 3 warm-up, then 10
    assert weighting.batch_size == 8 and weighting.val_per_class == 2 and weighting.per_class == 40


def test_overrides_are_typed_by_the_config():
    values = parse_overrides(["epochs=3", "lr=1e-4", "classes=0,1", "label_noise=0.2"])
    assert values == {"epochs": 3, "lr": 1e-4, "classes": [0, 1], "label_noise": 0.2}
    assert parse_overrides(["data-dir=../x", "w_decay=null"]) == {
        "data_dir": "../x",
        "w_decay": None,
    }
    recipe = read_recipe("sst2_imbalance_0.05")
    assert recipe.config("none", parse_overrides(["epochs=2"])).epochs == 2
    with pytest.raises(DatamanipError, match="unknown key 'epoch'"):
        parse_overrides(["epoch=3"])
    with pytest.raises(DatamanipError, match="not key=value"):
        parse_overrides(["epochs"])
    with pytest.raises(DatamanipError, match="epochs must be int"):
        recipe.config("none", parse_overrides(["epochs=three"]))
    with pytest.raises(DatamanipError, match="lr must be float"):
        recipe.config("none", parse_overrides(["lr=fast"]))


def test_bad_recipes(tmp_path):
    bad = tmp_path / "bad.yaml"
    for text, message in [
        ("command: augmentt\n", "command 'augmentt' is not known"),
        ("methods: [none, magic]\n", "unknown method 'magic'"),
        ("per_method:\n  none: {epoch: 3}\n", "unknown key 'epoch'"),
        ("per_method: [none]\n", "per_method maps a method"),
        ("- a list\n", "a recipe is a mapping"),
        ("dataset: [unclosed\n", "not valid YAML"),
    ]:
        bad.write_text(text)
        with pytest.raises(DatamanipError, match=message.replace("[", r"\[")):
            read_recipe(str(bad))
    with pytest.raises(DatamanipError, match="datamanip recipes"):
        read_recipe("no_such_recipe")


def test_recipes_lists_one_line_each():
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    assert len(lines) == len(shipped_recipes())
    assert all(line.split()[0] in shipped_recipes() for line in lines)


def test_run_writes_resolved_config_per_method(tiny_mirror, tmp_path):
    model = save_tiny_text_model(tmp_path / "tiny")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "# datamanip run tiny.yaml\ncommand: weight\nmethods: [weighting]\n"
        "per_method:\n  proportion: {epochs: 1}\n"
        f"dataset: sst2\ndata_dir: {tiny_mirror}\nmodel: {model}\n"
        "imbalance: 0.25\nmajority_size: 40\nval_per_class: 4\nepochs: 2\nbatch_size: 10\n"
    )
    out = tmp_path / "runs"
    args = ["run", str(recipe), "w_decay=3", "log_every=1", "--methods", "none,proportion"]
    result = runner.invoke(app, [*args, "--output-dir", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    for method, epochs in (("none", 2), ("proportion", 1)):
        config = yaml.safe_load((out / method / "config.yaml").read_text())
        assert config["method"] == method and config["epochs"] == epochs
        assert config["w_decay"] == 3 and config["log_every"] == 1
        assert config["subsets"]["train"] == {"0": 10, "1": 40}
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"none", "proportion"}
    written = yaml.safe_load((out / "recipe.yaml").read_text())
    assert written["settings"]["w_decay"] == 3 and written["methods"] == ["none", "proportion"]


def test_run_sweeps_one_setting_for_every_method(tiny_mirror, tmp_path):
    model = save_tiny_text_model(tmp_path / "tiny")
    recipe = tmp_path / "sweep.yaml"
    recipe.write_text(
        "# datamanip run sweep.yaml\ncommand: weight\nmethods: [none, weighting]\n"
        "sweep:\n  manipulate_until: [0.5, 1.0]\n"
        f"dataset: sst2\ndata_dir: {tiny_mirror}\nmodel: {model}\n"
        "imbalance: 0.25\nmajority_size: 40\nval_per_class: 4\nepochs: 2\nbatch_size: 10\n"
    )
    out = tmp_path / "runs"
    result = runner.invoke(app, ["run", str(recipe), "--output-dir", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    for method in ("none", "weighting"):
        for value in (0.5, 1.0):
            run = out / method / f"manipulate_until={value:g}"
            config = yaml.safe_load((run / "config.yaml").read_text())
            assert config["manipulate_until"] == value and config["method"] == method
            epochs = [
                json.loads(line)
                for line in (run / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] == "epoch"
            ]
            assert [e["manipulated"] for e in epochs] == [True, value == 1.0]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {
        "none manipulate_until=0.5",
        "none manipulate_until=1",
        "weighting manipulate_until=0.5",
        "weighting manipulate_until=1",
    }


@pytest.mark.parametrize(
    "sweep", ["sweep: [0.5]\n", "sweep:\n  epochs: [1]\n  lr: [1.0e-3]\n", "sweep:\n  epoch: [1]\n"]
)
def test_bad_sweeps(sweep, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"# datamanip run bad.yaml\ncommand: weight\n{sweep}")
    with pytest.raises(DatamanipError, match="sweep|unknown key 'epoch'"):
        read_recipe(str(recipe))


def test_run_errors_are_one_line(tmp_path):
    for args, message in [
        (["run", "sst2_imbalance_0.05", "epoch=3"], "unknown key 'epoch'"),
        (["run", "sst2_imbalance_0.05", "epochs=three"], "epochs must be int"),
        (["run", "sst2_imbalance_0.05", "--methods", "none,magic"], "unknown method 'magic'"),
        (["run", "nope"], "no recipe 'nope'"),
    ]:
        result = runner.invoke(app, [*args, "--output-dir", str(tmp_path / "x")])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and message in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_recipe_subsets_on_real_sst2(shared_data):
    """The CPU recipe's data on the real mirror: 1000 positive, 50 negative, 10 + 10 clean."""
    from datamanip.experiment import load_subsets

    config = resolve(
        read_recipe("sst2_imbalance_0.05").config("weighting", {"data_dir": str(shared_data)})
    )
    subsets, num_labels = load_subsets(config)
    assert num_labels == 2 and subsets.summary["train"] == {"0": 50, "1": 1000}
    assert subsets.summary["val"] == {"0": 10, "1": 10} and len(subsets.test) == 1821
