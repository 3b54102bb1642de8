"""``datamanip run`` (a recipe over methods and seeds) and ``datamanip recipes``."""

import typer
from rich.console import Console
from rich.table import Table

from datamanip.cli.app import app, setup_logging, user_errors
from datamanip.cli.weight import parse_int_list

OVERRIDES = typer.Argument(None, help="key=value settings over the recipe's, e.g. epochs=3.")


@app.command()
def run(
    recipe: str = typer.Argument(..., help="A shipped recipe name (datamanip recipes) or a YAML."),
    overrides: list[str] = OVERRIDES,
    seeds: str = typer.Option(None, help="Training seeds, 0,1,2 or 0-4: mean ± std per method."),
    methods: str = typer.Option(
        None, help="Methods to run, e.g. none,ren,weighting (default: the recipe's)."
    ),
    output_dir: str = typer.Option(None, help="Root of the runs (default runs/RECIPE-TIME)."),
    data_dir: str = typer.Option(
        None, help="Local mirror DIR/NAME/SPLIT.parquet; the same as data_dir=DIR."
    ),
    quiet: bool = typer.Option(False, help="No progress bar, warnings only."),
) -> None:
    """Runs a recipe: each method over the seeds, one run directory each, and a summary."""
    from datamanip.recipe import parse_overrides, read_recipe, run_recipe

    setup_logging(quiet)
    with user_errors():
        loaded = read_recipe(recipe)
        values = parse_overrides(overrides or [], loaded.command)
        if data_dir is not None:  # the recipes' first lines pass it as a flag
            values["data_dir"] = data_dir
        chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
        progress = None if quiet else _progress_factory
        summary = run_recipe(
            loaded, values, chosen, parse_int_list(seeds, "--seeds"), output_dir, progress
        )
    if not summary["methods"]:  # another process than the main one: it prints nothing
        return
    table = Table(title=f"{loaded.name}: test accuracy (%) in {summary['output_dir']}")
    for column in ("method", "seeds", "mean ± std", "per seed"):
        table.add_column(column)
    for method, row in summary["methods"].items():
        accs = " ".join(f"{100 * a:.2f}" for a in row["test_accuracy"])
        mean = f"{100 * row['mean']:.2f} ± {100 * row['std']:.2f}"
        table.add_row(method, str(len(row["test_accuracy"])), mean, accs)
    Console().print(table)


@app.command()
def recipes() -> None:
    """Lists the shipped recipes, one line each."""
    from datamanip.recipe import read_recipe, shipped_recipes

    with user_errors():
        names = sorted(shipped_recipes())
        width = max(map(len, names))
        for name in names:
            loaded = read_recipe(name)
            methods = ",".join(loaded.methods)
            typer.echo(f"{name:<{width}}  {loaded.command} [{methods}]  {loaded.summary}")


def _progress_factory(config, stage: str = "train"):
    from datamanip.cli.augment import _progress_factory as factory  # knows the MLM stage

    return factory(config, stage)
