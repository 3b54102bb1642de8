"""The terminal front end: a rich progress bar and the final results table."""

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class RichProgress:
    """Progress bar over all steps of a run: epoch, step, loss, last validation accuracy."""

    def __init__(self, label: str, console: Console | None = None, measure: str = "val acc"):
        self.label = label
        self.measure = measure  # what epoch_end reports: validation accuracy, or MLM loss
        self.console = console or Console(stderr=True)
        self._progress = None
        self._val = "-"

    def start(self, epochs: int, steps_per_epoch: int) -> None:
        self.steps_per_epoch = steps_per_epoch
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(self.label, total=epochs * steps_per_epoch, info="")

    def skip(self, steps: int) -> None:
        """Steps already taken before a resume."""
        self._progress.update(self._task, advance=steps)

    def step(self, epoch: int, step: int, loss: float) -> None:
        info = (
            f"epoch {epoch + 1} step {step}/{self.steps_per_epoch} loss {loss:.4f} "
            f"{self.measure} {self._val}"
        )
        self._progress.update(self._task, advance=1, info=info)

    def epoch_end(self, epoch: int, value: float) -> None:
        self._val = f"{value:.3f}"

    def close(self) -> None:
        self._progress.stop()


def results_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for column in ("seed", "best epoch", "val acc", "test acc", "balanced acc", "per-class recall"):
        table.add_column(column)
    for r in rows:
        recall = " ".join(f"{v:.3f}" for v in r["per_class_recall"].values())
        table.add_row(
            str(r["seed"]),
            str(r["best_epoch"]),
            f"{r['val_accuracy']:.3f}",
            f"{r['test_accuracy']:.4f}",
            f"{r['test_balanced_accuracy']:.4f}",
            recall,
        )
    return table
