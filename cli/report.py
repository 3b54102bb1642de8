"""``datamanip report RUN_DIR... --out DIR``: tables and pictures from run directories."""

import typer

from datamanip.cli.app import app, setup_logging, user_errors

RUN_DIRS = typer.Argument(..., help="Run directories, or folders holding them (seeds, recipes).")


@app.command()
def report(
    run_dirs: list[str] = RUN_DIRS,
    out: str = typer.Option("report", help="Folder for report.md, report.html and the PNGs."),
    quiet: bool = typer.Option(False, help="Warnings only."),
) -> None:
    """Writes report.md and a self-contained report.html (table, curves, weights, samples)."""
    from datamanip.report import build_report

    setup_logging(quiet)
    with user_errors():
        written = build_report(run_dirs, out)
    typer.echo(
        f"wrote {written['out']}/report.html, report.md and {len(written['figures'])} PNGs "
        f"from {written['runs']} runs"
    )
