"""Load a labelled data set into memory as plain splits of ids, inputs and integer labels.

A named data set (see :data:`KNOWN_DATASETS`) comes from a local mirror folder when there is one,
else from the Hugging Face hub. Anything else is read as a local CSV, JSON-lines or parquet file,
a folder of such files named after their splits, or a folder of images in one subfolder per class
(``DIR/CLASS/*.png``, or ``DIR/SPLIT/CLASS/*.png`` with a ``train`` split).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from datamanip.errors import DatamanipError

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "DATAMANIP_DATA_DIR"
LOCAL_SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGE_SPLITS = ("train", "validation", "test")
# Local data names its text column like one of these unless --text-column says otherwise.
TEXT_COLUMN_GUESSES = ("text", "sentence")
DEFAULT_LABEL_COLUMN = "label"
# The hub marks a split without labels (sst2 test, imdb unsupervised) with -1 on every row.
NO_LABEL = -1


@dataclass
class Split:
    """One split of a data set, row-aligned.

    Attributes:
        ids: Each example's id in its source split: the ``idx`` column where the source has
            one, else the row number. int64.
        inputs: Texts (``str``) for kind ``"text"``; image values as stored (for example
            ``{"bytes", "path"}`` dicts) for kind ``"image"``.
        labels: Class ids, int64; all -1 in an unlabelled split.
    """

    ids: np.ndarray
    inputs: list
    labels: np.ndarray

    def __post_init__(self):
        self.ids = np.asarray(self.ids, dtype=np.int64)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if not isinstance(self.inputs, list):
            self.inputs = list(self.inputs)
        if not len(self.ids) == len(self.inputs) == len(self.labels):
            raise ValueError(
                f"split columns differ in length: {len(self.ids)} ids, "
                f"{len(self.inputs)} inputs, {len(self.labels)} labels"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices) -> Split:
        """Returns the rows at these positions, in the order given."""
        indices = np.asarray(indices, dtype=np.int64)
        return Split(self.ids[indices], [self.inputs[i] for i in indices], self.labels[indices])


@dataclass
class Source:
    """A whole data set as loaded, before any subset is drawn.

    Attributes:
        name: The data set's name (``"sst2"``), or the file or folder stem for local data.
        kind: ``"text"`` or ``"image"``.
        splits: Split name (``"train"``, ``"validation"``, ``"test"``, ...) to its rows.
        num_labels: Number of classes; labels run over ``0..num_labels-1``.
        label_names: One name per class where known, else None.
        origin: Where the rows came from, for logs and run summaries.
        unlabelled_splits: Splits whose labels are all -1: kept, never evaluated on.
    """

    name: str
    kind: str
    splits: dict[str, Split]
    num_labels: int
    label_names: list[str] | None
    origin: str
    unlabelled_splits: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class KnownDataset:
    """Where a named data set lives on the hub and how its columns are called."""

    hub_id: str
    input_column: str
    label_column: str
    kind: str
    num_labels: int
    label_names: tuple[str, ...]


KNOWN_DATASETS: dict[str, KnownDataset] = {
    "sst2": KnownDataset(
        hub_id="stanfordnlp/sst2",
        input_column="sentence",
        label_column="label",
        kind="text",
        num_labels=2,
        label_names=("negative", "positive"),
    ),
    "sst5": KnownDataset(
        hub_id="SetFit/sst5",
        input_column="text",
        label_column="label",
        kind="text",
        num_labels=5,
        label_names=("very negative", "negative", "neutral", "positive", "very positive"),
    ),
    "imdb": KnownDataset(
        hub_id="stanfordnlp/imdb",
        input_column="text",
        label_column="label",
        kind="text",
        num_labels=2,
        label_names=("neg", "pos"),
    ),
    "cifar10": KnownDataset(
        hub_id="uoft-cs/cifar10",
        input_column="img",
        label_column="label",
        kind="image",
        num_labels=10,
        label_names=(
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ),
    ),
    # NOTE: the hub copy of trec may still be built by a loading script, which `datasets` 4+
    # refuses; a mirror (or a local folder) of it works regardless.
    "trec": KnownDataset(
        hub_id="CogComp/trec",
        input_column="text",
        label_column="coarse_label",
        kind="text",
        num_labels=6,
        label_names=("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"),
    ),
}


def load_source(
    dataset: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
) -> Source:
    """Loads a named data set or a local file or folder.

    A named data set is read from ``DIR/NAME/SPLIT.parquet`` where DIR is ``data_dir`` or else
    the ``DATAMANIP_DATA_DIR`` environment variable, and from the hub copy when there is no such
    mirror. A local file is the train split only; a local folder holds one
    ``SPLIT.(parquet|csv|jsonl)`` file per split.

    Args:
        dataset: A name from :data:`KNOWN_DATASETS`, or the path of a local file or folder.
        data_dir: Folder holding mirrors of named data sets; overrides ``DATAMANIP_DATA_DIR``.
        text_column: Column holding the inputs; defaults to the data set's own, or for local
            data to ``text`` or else ``sentence``.
        label_column: Column holding the integer labels; defaults to the data set's own, or
            ``label`` for local data.

    Returns:
        The loaded data set, with labels checked to be integers in range.

    Raises:
        DatamanipError: When the data cannot be found or read, a split is empty, a column is
            missing, ids repeat within a split, labels are not integers in
            ``0..num_labels-1``, the train split holds one class only, or another split holds a
            class that the train split lacks.

    Example::

        source = load_source("sst2", data_dir="../shared/data")
        source.splits["train"].labels[:5]
    """
    name = os.fspath(dataset)
    if name in KNOWN_DATASETS:
        source = _load_known(name, data_dir, text_column, label_column)
    elif Path(name).expanduser().exists():
        source = _load_local(Path(name).expanduser(), text_column, label_column)
    else:
        known = ", ".join(KNOWN_DATASETS)
        raise DatamanipError(
            f"unknown data set '{name}': it is not a known name ({known}) and no such file or "
            f"folder exists; pass one of those names, or the path of a local CSV, JSON-lines or "
            f"parquet file, or of a folder holding train.csv/train.jsonl/train.parquet"
        )

    sizes = ", ".join(f"{split} {len(rows)}" for split, rows in source.splits.items())
    logger.info("loaded %s from %s (%s)", source.name, source.origin, sizes)
    return source


def short_error(error: BaseException) -> str:
    """The first line of an exception, clipped, for quoting inside a one-line message."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _load_known(name, data_dir, text_column, label_column) -> Source:
    """Reads a named data set from its mirror, or from the hub when there is no mirror."""
    info = KNOWN_DATASETS[name]
    folder = _mirror_folder(name, data_dir)
    if folder is not None and (folder / "train.parquet").is_file():
        files = {path.stem: path for path in sorted(folder.glob("*.parquet"))}
        frames = {split: _read_file(path) for split, path in files.items()}
        places = {split: str(path) for split, path in files.items()}
        origin = f"mirror {folder}"
    else:
        frames = _read_hub(name, info, folder)
        places = {split: f"hub {info.hub_id} split {split}" for split in frames}
        origin = f"hub {info.hub_id}"

    # A different label column (trec's fine_label, say) has its own classes: count them.
    label_column = label_column or info.label_column
    own_labels = label_column == info.label_column
    return _assemble(
        name,
        frames,
        places,
        text_columns=(text_column or info.input_column,),
        label_column=label_column,
        kind=info.kind,
        num_labels=info.num_labels if own_labels else None,
        label_names=list(info.label_names) if own_labels else None,
        origin=origin,
    )


def _mirror_folder(name: str, data_dir) -> Path | None:
    """``DIR/NAME`` for the mirror root given or set in the environment, or None."""
    root = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    return Path(root).expanduser() / name if root else None


def _read_hub(name: str, info: KnownDataset, folder: Path | None) -> dict[str, pd.DataFrame]:
    """Loads the hub copy, or says where else the data set was looked for and how to mirror it."""
    try:
        import datasets  # slow to import, and only needed without a mirror

        dataset_dict = datasets.load_dataset(info.hub_id)
    except Exception as error:  # offline, missing, gated, broken cache: all mean "not here"
        if folder is None:
            mirror = f"no mirror folder was given (--data-dir or {DATA_DIR_ENV})"
        else:
            mirror = f"there is no mirror at {folder / 'train.parquet'}"
        raise DatamanipError(
            f"cannot load {name}: {mirror}, and the hub copy {info.hub_id} failed "
            f"({short_error(error)}); on a machine with internet run "
            f"`datamanip data download {name} --to DIR`, copy DIR here, then pass "
            f"--data-dir DIR or set {DATA_DIR_ENV}=DIR"
        ) from error
    return {split: part.to_pandas() for split, part in dataset_dict.items()}


def _load_local(path: Path, text_column, label_column) -> Source:
    """Reads a local file (the train split) or a folder of ``SPLIT.ext`` files."""
    if path.is_dir() and _is_image_folder(path):
        return _load_image_folder(path)
    if path.is_dir():
        files = _split_files(path)
        origin = f"folder {path}"
    else:
        _check_suffix(path)
        files = {"train": path}
        origin = f"file {path}"

    frames = {split: _read_file(file) for split, file in files.items()}
    return _assemble(
        path.stem,
        frames,
        {split: str(file) for split, file in files.items()},
        text_columns=(text_column,) if text_column else TEXT_COLUMN_GUESSES,
        label_column=label_column or DEFAULT_LABEL_COLUMN,
        kind=None,
        num_labels=None,
        label_names=None,
        origin=origin,
    )


def dataset_kind(dataset: str | os.PathLike) -> str:
    """``"text"`` or ``"image"``, from the name or the files, without reading the examples.

    A known name has its own kind; a folder of class subfolders holds images; a parquet file
    (or folder of them) holds images when a column stores bytes or ``{"bytes", "path"}``
    structs. Anything else is taken as text (loading checks it).
    """
    name = os.fspath(dataset)
    if name in KNOWN_DATASETS:
        return KNOWN_DATASETS[name].kind
    path = Path(name).expanduser()
    if path.is_dir() and _is_image_folder(path):
        return "image"
    parquet = path / "train.parquet" if path.is_dir() else path
    if parquet.suffix.lower() == ".parquet" and parquet.is_file():
        try:
            schema = pq.read_schema(parquet)
        except (OSError, pa.ArrowException):
            return "text"  # loading says what is wrong with the file
        for column in schema:
            kind = column.type
            if pa.types.is_binary(kind) or (
                pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0
            ):
                return "image"
    return "text"


def _is_image_folder(folder: Path) -> bool:
    """A folder without data files whose subfolders (or ``train/`` subfolders) hold images."""
    if any(p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES for p in folder.iterdir()):
        return False
    root = folder / "train" if (folder / "train").is_dir() else folder
    return any(_image_files(sub) for sub in root.iterdir() if sub.is_dir())


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _load_image_folder(folder: Path) -> Source:
    """Reads ``DIR/CLASS/*.png`` (the train split) or ``DIR/SPLIT/CLASS/*.png``.

    Classes are the class folders of the train split in sorted order (label 0 is the first);
    ids are row numbers in class-then-file-name order. Images stay files until decoded.
    """
    split_layout = (folder / "train").is_dir() and not _image_files(folder / "train")
    roots = (
        {split: folder / split for split in IMAGE_SPLITS if (folder / split).is_dir()}
        if split_layout
        else {"train": folder}
    )
    class_names = [sub.name for sub in sorted(roots["train"].iterdir()) if _image_files(sub)]
    frames, places = {}, {}
    for split, root in roots.items():
        rows = []
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and _image_files(p)):
            if sub.name not in class_names:
                raise DatamanipError(
                    f"{sub} is a class folder of the {split} split that the train split "
                    f"({roots['train']}) lacks, so no model can learn it; add it to train or "
                    f"remove it"
                )
            label = class_names.index(sub.name)
            rows += [({"bytes": None, "path": str(p)}, label) for p in _image_files(sub)]
        frames[split] = pd.DataFrame(rows, columns=["image", "label"])
        places[split] = f"image folder {root}"
    return _assemble(
        folder.name,
        frames,
        places,
        text_columns=("image",),
        label_column="label",
        kind="image",
        num_labels=len(class_names),
        label_names=class_names,
        origin=f"image folder {folder}",
    )


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise DatamanipError(
            f"cannot read {path}: unsupported file type '{path.suffix}'; use a .csv, .jsonl "
            f"(or .json with one JSON object per line) or .parquet file"
        )


def _split_files(folder: Path) -> dict[str, Path]:
    """Maps split names to files for a folder such as ``train.csv`` + ``test.csv``."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if (
            not path.is_file()
            or path.name.startswith(".")
            or path.suffix.lower() not in LOCAL_SUFFIXES
        ):
            continue
        if path.stem in files:
            raise DatamanipError(
                f"{folder} holds two files for split '{path.stem}' ({files[path.stem].name}, "
                f"{path.name}); keep only one"
            )
        files[path.stem] = path

    if "train" not in files:
        found = ", ".join(sorted(path.name for path in files.values())) or "no data files"
        raise DatamanipError(
            f"{folder} has no train split (found {found}); name the training file "
            f"train.parquet, train.csv or train.jsonl"
        )
    return files


def _read_file(path: Path) -> pd.DataFrame:
    """Reads one parquet, CSV or JSON-lines file into a frame, as stored."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pq.read_table(path).to_pandas()
        if suffix == ".csv":
            # Only empty cells are missing: "NA" or "null" can be real text.
            return pd.read_csv(path, keep_default_na=False, na_values=[""])
        return _read_json_lines(path)
    except (OSError, ValueError, pa.ArrowException) as error:
        kind = {".parquet": "parquet", ".csv": "CSV"}.get(suffix, "JSON-lines (one object a line)")
        raise DatamanipError(
            f"cannot read {path} ({short_error(error)}); check that it is a valid {kind} file"
        ) from error


def _read_json_lines(path: Path) -> pd.DataFrame:
    with path.open("rb") as file:
        start = file.read(256).lstrip()
    if start.startswith(b"["):
        raise DatamanipError(
            f"{path} is one JSON array, but JSON files are read as JSON lines; write one object "
            f"per line (pandas: to_json(path, orient='records', lines=True))"
        )
    return pd.read_json(path, lines=True, dtype=False)


def _assemble(
    name, frames, places, *, text_columns, label_column, kind, num_labels, label_names, origin
) -> Source:
    """Turns raw frames into checked splits and works out which are labelled."""
    for split, frame in frames.items():
        _check_has_rows(frame, split, places[split])
    if kind is None:
        kind = _infer_kind(frames["train"], places["train"], text_columns)
    splits = {
        split: _to_split(frame, places[split], text_columns, label_column, kind)
        for split, frame in frames.items()
    }
    for split, rows in splits.items():
        _check_unique_ids(rows.ids, split, places[split])

    unlabelled = _unlabelled_splits(name, origin, splits)
    labelled = [split for split in splits if split not in unlabelled]
    for split in labelled:
        _check_label_range(splits[split].labels, splits[split].ids, num_labels, places[split])
    if num_labels is None:
        num_labels = int(max(splits[split].labels.max() for split in labelled)) + 1
    _check_classes(name, {split: splits[split] for split in labelled}, places)

    return Source(name, kind, splits, num_labels, label_names, origin, unlabelled)


def _unlabelled_splits(name: str, origin: str, splits: dict[str, Split]) -> set[str]:
    """The splits with label -1 on every row; an error when that is all of them."""
    unlabelled = {split for split, rows in splits.items() if np.all(rows.labels == NO_LABEL)}
    if len(unlabelled) == len(splits):
        raise DatamanipError(
            f"every split of {name} ({origin}) has label -1 only, so nothing can be trained "
            f"on; point --label-column at the column that holds the labels"
        )
    return unlabelled


def _pick_column(frame: pd.DataFrame, place: str, wanted: tuple[str, ...], flag: str) -> str:
    """The first of the wanted columns that the frame has, or an error naming the flag."""
    for column in wanted:
        if column in frame.columns:
            return column
    looked = " or ".join(f"'{column}'" for column in wanted)
    existing = ", ".join(f"'{column}'" for column in frame.columns)
    raise DatamanipError(
        f"{place} has no column {looked} (its columns are {existing}); pass {flag} NAME "
        f"naming the column to use"
    )


def _infer_kind(frame: pd.DataFrame, place: str, text_columns: tuple[str, ...]) -> str:
    """``"text"`` for a column of strings, ``"image"`` for stored images (bytes or dicts)."""
    column = _pick_column(frame, place, text_columns, "--text-column")
    present = frame[column].dropna()
    if len(present) == 0:
        raise DatamanipError(
            f"column '{column}' of {place} is empty on every row; fill in the inputs, or pass "
            f"--text-column NAME naming the column that holds them"
        )
    first = present.iloc[0]
    if isinstance(first, str):
        return "text"
    if isinstance(first, (bytes, dict)):
        return "image"
    raise DatamanipError(
        f"column '{column}' of {place} holds {type(first).__name__} values, neither text nor "
        f"images; pass --text-column NAME naming the column with the inputs"
    )


def _to_split(frame, place, text_columns, label_column, kind) -> Split:
    """Checks one frame's inputs and labels and packs them as a :class:`Split`."""
    input_column = _pick_column(frame, place, text_columns, "--text-column")
    label_column = _pick_column(frame, place, (label_column,), "--label-column")

    # Ids follow the source's own numbering where it has one, so subsets can be traced back.
    has_idx = "idx" in frame.columns and frame["idx"].dtype.kind in "iu"
    ids = frame["idx"].to_numpy(np.int64) if has_idx else np.arange(len(frame), dtype=np.int64)

    inputs = frame[input_column].tolist()
    _check_inputs(inputs, ids, kind, input_column, place)
    labels = _integer_labels(frame[label_column], ids, label_column, place)
    return Split(ids, inputs, labels)


def _check_has_rows(frame: pd.DataFrame, split: str, place: str) -> None:
    """Rejects a split without rows (a header-only CSV, an empty JSON-lines file)."""
    if len(frame) == 0:
        fix = "add examples to it" if split == "train" else "add examples to it or remove it"
        raise DatamanipError(f"{place} has no rows (the {split} split is empty); {fix}")


def _check_unique_ids(ids: np.ndarray, split: str, place: str) -> None:
    """Rejects an ``idx`` column that gives two rows of one split the same id."""
    repeated = pd.Series(ids).duplicated().to_numpy()
    if repeated.any():
        row_id = ids[int(np.argmax(repeated))]
        raise DatamanipError(
            f"id {row_id} appears on more than one row of the {split} split ({place}), but ids "
            f"(the 'idx' column) must be unique within a split; remove the duplicate rows, "
            f"renumber 'idx', or drop the column so that rows are numbered in order"
        )


def _check_inputs(inputs: list, ids: np.ndarray, kind: str, column: str, place: str) -> None:
    """Rejects missing or empty inputs, naming the first bad row."""
    for value, row_id in zip(inputs, ids, strict=True):
        if kind == "text":
            problem = _text_problem(value)
        else:
            problem = "has a missing image" if value is None else None
        if problem:
            raise DatamanipError(
                f"column '{column}' of {place} {problem} at id {row_id}; fix or remove that row"
            )


def _text_problem(value) -> str | None:
    if isinstance(value, str):
        return None if value.strip() else "has an empty text"
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return "has a missing text"
    return f"has a {type(value).__name__} instead of a text"


def _integer_labels(values: pd.Series, ids: np.ndarray, column: str, place: str) -> np.ndarray:
    """Labels as int64; strings and floats pass only when they are whole numbers."""
    if values.dtype.kind == "b":
        bad = np.ones(len(values), dtype=bool)
    else:
        numeric = pd.to_numeric(values, errors="coerce")  # "pos" and None become NaN
        if numeric.dtype.kind in "iu":
            return numeric.to_numpy(np.int64)
        floats = numeric.to_numpy(np.float64, na_value=np.nan)
        bad = ~(np.isfinite(floats) & (floats == np.floor(floats)))
        if not bad.any():
            return floats.astype(np.int64)

    first = int(np.argmax(bad))
    value = values.iloc[first]
    value = value.item() if isinstance(value, np.generic) else value  # 0.5, not np.float64(0.5)
    raise DatamanipError(
        f"labels in column '{column}' of {place} must be integers, but id {ids[first]} has "
        f"{value!r}; map labels to integers 0..K-1 (and fill in missing ones)"
    )


def _check_label_range(
    labels: np.ndarray, ids: np.ndarray, num_labels: int | None, place: str
) -> None:
    """Rejects labels outside ``0..num_labels-1``; with ``num_labels`` None, negative ones only.

    -1 marks an unlabelled split only when it is on every row, so here it is out of range too.
    """
    bad = labels < 0 if num_labels is None else (labels < 0) | (labels >= num_labels)
    if bad.any():
        first = int(np.argmax(bad))
        allowed = "0..K-1" if num_labels is None else f"0..{num_labels - 1}"
        raise DatamanipError(
            f"labels out of range in {place}: id {ids[first]} has label {labels[first]}, but "
            f"labels must be {allowed} (or -1 on every row of an unlabelled split); "
            f"map labels to integers {allowed}"
        )


def _check_classes(name: str, labelled: dict[str, Split], places: dict[str, str]) -> None:
    """Rejects data with one class only, or a split holding a class the train split lacks."""
    train = labelled.get("train")
    pooled = [train] if train is not None else list(labelled.values())
    classes = np.unique(np.concatenate([rows.labels for rows in pooled]))
    if len(classes) < 2:
        where = f"the train split ({places['train']})" if train is not None else name
        raise DatamanipError(
            f"{where} has only one class (label {classes[0]}), but classification needs at "
            f"least two; check --label-column, or add examples of another class"
        )
    if train is None:
        return

    for split, rows in labelled.items():
        unseen = ~np.isin(rows.labels, classes)
        if unseen.any():
            first = int(np.argmax(unseen))
            raise DatamanipError(
                f"the {split} split ({places[split]}) holds label {rows.labels[first]} (id "
                f"{rows.ids[first]}), which the train split ({places['train']}) lacks, so no "
                f"model can learn it; fix the labels so that every class of {split} is in train"
            )
