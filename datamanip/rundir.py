"""The run directory: everything a run leaves, in one folder.

Layout::

    config.yaml       the resolved config (every setting the run used)
    metrics.jsonl     one JSON object per logging step and per epoch
    results.json      final numbers (val/test accuracy, per-class recall, best epoch, wall time)
    weights.parquet   every training example: id in its source split, input, label, weight, loss
    model/            the best-validation model (safetensors) and its tokenizer (text)

An augmentation run adds samples.jsonl, augmenter/ and augmenter_finetuned/
(:mod:`datamanip.augment_run`); on images, samples.png and augmenter.json
(:mod:`datamanip.image_augment_run`).
"""

import json
import math
import shutil
from pathlib import Path

import yaml

from datamanip.errors import DatamanipError

RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "results.json",
    "weights.parquet",
    "summary.json",
    "model",
    "samples.jsonl",
    "augmenter",
    "augmenter_finetuned",
    "checkpoints",
    "augmenter.json",
    "samples.png",
)


class RunDir:
    """A run directory; refuses one that holds another run unless ``overwrite``.

    ``keep`` names files of the run directory that ``overwrite`` leaves in place (an
    augmentation run keeps the augmenter its own MLM stage wrote a moment before). ``resume``
    accepts a run already there and leaves it as it is (:mod:`datamanip.checkpoint` continues
    it). With several processes every process checks, and only the main one (``main``) changes
    or writes anything.
    """

    def __init__(
        self,
        path: str | Path,
        overwrite: bool = False,
        keep: tuple[str, ...] = (),
        resume: bool = False,
        main: bool = True,
    ):
        self.path = Path(path)
        self.main = main
        if self.path.exists() and not self.path.is_dir():
            raise DatamanipError(
                f"output directory {self.path} is a file; choose another --output-dir"
            )
        held = [n for n in RUN_FILES if (self.path / n).exists() and n not in keep]
        held += [p.name for p in self.path.glob("seed_*") if p.is_dir()]
        if resume:
            return
        if held and not overwrite:
            raise self._held(held[0])
        if not main:
            return
        for name in held:
            target = self.path / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DatamanipError(
                f"cannot create output directory {self.path} ({err.strerror}); "
                "choose a writable --output-dir"
            ) from None

    def _held(self, name: str) -> DatamanipError:
        return DatamanipError(
            f"output directory {self.path} holds another run ({name}); "
            "pass --overwrite to replace it, --resume to continue it, or choose another "
            "--output-dir"
        )

    def write_config(self, config: dict) -> None:
        if not self.main:
            return
        text = yaml.safe_dump(config, sort_keys=False)
        _atomic_write(self.path / "config.yaml", text)

    def log_metrics(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")

    def append_jsonl(self, name: str, record: dict) -> None:
        if not self.main:
            return
        with open(self.path / name, "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")

    def write_json(self, name: str, data: dict) -> None:
        if not self.main:
            return
        _atomic_write(self.path / name, json.dumps(_jsonable(data), indent=2) + "\n")

    def write_weights(self, table) -> None:
        """Writes a pandas DataFrame as weights.parquet."""
        if not self.main:
            return
        tmp = self.path / "weights.parquet.tmp"
        table.to_parquet(tmp, index=False)
        tmp.replace(self.path / "weights.parquet")

    def save_model(self, model, tokenizer, name: str = "model") -> None:
        from datamanip.models import quiet_transformers

        if not self.main:
            return

        with quiet_transformers():  # no "Writing model shards" bar at the end of a run
            model.save_pretrained(self.path / name, safe_serialization=True)
        if tokenizer is not None:  # image models take pixels as they are
            tokenizer.save_pretrained(self.path / name)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
