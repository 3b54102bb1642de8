"""Checkpoints of a run, and resuming from them.

A checkpoint is ``RUN_DIR/checkpoints/step_NNNNNNN.pt`` with a small ``step_NNNNNNN.json`` beside
it (its SHA-256, the resolved config, where the loop stood). The ``.pt`` holds the model, the
optimiser, the loop's position and bookkeeping (:class:`datamanip.engine.LoopState`), the sizes
of the run directory's append-only files, and for every process its RNG states and its
manipulation's state (weights; or the augmenter, its optimiser and its sampling generator).
The data order needs no saving: :func:`datamanip.engine.epoch_order` is a function of the seed
and the epoch, so the position (epoch, batches done) fixes the rest of the run.

Writes are atomic: the ``.pt`` is written to a temporary name and renamed, then the ``.json``
likewise; a checkpoint counts only when its ``.json`` exists and its digest matches, so a kill
during a save leaves the previous checkpoint in place. The last two are kept.
"""

import hashlib
import json
import logging
import os
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from datamanip import distributed
from datamanip.errors import DatamanipError

logger = logging.getLogger(__name__)

FOLDER = "checkpoints"
KEEP = 2
# Settings a resumed run may change: where and how it reports, not what it computes.
FREE_KEYS = {
    "overwrite",
    "resume",
    "save_every",
    "output_dir",
    "seeds",
    "log_with",
    "log_dir",
    "quiet",
}


def rng_states() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def config_differences(saved: dict, current: dict) -> list[str]:
    """The keys whose values differ between two resolved configs, free keys aside."""
    keys = (set(saved) | set(current)) - FREE_KEYS
    return sorted(k for k in keys if saved.get(k) != current.get(k))


class Checkpoints:
    """Saves and restores a run's checkpoints (every process calls every method).

    Args:
        folder: the run directory's ``checkpoints`` folder.
        model: the unwrapped model.
        optimizer: the real optimiser.
        manipulation: the manipulation (its ``state_dict`` / ``load_state_dict``).
        config: the resolved config (JSON-able); a resume must match it.
        appended: files the run appends to (``metrics.jsonl`` ...): their sizes are recorded
            and a resume cuts them back, so lines written after the checkpoint are not doubled.
        save_every: steps between checkpoints (0: only at the end of each epoch).
    """

    def __init__(
        self,
        folder: Path,
        model,
        optimizer,
        manipulation,
        config: dict,
        appended: tuple[Path, ...] = (),
        save_every: int = 0,
    ):
        self.folder = Path(folder)
        self.model, self.optimizer, self.manipulation = model, optimizer, manipulation
        self.config = json.loads(json.dumps(config))  # as a JSON round trip will read it back
        self.appended = appended
        self.save_every = save_every

    # --- saving ------------------------------------------------------------------------------

    def step_done(self, state) -> None:
        if self.save_every and state.global_step % self.save_every == 0:
            self.save(state)

    def epoch_done(self, state) -> None:
        self.save(state)

    def save(self, state) -> None:
        # Every process's own part (RNG, sampling generator) goes to the main process.
        own = {"rng": rng_states(), "manipulation": self.manipulation.state_dict()}
        processes = distributed.gather_objects(own)
        if distributed.is_main():
            self._write(state, processes)
        distributed.barrier()  # no process runs ahead of a checkpoint that may be resumed

    def _write(self, state, processes: list[dict]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"step_{state.global_step:07d}"
        payload = {
            "format": 1,
            "loop": asdict(state),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "processes": processes,
            "files": {p.name: p.stat().st_size for p in self.appended if p.exists()},
        }
        path = self.folder / f"{name}.pt"
        tmp = path.with_suffix(".pt.tmp")
        torch.save(payload, tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        meta = {
            "sha256": _digest(path),
            "epoch": state.epoch,
            "step_in_epoch": state.step_in_epoch,
            "global_step": state.global_step,
            "num_processes": len(processes),
            "config": self.config,
        }
        tmp = self.folder / f"{name}.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        _fsync(tmp)
        os.replace(tmp, self.folder / f"{name}.json")
        logger.info("checkpoint %s after step %d", path, state.global_step)
        for old in listed(self.folder)[:-KEEP]:
            old.unlink(missing_ok=True)
            old.with_suffix(".pt").unlink(missing_ok=True)

    # --- resuming ----------------------------------------------------------------------------

    def restore(self, state_type):
        """Loads the newest checkpoint into the model, optimiser, manipulation and RNGs and
        returns the loop's state, or None when there is no checkpoint."""
        meta_path = latest(self.folder)
        if meta_path is None:
            return None
        check_config(meta_path, self.config)
        path = verified(meta_path)
        payload = torch.load(path, map_location="cpu", weights_only=False)
        processes = payload["processes"]
        if len(processes) != distributed.world_size():
            raise DatamanipError(
                f"checkpoint {path} was written by {len(processes)} processes, this run has "
                f"{distributed.world_size()}; launch it with as many processes"
            )
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        own = processes[distributed.rank()]
        self.manipulation.load_state_dict(own["manipulation"])
        set_rng_states(own["rng"])
        if distributed.is_main():
            for file in self.appended:
                size = payload["files"].get(file.name)
                if size is not None and file.exists():
                    os.truncate(file, size)
        state = state_type(**payload["loop"])
        logger.info("resuming from %s, after step %d", path, state.global_step)
        return state

    def remove(self) -> None:
        """Drops the checkpoints once the run has finished (they are large and resume nothing)."""
        if distributed.is_main():
            for meta in listed(self.folder):
                meta.unlink(missing_ok=True)
                meta.with_suffix(".pt").unlink(missing_ok=True)
            for leftover in self.folder.glob("*.tmp"):
                leftover.unlink()
            if self.folder.is_dir() and not any(self.folder.iterdir()):
                self.folder.rmdir()


def should_resume(run_path: Path, resume: bool, overwrite: bool, config: dict) -> bool:
    """Whether a run continues the one in ``run_path``: with ``--resume``, or when the same
    command meets an unfinished run there (checkpoints, no results.json). Before anything is
    loaded, the newest checkpoint must match ``config`` (the resolved settings) and be intact."""
    run_path = Path(run_path)
    found = latest(run_path / FOLDER)
    finished = (run_path / "results.json").exists()
    if overwrite:
        return False
    if resume and finished:
        raise DatamanipError(
            f"the run in {run_path} has finished (results.json); nothing to resume; pass "
            "--overwrite to run it again"
        )
    if resume and found is None:
        raise DatamanipError(
            f"no checkpoint in {run_path / FOLDER} to resume from; run without --resume "
            "(and with --overwrite if the run stopped before its first checkpoint)"
        )
    if found is not None and not finished:
        check_config(found, json.loads(json.dumps(config)))
        verified(found)
        logger.info("continuing the unfinished run in %s", run_path)
        return True
    return False


def listed(folder: Path) -> list[Path]:
    """The ``.json`` of the complete checkpoints in ``folder``, oldest first."""
    if not Path(folder).is_dir():
        return []
    return sorted(p for p in Path(folder).glob("step_*.json") if p.with_suffix(".pt").exists())


def latest(folder: Path) -> Path | None:
    found = listed(folder)
    return found[-1] if found else None


def check_config(meta_path: Path, config: dict) -> None:
    saved = _read_meta(meta_path)["config"]
    differ = config_differences(saved, config)
    if differ:
        shown = ", ".join(f"{k} ({saved.get(k)!r} → {config.get(k)!r})" for k in differ)
        raise DatamanipError(
            f"the run in {meta_path.parent.parent} was started with other settings: {shown}; "
            "resume with the same settings, or pass --overwrite to start again"
        )


def verified(meta_path: Path) -> Path:
    """The ``.pt`` of ``meta_path`` after checking its digest; a one-line error otherwise."""
    path = meta_path.with_suffix(".pt")
    if _digest(path) != _read_meta(meta_path)["sha256"]:
        older = listed(meta_path.parent)[:-1]
        offer = (
            f"delete it (and {meta_path.name}) to resume from the previous one, {older[-1].with_suffix('.pt')}"
            if older
            else "no earlier checkpoint is left; pass --overwrite to start again"
        )
        raise DatamanipError(f"checkpoint {path} is corrupt or truncated; {offer}")
    return path


def _read_meta(meta_path: Path) -> dict:
    try:
        return json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise DatamanipError(
            f"checkpoint record {meta_path} cannot be read ({err}); delete it and its .pt to "
            "resume from the previous checkpoint"
        ) from None


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
