"""Every shipped recipe parses, every key is one the code accepts, and the values resolve."""

import pytest

from datamanip.config import resolve
from datamanip.errors import DatamanipError
from datamanip.recipe import load_recipe, shipped_recipes


def test_recipes_are_shipped():
    assert {"sst2_imbalance_0.02", "sst2_imbalance_0.05", "sst2_imbalance_0.1"} <= set(
        shipped_recipes()
    )


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_recipe_keys_and_types(name):
    config = resolve(load_recipe(name))
    assert config.epochs >= 1 and config.batch_size >= 1
    first = shipped_recipes()[name].read_text().splitlines()[0]
    assert first.startswith("# datamanip "), "a recipe starts with the command that runs it"


def test_unknown_key_and_wrong_type(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: sst2\nepoch: 3\n")
    with pytest.raises(DatamanipError, match="unknown key 'epoch'"):
        load_recipe(str(bad))
    bad.write_text("dataset: sst2\nepochs: three\n")
    with pytest.raises(DatamanipError, match="epochs must be"):
        load_recipe(str(bad))
