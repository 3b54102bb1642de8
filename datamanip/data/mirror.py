"""Write local mirrors of data sets: one parquet file per split, read back by ``load_source``.

A mirror lets a machine without internet use a named data set: make it with
``datamanip data download NAME --to DIR`` where the hub is reachable, copy DIR over, and pass
``--data-dir DIR`` (or set ``DATAMANIP_DATA_DIR=DIR``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from datamanip.data.sources import KNOWN_DATASETS, short_error
from datamanip.errors import DatamanipError

logger = logging.getLogger(__name__)


def write_mirror(
    splits: dict[str, pa.Table | pd.DataFrame], dest: str | os.PathLike, name: str
) -> Path:
    """Writes ``dest/name/SPLIT.parquet`` for every split, columns as given.

    Args:
        splits: Split name to its rows, as a pyarrow Table or a pandas DataFrame.
        dest: The mirror root, the folder later passed as ``--data-dir``.
        name: The data set's name, as ``load_source`` is called with.

    Returns:
        The data set's mirror folder, ``dest/name``.
    """
    folder = Path(dest).expanduser() / name
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        if isinstance(rows, pd.DataFrame):
            rows = pa.Table.from_pandas(rows, preserve_index=False)
        elif not isinstance(rows, pa.Table):
            raise TypeError(f"split {split!r}: expected a pyarrow Table or pandas DataFrame")

        # Write aside, then rename, so an interrupted write never leaves a half file to be read.
        partial = folder / f"{split}.parquet.partial"
        pq.write_table(rows, partial)
        os.replace(partial, folder / f"{split}.parquet")
        logger.info("wrote %s (%d rows)", folder / f"{split}.parquet", rows.num_rows)
    return folder


def download_dataset(name: str, to: str | os.PathLike) -> Path:
    """Downloads a named data set from the hub and writes its mirror under ``to``.

    Returns:
        The mirror folder, ``to/name``.

    Raises:
        DatamanipError: For an unknown name, or when the hub cannot be reached.
    """
    info = KNOWN_DATASETS.get(name)
    if info is None:
        raise DatamanipError(
            f"cannot download '{name}': not a known data set; pass one of "
            f"{', '.join(KNOWN_DATASETS)} (local files need no download)"
        )
    try:
        import datasets  # slow to import, and only needed here

        dataset_dict = datasets.load_dataset(info.hub_id)
    except Exception as error:  # offline, missing, gated: the user's fix is the same
        raise DatamanipError(
            f"cannot download {name} from the hub copy {info.hub_id} ({short_error(error)}); "
            f"run this on a machine that can reach huggingface.co"
        ) from error
    tables = {split: part.with_format("arrow")[:] for split, part in dataset_dict.items()}
    return write_mirror(tables, to, name)
