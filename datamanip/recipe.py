"""Recipes: YAML files naming the settings of one setup, keys as in :class:`RunConfig`.

The shipped recipes live in ``recipes/`` of the checkout and install as ``datamanip.recipes``.
Unknown keys and values of the wrong type are errors, never silently ignored.
"""

import dataclasses
import typing
from importlib import resources
from pathlib import Path

import yaml

from datamanip.config import RunConfig
from datamanip.errors import DatamanipError


def shipped_recipes() -> dict[str, Path]:
    folder = resources.files("datamanip.recipes")
    return {
        p.name.removesuffix(".yaml"): Path(str(p))
        for p in folder.iterdir()
        if p.name.endswith(".yaml")
    }


def load_recipe(name_or_path: str, **overrides) -> RunConfig:
    """A :class:`RunConfig` from a shipped recipe name or a YAML path, with ``overrides``."""
    path = Path(name_or_path)
    if not path.is_file():
        path = shipped_recipes().get(name_or_path.removesuffix(".yaml"))
        if path is None:
            raise DatamanipError(
                f"no recipe {name_or_path!r}; shipped recipes: "
                f"{', '.join(sorted(shipped_recipes()))}, or pass a YAML path"
            )
    values = (yaml.safe_load(path.read_text()) or {}) | overrides
    return config_from_dict(values, where=str(path))


def config_from_dict(values: dict, where: str) -> RunConfig:
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    hints = typing.get_type_hints(RunConfig)
    for key, value in values.items():
        if key not in fields:
            raise DatamanipError(f"{where}: unknown key {key!r}; known keys: {', '.join(fields)}")
        if not _fits(value, hints[key]):
            raise DatamanipError(f"{where}: {key} must be {hints[key]}, got {value!r}")
    return RunConfig(**values)


def _fits(value, hint) -> bool:
    args = typing.get_args(hint)
    if args and type(None) in args:
        return value is None or any(_fits(value, a) for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)
