"""``datamanip data download NAME --to DIR``: a local mirror for machines without internet."""

import typer

from datamanip.cli.app import data_app, user_errors


@data_app.command("download")
def download(
    name: str = typer.Argument(..., help="A named dataset: sst2, sst5, imdb, trec, cifar10."),
    to: str = typer.Option(..., "--to", help="Folder to write NAME/SPLIT.parquet into."),
) -> None:
    """Writes the hub copy of NAME as DIR/NAME/SPLIT.parquet (use it with --data-dir DIR)."""
    from datamanip.data import download_dataset

    with user_errors():
        path = download_dataset(name, to)
    typer.echo(f"wrote {path}; use it with --data-dir {to} or DATAMANIP_DATA_DIR={to}")
