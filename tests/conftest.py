"""Shared fixtures: the real data folder, and tiny made-up data sets shaped like the real ones."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datamanip.data import write_mirror

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# Rows per class in the tiny sst2-shaped mirror: enough for 40 majority + 10 validation.
TINY_TRAIN_PER_CLASS = 60
TINY_VALIDATION_PER_CLASS = 8
TINY_TEST_PER_CLASS = 12

_WORDS = {0: ("dull", "clumsy", "tiresome", "flat"), 1: ("warm", "sharp", "lively", "moving")}


# --- data --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real data folder next to the checkout; skips the test when it is absent."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA}: the shared parquet mirrors are absent")
    return SHARED_DATA


def sst2_frame(per_class: int, start_idx: int = 0, labelled: bool = True) -> pd.DataFrame:
    """Made-up sst2-shaped rows (idx, sentence, label), classes interleaved."""
    rows = []
    for i in range(2 * per_class):
        label = i % 2
        word = _WORDS[label][i % len(_WORDS[label])]
        rows.append((start_idx + i, f"a {word} film , take {i} .", label if labelled else -1))
    frame = pd.DataFrame(rows, columns=["idx", "sentence", "label"])
    return frame.astype({"idx": np.int32, "label": np.int64})  # the hub's column types


@pytest.fixture
def make_sst2_frame():
    """The factory of made-up sst2-shaped frames, for tests that build their own splits."""
    return sst2_frame


@pytest.fixture
def tiny_sst2_frames() -> dict[str, pd.DataFrame]:
    """The splits of the tiny sst2 mirror, as frames a test may change before writing."""
    return {
        "train": sst2_frame(TINY_TRAIN_PER_CLASS),
        "validation": sst2_frame(TINY_VALIDATION_PER_CLASS),
        "test": sst2_frame(TINY_TEST_PER_CLASS),
    }


@pytest.fixture
def tiny_mirror(tmp_path, tiny_sst2_frames) -> Path:
    """A mirror root holding a tiny labelled sst2; pass it as ``data_dir``."""
    root = tmp_path / "mirror"
    write_mirror(tiny_sst2_frames, root, "sst2")
    return root
