"""Recipes: YAML files naming the command and the settings of one setup.

A recipe has one shape::

    # datamanip run sst2_imbalance_0.05 --seeds 0-4      (first line: the command that runs it)
    command: weight                   # which command's settings the other keys are
    methods: [none, ren, weighting]   # what `datamanip run` runs when --methods is not given
    per_method:                       # optional: settings that differ between methods
      none: {warmup_epochs: 0}
    sweep:                            # optional: one setting run at each value, every method
      manipulate_until: [0.25, 0.5, 1.0]
    dataset: sst2                     # every other key is a setting of the command's config
    imbalance: 0.05
    ...

``command`` names an entry of :data:`COMMANDS`: the config dataclass whose fields are the
recipe's keys, the methods it knows, and the library function that runs one config. Unknown
keys and values of the wrong type are errors, never silently ignored. The shipped recipes live in
``recipes/`` of the checkout and install as ``datamanip.recipes``.
"""

import dataclasses
import importlib
import json
import statistics
import typing
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path

import yaml

from datamanip import distributed
from datamanip.config import AUGMENT_METHODS, METHODS, RunConfig
from datamanip.errors import DatamanipError

RECIPE_KEYS = ("command", "methods", "per_method", "sweep")


@dataclass(frozen=True)
class Command:
    """What a recipe's ``command`` names.

    Attributes:
        config: The dataclass whose fields are the recipe's settings. It needs the fields
            ``method``, ``seeds`` (list of ints or None) and ``output_dir``, which ``run``
            sets; fields with ``metadata={"resolved": True}`` are not settable.
        methods: The methods ``--methods`` may name.
        runner: ``"module:function"`` taking one config (and ``progress_factory``) and returning
            a results dict with ``test_accuracy`` and ``output_dir`` (one seed) or a summary
            with ``test_accuracy`` (a list) and ``runs`` (several seeds); imported only to run.
    """

    config: type
    methods: tuple[str, ...]
    runner: str


COMMANDS: dict[str, Command] = {
    "weight": Command(RunConfig, METHODS, "datamanip.experiment:run_weighting"),
    "augment": Command(RunConfig, AUGMENT_METHODS, "datamanip.augment_run:run_augmentation"),
}


@dataclass
class Recipe:
    """A loaded recipe: the command, the methods to run, and the settings as written."""

    name: str
    path: Path
    command: str
    methods: list[str]
    settings: dict
    per_method: dict[str, dict] = field(default_factory=dict)
    sweep: dict[str, list] = field(default_factory=dict)
    summary: str = ""

    def variants(self) -> list[tuple[str, dict]]:
        """``(suffix, settings)`` per value of the swept setting: ``("", {})`` without a sweep."""
        if not self.sweep:
            return [("", {})]
        ((key, values),) = self.sweep.items()
        return [
            (f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}", {key: value})
            for value in values
        ]

    def config(self, method: str | None = None, overrides: dict | None = None):
        """The command's config for ``method``: settings, then ``per_method``, then overrides."""
        method = method or self.methods[0]
        values = self.settings | self.per_method.get(method, {}) | (overrides or {})
        return config_from_dict(values | {"method": method}, self.path.name, self.command)


def shipped_recipes() -> dict[str, Path]:
    folder = resources.files("datamanip.recipes")
    return {
        p.name.removesuffix(".yaml"): Path(str(p))
        for p in folder.iterdir()
        if p.name.endswith(".yaml")
    }


def find_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    path = shipped_recipes().get(Path(name_or_path).name.removesuffix(".yaml"))
    if path is None:
        raise DatamanipError(
            f"no recipe {name_or_path!r}; `datamanip recipes` lists the shipped ones "
            f"({', '.join(sorted(shipped_recipes()))}), or pass a YAML path"
        )
    return path


def read_recipe(name_or_path: str) -> Recipe:
    """Loads and checks a recipe: its command, methods and every key of every method."""
    path = find_recipe(name_or_path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise DatamanipError(
            f"{path}: not valid YAML ({err.__class__.__name__}); fix the file"
        ) from None
    if not isinstance(values, dict):
        raise DatamanipError(f"{path}: a recipe is a mapping of key: value lines")
    command = values.pop("command", "weight")
    if command not in COMMANDS:
        raise DatamanipError(
            f"{path.name}: command {command!r} is not known; use one of {', '.join(COMMANDS)}"
        )
    known = COMMANDS[command].methods
    default_method = values.get("method", known[0])
    methods = values.pop("methods", [default_method])
    per_method = values.pop("per_method", None) or {}
    sweep = values.pop("sweep", None) or {}
    if (
        not isinstance(sweep, dict)
        or len(sweep) > 1
        or not all(isinstance(v, list) and v for v in sweep.values())
    ):
        raise DatamanipError(
            f"{path.name}: sweep maps one setting to its values, e.g. manipulate_until: [0.5, 1.0]"
        )
    check_methods(methods, known, path.name)
    if not isinstance(per_method, dict) or not all(
        isinstance(v, dict) for v in per_method.values()
    ):
        raise DatamanipError(
            f"{path.name}: per_method maps a method to settings, e.g. none: {{epochs: 5}}"
        )
    if per_method:
        check_methods(list(per_method), known, f"{path.name}: per_method")
    recipe = Recipe(
        name=path.name.removesuffix(".yaml"),
        path=path,
        command=command,
        methods=list(methods),
        settings=values,
        per_method=per_method,
        sweep=sweep,
        summary=_summary_line(path),
    )
    for method in [*recipe.methods, *per_method]:
        for _, swept in recipe.variants():  # every key of every run checked now, not after hours
            recipe.config(method, swept)
    return recipe


def load_recipe(name_or_path: str, **overrides) -> RunConfig:
    """The config of a recipe's first method, with ``overrides``."""
    return read_recipe(name_or_path).config(overrides=overrides)


def check_methods(methods, known: tuple[str, ...], where: str) -> None:
    if not isinstance(methods, list) or not methods:
        raise DatamanipError(f"{where}: methods must be a list like [none, ren, weighting]")
    for method in methods:
        if method not in known:
            raise DatamanipError(
                f"{where}: unknown method {method!r}; choose from {', '.join(known)}"
            )


def config_from_dict(values: dict, where: str, command: str = "weight"):
    """The command's config from ``values``; unknown keys and wrong types are errors."""
    cls = COMMANDS[command].config
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("resolved")}
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in fields:
            raise DatamanipError(f"{where}: unknown key {key!r}; known keys: {', '.join(fields)}")
        if not _fits(value, hints[key]):
            raise DatamanipError(f"{where}: {key} must be {_type_name(hints[key])}, got {value!r}")
    if "command" in fields:  # one config class may serve several commands
        values = values | {"command": command}
    return cls(**values)


def parse_overrides(items: list[str], command: str = "weight") -> dict:
    """``["epochs=3", "lr=1e-4"]`` as ``{"epochs": 3, "lr": 0.0001}``, typed by the config."""
    cls = COMMANDS[command].config
    hints = typing.get_type_hints(cls)
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise DatamanipError(f"override {item!r} is not key=value; e.g. epochs=3")
        if key not in hints or key == "setup":
            raise DatamanipError(
                f"override {item!r}: unknown key {key!r}; "
                f"known keys: {', '.join(k for k in hints if k != 'setup')}"
            )
        out[key] = _parse_value(text, hints[key])
    return out


def _parse_value(text: str, hint):
    """YAML's reading of ``text``, with numbers YAML leaves as strings (``4e-5``) and
    comma lists (``0,1``) read as the field's type asks."""
    value = yaml.safe_load(text) if text.strip() else None
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args and type(None) in typing.get_args(hint) else hint
    if isinstance(value, str):
        if base is float:
            try:
                return float(value)
            except ValueError:
                return value
        if typing.get_origin(base) is list:
            try:
                return [yaml.safe_load(part) for part in value.split(",") if part.strip()]
            except yaml.YAMLError:
                return value
    if typing.get_origin(base) is list and isinstance(value, int):
        return [value]
    return value


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


def _type_name(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _summary_line(path: Path) -> str:
    """The recipe's one-line description: its first comment line after the command."""
    for line in path.read_text().splitlines()[1:]:
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        break
    return ""


def run_recipe(
    recipe: Recipe,
    overrides: dict | None = None,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    output_dir: str | None = None,
    progress_factory=None,
) -> dict:
    """Runs each method of ``recipe`` (over ``seeds``) into ``OUTPUT_DIR/METHOD``, or with a
    ``sweep`` each method at each value into ``OUTPUT_DIR/METHOD/KEY=VALUE``.

    Every run directory gets the resolved config of its run (``config.yaml``); the root gets
    ``recipe.yaml`` (the recipe with the overrides) and ``summary.json`` (test accuracy per
    method and swept value, mean ± std over seeds), rewritten after every run.
    """
    overrides = dict(overrides or {})
    methods = methods or recipe.methods
    check_methods(methods, COMMANDS[recipe.command].methods, "--methods")
    if seeds is not None:
        overrides["seeds"] = seeds
    root = Path(
        output_dir
        or overrides.pop("output_dir", None)
        or distributed.same_on_every_process(default_root(recipe))
    )
    overrides.pop("output_dir", None)
    configs = {  # all checked before any runs
        (m, suffix): recipe.config(m, swept | overrides)
        for m in methods
        for suffix, swept in recipe.variants()
    }

    main = distributed.launched_as_main()  # under a launcher only the main process writes
    written = {"command": recipe.command, "methods": methods, "recipe": str(recipe.path)}
    written |= {"settings": recipe.settings | overrides, "per_method": recipe.per_method}
    written |= {"sweep": recipe.sweep} if recipe.sweep else {}
    if main:
        root.mkdir(parents=True, exist_ok=True)
        (root / "recipe.yaml").write_text(yaml.safe_dump(written, sort_keys=False))
    module, name = COMMANDS[recipe.command].runner.split(":")
    runner = getattr(importlib.import_module(module), name)

    summary = {"recipe": recipe.name, "methods": {}}
    for (method, suffix), config in configs.items():
        config = dataclasses.replace(config, output_dir=str(root / method / suffix))
        outcome = runner(config, progress_factory=progress_factory)
        if main:
            summary["methods"][f"{method} {suffix}".strip()] = _method_summary(outcome)
            (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["output_dir"] = str(root)
    return summary


def default_root(recipe: Recipe) -> str:
    return str(Path("runs") / f"{recipe.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")


def _method_summary(outcome: dict) -> dict:
    accs = outcome["test_accuracy"]
    accs = accs if isinstance(accs, list) else [accs]
    return {
        "test_accuracy": accs,
        "mean": statistics.mean(accs),
        "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "runs": outcome.get("runs", [outcome.get("output_dir")]),
    }
