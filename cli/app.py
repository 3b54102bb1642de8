"""The typer application and the error boundary: user errors print one line, exit status 2."""

import logging
import sys
from contextlib import contextmanager

import typer

from datamanip.errors import DatamanipError

app = typer.Typer(
    help="Learned data manipulation: weight or augment training examples with a reward "
    "from a one-step lookahead on a small validation set.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Local copies of the named datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@contextmanager
def user_errors():
    """Turns :class:`DatamanipError` into ``error: MESSAGE`` on stderr and exit status 2."""
    try:
        yield
    except DatamanipError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


def setup_logging(quiet: bool, log_dir: str | None = None) -> None:
    """Terminal logging (INFO, or warnings with ``quiet``); with ``log_dir`` every process also
    logs to its own file there."""
    from datamanip import distributed

    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if log_dir:
        distributed.log_to_file(log_dir)
    if not distributed.launched_as_main():
        distributed.quiet_other_processes()


def main() -> None:
    app()
