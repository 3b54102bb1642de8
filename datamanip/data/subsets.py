"""Draw the train, validation and test subsets that a run uses from a loaded data set.

Every draw comes from ``numpy.random.default_rng(data_seed)`` alone, so the same seed gives the
same subsets on any machine, and the global random state is never touched. Each class's train
examples are shuffled once; validation examples are taken from the front of that order and
training examples after them, so the two subsets are disjoint by construction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from datamanip.data.sources import Source, Split
from datamanip.errors import DatamanipError

logger = logging.getLogger(__name__)


@dataclass
class Subsets:
    """The three subsets of one run.

    Attributes:
        train: Training examples, in a seeded shuffled order.
        val: Validation examples that score the lookahead; drawn from the train split.
        test: Examples that test accuracy is reported on.
        test_split: Where the test set came from: ``"test"``, ``"validation"`` or
            ``"train-remainder"`` (train examples not drawn into train or val).
        notes: Plain-language remarks about choices made, for logs and the run summary.
        summary: JSON-able description of the draw: mode, seed, sizes and per-class counts.
        original_train_labels: [num_train] the training labels before ``label_noise`` flipped
            some of them, or None when no label was flipped; ``train.labels`` holds the noisy
            ones that training sees.
    """

    train: Split
    val: Split
    test: Split
    test_split: str
    notes: list[str]
    summary: dict
    original_train_labels: np.ndarray | None = None

    def flipped(self) -> np.ndarray:
        """[num_train] True where ``label_noise`` changed the training label."""
        if self.original_train_labels is None:
            return np.zeros(len(self.train), dtype=bool)
        return self.original_train_labels != self.train.labels


def build_subsets(
    source: Source,
    *,
    imbalance: float | None = None,
    minority_label: int = 0,
    classes: tuple[int, int] | None = None,
    majority_size: int = 1000,
    per_class: int | None = None,
    imbalance_factor: float | None = None,
    val_per_class: int = 10,
    data_seed: int = 0,
    label_noise: float = 0.0,
    test_per_class: int | None = None,
) -> Subsets:
    """Draws the train, validation and test subsets of a run.

    Four modes: ``imbalance=r`` keeps two classes, ``majority_size`` examples of the majority
    and ``round(majority_size * r)`` of the minority (the SST-2 and CIFAR-10 imbalanced setups);
    ``per_class=k`` keeps ``k`` examples of every class (the low-data setups);
    ``imbalance_factor=f`` keeps every class with the exponential long-tail profile
    ``n_c = int(n_max * f ** (-c / (C - 1)))``, ``n_max`` being what the smallest class holds
    beside its validation examples (long-tailed CIFAR-10 of L2RW and Meta-Weight-Net, SPEC §6);
    none of them keeps the whole train split less the validation examples.

    Args:
        source: The loaded data set; subsets are drawn from its ``train`` split.
        imbalance: Minority-to-majority ratio in ``(0, 1]``.
        minority_label: The minority class in imbalance mode.
        classes: The two classes kept in imbalance mode; needed when there are more than two,
            except for images, where classes 0 (minority) and 1 are kept as in the paper.
        majority_size: Training examples of the majority class in imbalance mode.
        per_class: Training examples per class in low-data mode.
        imbalance_factor: Largest to smallest class size in long-tailed mode, ``>= 1``.
        val_per_class: Validation examples per class kept.
        data_seed: Seed of the draw; the same seed gives the same subsets.
        label_noise: Fraction of training labels flipped, each to another kept class drawn
            uniformly; which ones is fixed by ``data_seed``. Validation and test stay clean.
        test_per_class: Test examples kept per class (a class with fewer keeps all), drawn
            once by ``data_seed``: every run with that seed scores on the same examples. None
            keeps the whole test split.

    Returns:
        The subsets, with notes and a JSON-able summary.

    Raises:
        DatamanipError: For a bad option or combination, or a class with too few examples.

    Example::

        subsets = build_subsets(load_source("sst2"), imbalance=0.05)  # 1000 pos + 50 neg
    """
    _check_options(imbalance, per_class, classes, majority_size, val_per_class, data_seed)
    _check_factor(imbalance_factor, imbalance, per_class)
    _check_noise(label_noise)
    if test_per_class is not None:
        _check_count("--test-per-class", test_per_class, minimum=1)
    train_split = _train_split(source)
    notes = []
    if (
        imbalance is not None
        and classes is None
        and source.kind == "image"
        and source.num_labels > 2
    ):
        classes = (0, 1)
        notes.append(
            "--imbalance keeps classes 0 and 1 (the paper's CIFAR-10 pair); pass "
            "--classes A,B for others"
        )
    mode, sizes, minority, majority = _class_sizes(
        source, imbalance, per_class, classes, minority_label, majority_size
    )
    if imbalance_factor is not None:
        mode, sizes = (
            "long-tailed",
            _long_tail_sizes(train_split, imbalance_factor, val_per_class, source.num_labels),
        )

    rng = np.random.default_rng(data_seed)
    train_idx, val_idx, rest_idx = _draw(train_split.labels, sizes, val_per_class, rng, source)
    train, val = train_split.take(train_idx), train_split.take(val_idx)
    test, test_split, test_notes = _test_set(source, train_split.take(rest_idx), sorted(sizes))
    notes += test_notes
    if test_per_class is not None:
        test, note = _test_subset(test, test_per_class, data_seed)
        notes.append(note)
    original_labels = None
    if label_noise > 0:
        original_labels = train.labels.copy()
        train = flip_labels(train, label_noise, sorted(sizes), data_seed)

    summary = {
        "dataset": source.name,
        "kind": source.kind,
        "origin": source.origin,
        "mode": mode,
        "data_seed": int(data_seed),
        "imbalance": None if imbalance is None else float(imbalance),
        "per_class": per_class,
        "imbalance_factor": None if imbalance_factor is None else float(imbalance_factor),
        "val_per_class": val_per_class,
        "test_per_class": test_per_class,
        "majority_size": majority_size if mode == "imbalance" else None,
        "minority_label": minority,
        "majority_label": majority,
        "num_labels": source.num_labels,
        "classes": sorted(sizes),
        "label_names": source.label_names,
        "test_split": test_split,
        "train": _class_counts(train.labels, sizes),
        "val": _class_counts(val.labels, sizes),
        "test": _class_counts(test.labels, sizes),
        "notes": notes,
    }
    if original_labels is not None:
        flipped = original_labels != train.labels
        summary["label_noise"] = {
            "fraction": float(label_noise),
            "flipped": int(flipped.sum()),
            "flipped_ids": train.ids[flipped].tolist(),
            "original_labels": original_labels[flipped].tolist(),
        }
    counts = ", ".join(f"{name} {summary[name]}" for name in ("train", "val", "test"))
    logger.info("subsets of %s (%s, data seed %d): %s", source.name, mode, data_seed, counts)
    for note in notes:
        logger.info("note: %s", note)
    return Subsets(train, val, test, test_split, notes, summary, original_labels)


def flip_labels(train: Split, fraction: float, classes: list[int], data_seed: int) -> Split:
    """``train`` with ``round(fraction * len(train))`` labels flipped to another class of
    ``classes``, drawn uniformly. The flips come from their own generator seeded by
    ``data_seed``, so adding noise leaves the draw of the subsets themselves unchanged."""
    rng = np.random.default_rng([data_seed, 7])  # 7: any fixed stream other than the draw's
    chosen = rng.choice(len(train), size=round(fraction * len(train)), replace=False)
    labels = train.labels.copy()
    for position in chosen:
        others = [c for c in classes if c != labels[position]]
        labels[position] = others[rng.integers(len(others))]
    return Split(train.ids, train.inputs, labels)


def _check_factor(imbalance_factor, imbalance, per_class) -> None:
    if imbalance_factor is None:
        return
    if imbalance is not None or per_class is not None:
        raise DatamanipError(
            "--imbalance-factor was given with --imbalance or --per-class; pass only one of "
            "them (--imbalance-factor F for long-tailed data over all classes)"
        )
    if isinstance(imbalance_factor, bool) or not imbalance_factor >= 1:  # also catches NaN
        raise DatamanipError(
            f"--imbalance-factor {imbalance_factor} is below 1; pass the ratio of the largest "
            "to the smallest class, for example --imbalance-factor 100"
        )


def _long_tail_sizes(train: Split, factor: float, val_per_class: int, classes: int):
    """Training examples per class: n_max · factor^(−c/(C−1)), the profile of Cui et al. 2019
    that L2RW and Meta-Weight-Net report on; n_max is what the smallest class holds beside
    its validation examples (CIFAR-10: 5000 − 10), so every class can supply its share."""
    available = min(int(np.sum(train.labels == c)) for c in range(classes))
    n_max = available - val_per_class
    if n_max < 1:
        raise DatamanipError(
            f"a class has only {available} training examples, too few beside "
            f"{val_per_class} validation ones; lower --val-per-class"
        )
    return {c: max(1, int(n_max * factor ** (-c / (classes - 1)))) for c in range(classes)}


def _check_noise(label_noise) -> None:
    if isinstance(label_noise, bool) or not 0 <= label_noise < 1:  # also catches NaN
        raise DatamanipError(
            f"--label-noise {label_noise} is outside [0, 1); pass the fraction of training "
            "labels to flip, for example --label-noise 0.2"
        )


def _class_sizes(source, imbalance, per_class, classes, minority_label, majority_size):
    """The mode, training examples per kept class (None: all left), and minority/majority."""
    if imbalance is not None:
        minority, majority = _imbalance_classes(source, classes, minority_label)
        sizes = {majority: majority_size, minority: max(1, round(majority_size * imbalance))}
        return "imbalance", dict(sorted(sizes.items())), minority, majority
    if per_class is not None:
        return "per_class", dict.fromkeys(range(source.num_labels), per_class), None, None
    return "full", dict.fromkeys(range(source.num_labels), None), None, None


def _check_options(imbalance, per_class, classes, majority_size, val_per_class, data_seed):
    """Rejects bad values and combinations before any data is touched."""
    if imbalance is not None and per_class is not None:
        raise DatamanipError(
            "--imbalance and --per-class were both given; pass only one of them "
            "(--imbalance for the two-class imbalanced setup, --per-class for low-data)"
        )
    if imbalance is not None and not (0 < imbalance <= 1):  # also catches NaN
        raise DatamanipError(
            f"--imbalance {imbalance} is outside (0, 1]; pass the minority-to-majority "
            f"ratio, for example --imbalance 0.05 for 50 minority per 1000 majority examples"
        )
    if classes is not None and imbalance is None:
        raise DatamanipError(
            "--classes only applies with --imbalance; drop --classes or add --imbalance R"
        )
    _check_count("--majority-size", majority_size, minimum=1)
    _check_count("--val-per-class", val_per_class, minimum=1)
    _check_count("--data-seed", data_seed, minimum=0)
    if per_class is not None:
        _check_count("--per-class", per_class, minimum=1)


def _check_count(flag: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DatamanipError(f"{flag} {value!r} is not valid; pass an integer >= {minimum}")


def _train_split(source: Source) -> Split:
    if "train" not in source.splits:
        raise DatamanipError(
            f"{source.name} ({source.origin}) has no train split to draw subsets from; "
            f"add a train split (for a folder, a train.parquet/train.csv/train.jsonl file)"
        )
    if "train" in source.unlabelled_splits:
        raise DatamanipError(
            f"the train split of {source.name} has no labels (all -1); point --label-column "
            f"at the column that holds the labels"
        )
    return source.splits["train"]


def _imbalance_classes(source: Source, classes, minority_label: int) -> tuple[int, int]:
    """The (minority, majority) pair of the imbalanced setup."""
    if classes is None:
        if source.num_labels != 2:
            raise DatamanipError(
                f"--imbalance keeps two classes, but {source.name} has {source.num_labels}; "
                f"pass --classes A,B naming the two (labels 0..{source.num_labels - 1})"
            )
        classes = (0, 1)

    classes = tuple(int(label) for label in classes)
    if len(classes) != 2 or classes[0] == classes[1]:
        raise DatamanipError(
            f"--classes {','.join(map(str, classes))} must name two different classes; "
            f"pass --classes A,B"
        )
    for label in classes:
        if not 0 <= label < source.num_labels:
            raise DatamanipError(
                f"--classes names class {label}, but {source.name} has labels "
                f"0..{source.num_labels - 1}; pass two classes in that range"
            )
    if minority_label not in classes:
        raise DatamanipError(
            f"--minority-label {minority_label} is not one of the kept classes "
            f"{classes[0]},{classes[1]}; pass --minority-label {classes[0]} or {classes[1]}"
        )
    majority = classes[1] if minority_label == classes[0] else classes[0]
    return int(minority_label), majority


def _draw(labels, sizes, val_per_class, rng, source) -> tuple[np.ndarray, ...]:
    """Positions in the train split of the train subset, val subset, and what is left.

    Every class of the split is shuffled, in label order, whether kept or not, so a class's
    order (and hence its validation examples) depends on the seed alone, not on the mode.
    """
    orders = [
        rng.permutation(np.flatnonzero(labels == label)) for label in range(source.num_labels)
    ]
    train_parts, val_parts, rest_parts = [], [], []
    for label in sorted(sizes):
        order, train_size = orders[label], sizes[label]
        if len(order) == 0:
            raise DatamanipError(_missing_class(source, label, orders))
        if len(order) < val_per_class + (train_size or 1):
            raise DatamanipError(_too_few(source, label, len(order), train_size, val_per_class))
        end = len(order) if train_size is None else val_per_class + train_size
        val_parts.append(order[:val_per_class])
        train_parts.append(order[val_per_class:end])
        rest_parts.append(order[end:])

    # Class-sorted blocks would make every batch one class; the loop reshuffles per epoch too.
    train_idx = rng.permutation(np.concatenate(train_parts))
    val_idx = rng.permutation(np.concatenate(val_parts))
    return train_idx, val_idx, np.sort(np.concatenate(rest_parts))


def _missing_class(source, label, orders) -> str:
    """Lowering a size cannot help a class with no examples: the labels need fixing."""
    present = ", ".join(str(other) for other, order in enumerate(orders) if len(order))
    return (
        f"class {label} has no examples in the train split of {source.name} (it holds classes "
        f"{present} of 0..{source.num_labels - 1}); map labels to integers 0..K-1 without "
        f"gaps, or with --imbalance pass --classes A,B naming two classes it holds"
    )


def _too_few(source, label, available, train_size, val_per_class) -> str:
    if train_size is None:
        needs, lower = f"{val_per_class} validation + at least 1 training", "--val-per-class"
    else:
        needs = f"{train_size} training + {val_per_class} validation"
        lower = "--imbalance/--majority-size/--per-class/--val-per-class"
    return (
        f"class {label} has {available} example{'' if available == 1 else 's'} in the train "
        f"split of {source.name}, but the subset needs {needs}; lower {lower}"
    )


def _test_set(source: Source, rest: Split, kept: list[int]) -> tuple[Split, str, list[str]]:
    """The labelled split to report test accuracy on, restricted to the kept classes."""
    splits, unlabelled = source.splits, source.unlabelled_splits
    notes = []
    if "test" in splits and "test" not in unlabelled:
        test, test_split = splits["test"], "test"
    elif "validation" in splits and "validation" not in unlabelled:
        why = "has no labels" if "test" in splits else "does not exist"
        notes.append(
            f"the test split of {source.name} {why}; test accuracy is reported on the "
            f"validation split"
        )
        test, test_split = splits["validation"], "validation"
    else:
        notes.append(
            f"{source.name} has no labelled test or validation split; test accuracy is "
            f"reported on the {len(rest)} labelled train examples outside the train and "
            f"validation subsets"
        )
        test, test_split = rest, "train-remainder"

    keep = np.isin(test.labels, kept)
    if not keep.all():
        notes.append(
            f"the test set keeps only classes {', '.join(map(str, kept))} "
            f"({int(keep.sum())} of {len(test)} examples)"
        )
        test = test.take(np.flatnonzero(keep))
    if len(test) == 0:
        raise DatamanipError(
            f"no test examples are left for {source.name} ({test_split}); add a labelled "
            f"test split (a folder with train and test files) or pass --per-class K so that "
            f"some train examples stay out of the subsets"
        )
    return test, test_split, notes


def _test_subset(test: Split, per_class: int, data_seed: int) -> tuple[Split, str]:
    """``per_class`` test examples of each class, drawn by their own generator so that the
    training and validation draws stay what they are without --test-per-class."""
    rng = np.random.default_rng([data_seed, 7])
    keep = []
    for label in np.unique(test.labels):
        where = np.flatnonzero(test.labels == label)
        keep.append(np.sort(rng.permutation(where)[:per_class]))
    kept = np.sort(np.concatenate(keep))
    note = (
        f"test accuracy is on {len(kept)} of the {len(test)} test examples "
        f"(--test-per-class {per_class}, drawn by --data-seed {data_seed})"
    )
    return test.take(kept), note


def _class_counts(labels: np.ndarray, kept) -> dict[str, int]:
    """Examples per class, keyed by the label as a string so it survives JSON."""
    return {str(label): int(np.sum(labels == label)) for label in sorted(kept)}
