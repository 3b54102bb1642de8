"""Experiment trackers (TensorBoard, W&B, MLflow, ...) through Accelerate's tracking.

``--log-with tensorboard`` sends every record of ``metrics.jsonl`` to the tracker too, each
value under ``KIND/NAME`` (``step/loss``, ``epoch/val_accuracy``, ``epoch/weight_mean/class_0``)
at the record's global step, so a step record and the epoch record of the same step stay apart.
"""

import math


def check_trackers(names: list[str]) -> None:
    """Raises a one-line error for a tracker Accelerate does not know or cannot find installed."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    from datamanip.errors import DatamanipError

    known = [t.value for t in LoggerType]
    available = {LoggerType(t).value for t in get_available_trackers()}
    for name in names:
        if name not in known:
            raise DatamanipError(
                f"--log-with {name!r} is not a tracker Accelerate knows; choose from "
                f"{', '.join(known)}"
            )
        if name != "all" and name not in available:
            package = {"comet_ml": "comet-ml"}.get(name, name)
            raise DatamanipError(
                f"--log-with {name}: the {name} package is not installed; "
                f"pip install {package}, or drop --log-with"
            )


def accelerator_options(log_with: list[str] | None, run_path) -> dict:
    """Keyword arguments of ``Accelerator`` for the trackers; trackers write under
    ``RUN_DIR/trackers``."""
    if not log_with:
        return {}
    return {"log_with": list(log_with), "project_dir": str(run_path / "trackers")}


def start_trackers(accelerator, log_with: list[str] | None, name: str, config: dict) -> None:
    if log_with:
        accelerator.init_trackers(name, config=hyperparameters(config))


def finish(accelerator) -> None:
    """Closes the trackers. (``Accelerator.end_training`` would also end the process group,
    which later seeds of the same launch still need.)"""
    for tracker in accelerator.trackers:
        tracker.finish()


def hyperparameters(config: dict) -> dict:
    """The config's scalar settings (trackers such as TensorBoard take no lists or dicts)."""
    return {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}


def scalars(record: dict) -> dict[str, float]:
    """A metrics record as tracker values: numbers only, under ``KIND/NAME``."""
    kind = record.get("kind", "step")
    out = {}
    for key, value in record.items():
        if key in ("kind", "step") or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        out[f"{kind}/{key}"] = float(value)
    return out


def metrics_sink(log_to_file, accelerator, log_with: list[str] | None):
    """The ``metrics`` callable of the loop: the run directory's file, and the trackers."""
    if not log_with:
        return log_to_file

    def log(record: dict) -> None:
        log_to_file(record)
        accelerator.log(scalars(record), step=int(record["step"]))

    return log
