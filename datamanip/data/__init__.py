"""Data sets and subsets: load a named or local data set, draw a run's train/val/test subsets."""

from datamanip.data.mirror import download_dataset, write_mirror
from datamanip.data.sources import (
    DATA_DIR_ENV,
    KNOWN_DATASETS,
    KnownDataset,
    Source,
    Split,
    dataset_kind,
    load_source,
)
from datamanip.data.subsets import Subsets, build_subsets

__all__ = [
    "DATA_DIR_ENV",
    "KNOWN_DATASETS",
    "KnownDataset",
    "Source",
    "Split",
    "Subsets",
    "build_subsets",
    "dataset_kind",
    "download_dataset",
    "load_source",
    "write_mirror",
]
