"""Tests of datamanip.data: loading named and local data sets, and drawing subsets."""

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from datamanip.data import build_subsets, download_dataset, load_source, write_mirror
from datamanip.errors import DatamanipError


def assert_fix_message(excinfo, *fragments: str) -> str:
    """The error is one line and names the problem and the fix (each fragment appears)."""
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def counts(split) -> dict[int, int]:
    labels, sizes = np.unique(split.labels, return_counts=True)
    return dict(zip(labels.tolist(), sizes.tolist(), strict=True))


@pytest.fixture
def tiny_sst2(tiny_mirror):
    return load_source("sst2", data_dir=tiny_mirror)


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """Makes the hub fail fast and see no cache, as on a machine without internet."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets.config
    import huggingface_hub.constants

    # Both libraries read the variables once, at import, which an earlier test may have done.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")


# --- loading named data sets --------------------------------------------------------------------


def test_mirror_loads_like_the_hub_copy(tiny_sst2, tiny_mirror):
    assert tiny_sst2.kind == "text"
    assert tiny_sst2.num_labels == 2
    assert tiny_sst2.label_names == ["negative", "positive"]
    assert tiny_sst2.origin == f"mirror {tiny_mirror / 'sst2'}"
    assert set(tiny_sst2.splits) == {"train", "validation", "test"}
    train = tiny_sst2.splits["train"]
    assert train.ids.dtype == np.int64 and train.labels.dtype == np.int64
    assert isinstance(train.inputs[0], str)
    assert tiny_sst2.unlabelled_splits == set()


def test_split_take_keeps_rows_aligned(tiny_sst2):
    train = tiny_sst2.splits["train"]
    part = train.take([5, 0, 3])
    assert part.ids.tolist() == [5, 0, 3]
    assert part.inputs == [train.inputs[5], train.inputs[0], train.inputs[3]]
    assert len(part) == 3


def test_data_dir_from_environment(monkeypatch, tiny_mirror):
    monkeypatch.setenv("DATAMANIP_DATA_DIR", str(tiny_mirror))
    assert load_source("sst2").origin == f"mirror {tiny_mirror / 'sst2'}"


def test_unknown_dataset_lists_names_and_local_option():
    with pytest.raises(DatamanipError) as excinfo:
        load_source("no-such-set")
    assert_fix_message(excinfo, "no-such-set", "sst2", "sst5", "imdb", "cifar10", "CSV", "parquet")


def test_hub_fallback_failure_names_both_places(offline_hub, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatamanipError) as excinfo:
        load_source("sst2", data_dir=empty)
    assert_fix_message(
        excinfo,
        str(empty / "sst2" / "train.parquet"),
        "stanfordnlp/sst2",
        "datamanip data download sst2 --to DIR",
        "--data-dir DIR",
        "DATAMANIP_DATA_DIR=DIR",
    )


@pytest.fixture
def fake_hub(monkeypatch, make_sst2_frame):
    """Stands in for ``datasets.load_dataset``: a tiny sst2 whose test split is unlabelled."""
    import datasets

    frames = {
        "train": make_sst2_frame(30),
        "validation": make_sst2_frame(6),
        "test": make_sst2_frame(4, labelled=False),
    }
    fake = datasets.DatasetDict(
        {split: datasets.Dataset.from_pandas(frame) for split, frame in frames.items()}
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id: fake)
    return frames


def test_hub_copy_is_read_when_there_is_no_mirror(fake_hub, tmp_path):
    source = load_source("sst2", data_dir=tmp_path)
    assert source.origin == "hub stanfordnlp/sst2"
    assert source.unlabelled_splits == {"test"}
    assert source.splits["train"].ids.tolist() == fake_hub["train"]["idx"].tolist()


def test_download_writes_a_mirror_that_loads(fake_hub, tmp_path):
    folder = download_dataset("sst2", tmp_path)
    assert folder == tmp_path / "sst2"
    assert sorted(path.name for path in folder.iterdir()) == [
        "test.parquet",
        "train.parquet",
        "validation.parquet",
    ]
    source = load_source("sst2", data_dir=tmp_path)
    assert source.origin == f"mirror {folder}"
    assert len(source.splits["train"]) == 60


def test_download_unknown_name(tmp_path):
    with pytest.raises(DatamanipError) as excinfo:
        download_dataset("no-such-set", tmp_path)
    assert_fix_message(excinfo, "no-such-set", "sst2")


def test_unlabelled_test_split_falls_back_to_validation(
    tmp_path, tiny_sst2_frames, make_sst2_frame
):
    tiny_sst2_frames["test"] = make_sst2_frame(5, labelled=False)  # like the hub's sst2 test
    write_mirror(tiny_sst2_frames, tmp_path, "sst2")
    source = load_source("sst2", data_dir=tmp_path)
    assert source.unlabelled_splits == {"test"}

    subsets = build_subsets(source, per_class=10, val_per_class=5)
    assert subsets.test_split == "validation"
    assert len(subsets.test) == len(tiny_sst2_frames["validation"])
    assert any("test split of sst2 has no labels" in note for note in subsets.notes)


def test_out_of_range_label_in_named_dataset(tmp_path, tiny_sst2_frames):
    tiny_sst2_frames["train"].loc[7, "label"] = 2
    write_mirror(tiny_sst2_frames, tmp_path, "sst2")
    with pytest.raises(DatamanipError) as excinfo:
        load_source("sst2", data_dir=tmp_path)
    assert_fix_message(excinfo, "labels out of range", "train.parquet", "id 7", "0..1")


def test_duplicate_idx_in_a_split_is_rejected(tmp_path, tiny_sst2_frames):
    tiny_sst2_frames["train"].loc[9, "idx"] = 4  # the same id twice in the train split
    write_mirror(tiny_sst2_frames, tmp_path, "sst2")
    with pytest.raises(DatamanipError) as excinfo:
        load_source("sst2", data_dir=tmp_path)
    assert_fix_message(excinfo, "id 4", "train split", "train.parquet", "unique within a split")


def test_ids_may_repeat_across_splits(tiny_sst2):
    # The tiny mirror numbers every split from 0, as the hub does.
    assert set(tiny_sst2.splits["train"].ids) & set(tiny_sst2.splits["test"].ids)


# --- local data ----------------------------------------------------------------------------------


def local_frame(per_class: int = 20, num_labels: int = 2) -> pd.DataFrame:
    texts = [f"example {i} of class {i % num_labels}" for i in range(per_class * num_labels)]
    labels = [i % num_labels for i in range(per_class * num_labels)]
    return pd.DataFrame({"text": texts, "label": labels})


def test_local_csv_file(tmp_path):
    path = tmp_path / "reviews.csv"
    local_frame().to_csv(path, index=False)
    source = load_source(path)
    assert (source.name, source.kind, source.num_labels) == ("reviews", "text", 2)
    assert source.origin == f"file {path}"
    assert list(source.splits) == ["train"]
    assert source.splits["train"].ids.tolist() == list(range(40))  # no idx column: row numbers


def test_local_jsonl_file_with_sentence_column(tmp_path):
    path = tmp_path / "reviews.jsonl"
    local_frame().rename(columns={"text": "sentence"}).to_json(path, orient="records", lines=True)
    source = load_source(str(path))
    assert counts(source.splits["train"]) == {0: 20, 1: 20}


def test_local_parquet_file_with_named_columns(tmp_path):
    path = tmp_path / "reviews.parquet"
    frame = local_frame(num_labels=3).rename(columns={"text": "review", "label": "stars"})
    frame.to_parquet(path)
    source = load_source(path, text_column="review", label_column="stars")
    assert source.num_labels == 3


def test_local_folder_of_splits(tmp_path):
    folder = tmp_path / "mydata"
    folder.mkdir()
    local_frame().to_csv(folder / "train.csv", index=False)
    local_frame(per_class=5).to_json(folder / "test.jsonl", orient="records", lines=True)
    (folder / "README.md").write_text("not a split")
    source = load_source(folder)
    assert source.origin == f"folder {folder}"
    assert set(source.splits) == {"train", "test"}

    subsets = build_subsets(source, per_class=8, val_per_class=4)
    assert subsets.test_split == "test" and len(subsets.test) == 10


def test_single_file_tests_on_train_remainder(tmp_path):
    path = tmp_path / "reviews.csv"
    local_frame().to_csv(path, index=False)
    subsets = build_subsets(load_source(path), per_class=8, val_per_class=4)
    assert subsets.test_split == "train-remainder"
    assert counts(subsets.test) == {0: 8, 1: 8}
    used = set(subsets.train.ids) | set(subsets.val.ids)
    assert used.isdisjoint(subsets.test.ids)
    assert any("train examples outside" in note for note in subsets.notes)


def test_missing_text_column(tmp_path):
    path = tmp_path / "reviews.csv"
    local_frame().rename(columns={"text": "body"}).to_csv(path, index=False)
    with pytest.raises(DatamanipError) as excinfo:
        load_source(path)
    assert_fix_message(excinfo, str(path), "'text'", "'body'", "'label'", "--text-column")


def test_missing_label_column(tmp_path):
    path = tmp_path / "reviews.csv"
    local_frame().to_csv(path, index=False)
    with pytest.raises(DatamanipError) as excinfo:
        load_source(path, label_column="stars")
    assert_fix_message(excinfo, str(path), "'stars'", "'text'", "--label-column")


@pytest.mark.parametrize("bad_label", ["pos", 0.5, None])
def test_non_integer_labels(tmp_path, bad_label):
    frame = local_frame().astype({"label": object})
    frame.loc[3, "label"] = bad_label
    path = tmp_path / "reviews.jsonl"
    frame.to_json(path, orient="records", lines=True)
    with pytest.raises(DatamanipError) as excinfo:
        load_source(path)
    assert_fix_message(excinfo, str(path), "id 3", "integers 0..K-1")


def test_whole_float_labels_are_accepted(tmp_path):
    path = tmp_path / "reviews.csv"
    local_frame().astype({"label": float}).to_csv(path, index=False)
    assert load_source(path).splits["train"].labels.dtype == np.int64


def test_negative_local_label_is_out_of_range(tmp_path):
    frame = local_frame()
    frame.loc[4, "label"] = -3
    path = tmp_path / "reviews.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(DatamanipError) as excinfo:
        load_source(path)
    assert_fix_message(excinfo, "labels out of range", "id 4", "-3")


@pytest.mark.parametrize("bad_label", [-2, -1])
def test_negative_label_beside_labelled_rows_is_out_of_range(tmp_path, bad_label):
    # Only 0 and one negative label: the negative one is the problem, not "one class".
    frame = pd.DataFrame({"text": [f"example {i}" for i in range(6)], "label": [0] * 6})
    frame.loc[2, "label"] = bad_label
    path = tmp_path / "reviews.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(DatamanipError) as excinfo:
        load_source(path)
    message = assert_fix_message(
        excinfo, "labels out of range", str(path), "id 2", f"label {bad_label}", "every row"
    )
    assert "only" not in message


@pytest.mark.parametrize("label", [0, 1])
def test_one_class_is_rejected(tmp_path, label):
    path = tmp_path / "reviews.csv"
    pd.DataFrame({"text": [f"example {i}" for i in range(30)], "label": label}).to_csv(
        path, index=False
    )
    with pytest.raises(DatamanipError) as excinfo:
        load_source(path)
    message = assert_fix_message(
        excinfo, str(path), "only one class", f"(label {label})", "at least two", "--label-column"
    )
    assert "--per-class" not in message


def test_header_only_csv_has_no_rows(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\n")
    with pytest.raises(DatamanipError) as excinfo:
        load_source(path)
    message = assert_fix_message(excinfo, str(path), "has no rows", "add examples")
    assert "NoneType" not in message


def test_empty_split_file_in_a_folder(tmp_path):
    folder = tmp_path / "mydata"
    folder.mkdir()
    local_frame().to_csv(folder / "train.csv", index=False)
    (folder / "test.csv").write_text("text,label\n")
    with pytest.raises(DatamanipError) as excinfo:
        load_source(folder)
    assert_fix_message(excinfo, str(folder / "test.csv"), "has no rows", "test split", "remove it")


def test_text_column_empty_on_every_row(tmp_path):
    path = tmp_path / "reviews.csv"
    local_frame().assign(text="").to_csv(path, index=False)
    with pytest.raises(DatamanipError) as excinfo:
        load_source(path)
    message = assert_fix_message(
        excinfo, str(path), "'text'", "empty on every row", "--text-column"
    )
    assert "NoneType" not in message


@pytest.mark.parametrize("split", ["test", "validation"])
def test_evaluation_split_with_a_class_train_lacks(tmp_path, split):
    folder = tmp_path / "mydata"
    folder.mkdir()
    local_frame().to_csv(folder / "train.csv", index=False)  # labels 0 and 1
    local_frame(per_class=3, num_labels=3).to_csv(folder / f"{split}.csv", index=False)
    with pytest.raises(DatamanipError) as excinfo:
        load_source(folder)
    message = assert_fix_message(
        excinfo,
        f"the {split} split",
        str(folder / f"{split}.csv"),
        "label 2 (id 2)",
        "train split",
        "lacks",
        "fix the labels",
    )
    assert "--per-class" not in message


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
@pytest.mark.parametrize(
    ("labels", "quoted"), [([0.0, 0.5, 1.0], "has 0.5"), ([True, False, True], "has True")]
)
def test_bad_labels_are_quoted_as_plain_values(tmp_path, suffix, labels, quoted):
    frame = pd.DataFrame({"text": ["a", "b", "c"], "label": labels})
    path = tmp_path / f"reviews{suffix}"
    if suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_json(path, orient="records", lines=True)
    with pytest.raises(DatamanipError) as excinfo:
        load_source(path)
    message = assert_fix_message(excinfo, str(path), quoted, "integers 0..K-1")
    assert "np." not in message


def test_duplicate_idx_in_a_local_file(tmp_path):
    path = tmp_path / "reviews.csv"
    local_frame().assign(idx=[100 + i % 30 for i in range(40)]).to_csv(path, index=False)
    with pytest.raises(DatamanipError) as excinfo:
        load_source(path)
    assert_fix_message(excinfo, str(path), "id 100", "train split", "unique", "'idx'")


def test_json_array_is_not_json_lines(tmp_path):
    path = tmp_path / "reviews.json"
    local_frame().to_json(path, orient="records")
    with pytest.raises(DatamanipError) as excinfo:
        load_source(path)
    assert_fix_message(excinfo, str(path), "JSON array", "one object per line")


def test_empty_text_names_the_row(tmp_path):
    frame = local_frame()
    frame.loc[6, "text"] = ""
    path = tmp_path / "reviews.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(DatamanipError) as excinfo:
        load_source(path)
    assert_fix_message(excinfo, str(path), "id 6", "fix or remove")


def test_write_mirror_takes_arrow_tables(tmp_path, make_sst2_frame):
    table = pa.Table.from_pandas(make_sst2_frame(15), preserve_index=False)
    folder = write_mirror({"train": table}, tmp_path, "sst2")
    assert sorted(path.name for path in folder.iterdir()) == ["train.parquet"]
    assert len(load_source("sst2", data_dir=tmp_path).splits["train"]) == 30


# --- subsets ----------------------------------------------------------------------------------


def test_imbalance_sizes(tiny_sst2):
    subsets = build_subsets(tiny_sst2, imbalance=0.05, majority_size=40)
    assert counts(subsets.train) == {0: 2, 1: 40}
    assert counts(subsets.val) == {0: 10, 1: 10}
    assert subsets.test_split == "test" and len(subsets.test) == 24
    summary = json.loads(json.dumps(subsets.summary))  # JSON-able as it is
    assert summary["mode"] == "imbalance"
    assert (summary["minority_label"], summary["majority_label"]) == (0, 1)
    assert summary["train"] == {"0": 2, "1": 40}


def test_minority_label_switch(tiny_sst2):
    subsets = build_subsets(tiny_sst2, imbalance=0.1, majority_size=40, minority_label=1)
    assert counts(subsets.train) == {0: 40, 1: 4}


def test_per_class_sizes(tiny_sst2):
    subsets = build_subsets(tiny_sst2, per_class=20, val_per_class=5)
    assert counts(subsets.train) == {0: 20, 1: 20}
    assert counts(subsets.val) == {0: 5, 1: 5}
    assert subsets.summary["mode"] == "per_class"


def test_full_mode_uses_all_train_but_validation(tiny_sst2):
    subsets = build_subsets(tiny_sst2, val_per_class=10)
    assert counts(subsets.train) == {0: 50, 1: 50}
    assert subsets.summary["mode"] == "full"


def test_train_and_val_are_disjoint(tiny_sst2):
    subsets = build_subsets(tiny_sst2, imbalance=0.5, majority_size=40)
    assert set(subsets.train.ids).isdisjoint(subsets.val.ids)
    assert len(set(subsets.train.ids)) == len(subsets.train)


def test_same_seed_same_subsets_other_seed_other_subsets(tiny_sst2):
    first = build_subsets(tiny_sst2, per_class=10, data_seed=3)
    again = build_subsets(tiny_sst2, per_class=10, data_seed=3)
    other = build_subsets(tiny_sst2, per_class=10, data_seed=4)
    assert first.train.ids.tolist() == again.train.ids.tolist()  # same order too
    assert first.val.ids.tolist() == again.val.ids.tolist()
    assert set(first.train.ids) != set(other.train.ids)
    assert set(first.val.ids) != set(other.val.ids)


def test_subsets_leave_global_random_state_alone(tiny_sst2):
    np.random.seed(0)
    expected = np.random.rand()
    np.random.seed(0)
    build_subsets(tiny_sst2, per_class=10)
    assert np.random.rand() == expected


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, math.nan])
def test_imbalance_outside_unit_interval(tiny_sst2, ratio):
    with pytest.raises(DatamanipError) as excinfo:
        build_subsets(tiny_sst2, imbalance=ratio)
    assert_fix_message(excinfo, "--imbalance", "(0, 1]", "--imbalance 0.05")


def test_too_few_examples(tiny_sst2):
    with pytest.raises(DatamanipError) as excinfo:
        build_subsets(tiny_sst2, per_class=55, val_per_class=10)
    assert_fix_message(
        excinfo, "class 0 has 60 examples", "55 training + 10 validation", "lower", "--per-class"
    )


def test_class_missing_from_train_asks_to_fix_labels(tmp_path):
    path = tmp_path / "gappy.csv"
    local_frame().replace({"label": {1: 2}}).to_csv(path, index=False)  # labels 0 and 2
    with pytest.raises(DatamanipError) as excinfo:
        build_subsets(load_source(path), per_class=5)
    message = assert_fix_message(
        excinfo, "class 1 has no examples", "classes 0, 2 of 0..2", "without gaps", "--classes"
    )
    assert "lower" not in message


def test_imbalance_on_many_classes_needs_classes(tmp_path):
    path = tmp_path / "three.csv"
    local_frame(per_class=30, num_labels=3).to_csv(path, index=False)
    source = load_source(path)
    with pytest.raises(DatamanipError) as excinfo:
        build_subsets(source, imbalance=0.5, majority_size=10)
    assert_fix_message(excinfo, "has 3", "--classes A,B")

    subsets = build_subsets(
        source, imbalance=0.5, majority_size=10, classes=(1, 2), minority_label=2
    )
    assert counts(subsets.train) == {1: 10, 2: 5}
    assert set(subsets.test.labels) <= {1, 2}


def test_minority_must_be_a_kept_class(tiny_sst2):
    with pytest.raises(DatamanipError) as excinfo:
        build_subsets(tiny_sst2, imbalance=0.05, minority_label=3)
    assert_fix_message(excinfo, "--minority-label 3", "--minority-label 0 or 1")


# --- real data (skipped without ../shared/data) -----------------------------------------------


def test_real_sst2_imbalanced(shared_data):
    source = load_source("sst2", data_dir=shared_data)
    subsets = build_subsets(source, imbalance=0.05)
    assert counts(subsets.train) == {0: 50, 1: 1000}
    assert counts(subsets.val) == {0: 10, 1: 10}
    assert set(subsets.train.ids).isdisjoint(subsets.val.ids)
    assert subsets.test_split == "test" and len(subsets.test) == 1821
    assert set(subsets.test.labels) == {0, 1}


def test_real_sst5_low_data(shared_data):
    source = load_source("sst5", data_dir=shared_data)
    subsets = build_subsets(source, per_class=40, val_per_class=2)
    assert len(subsets.train) == 200 and len(subsets.val) == 10
    assert counts(subsets.train) == dict.fromkeys(range(5), 40)
    assert set(subsets.train.ids).isdisjoint(subsets.val.ids)


def test_test_per_class_keeps_a_fixed_subset_and_leaves_train_and_val_alone(tiny_sst2):
    whole = build_subsets(tiny_sst2, per_class=10, val_per_class=5, data_seed=3)
    part = build_subsets(tiny_sst2, per_class=10, val_per_class=5, data_seed=3, test_per_class=4)
    again = build_subsets(tiny_sst2, per_class=10, val_per_class=5, data_seed=3, test_per_class=4)
    other = build_subsets(tiny_sst2, per_class=10, val_per_class=5, data_seed=4, test_per_class=4)
    assert counts(part.test) == {0: 4, 1: 4}
    assert set(part.test.ids) <= set(whole.test.ids)
    assert np.array_equal(part.test.ids, again.test.ids)
    assert not np.array_equal(part.test.ids, other.test.ids)
    assert np.array_equal(part.train.ids, whole.train.ids)
    assert np.array_equal(part.val.ids, whole.val.ids)
    assert part.summary["test_per_class"] == 4 and part.summary["test"] == {"0": 4, "1": 4}
    assert any("on 8 of the" in note for note in part.notes)
    # a class with fewer examples than asked keeps all of them
    assert counts(build_subsets(tiny_sst2, per_class=10, test_per_class=10_000).test) == counts(
        whole.test
    )
    with pytest.raises(DatamanipError) as excinfo:
        build_subsets(tiny_sst2, per_class=10, test_per_class=0)
    assert_fix_message(excinfo, "--test-per-class 0", "integer >= 1")


def test_test_per_class_on_real_imdb(shared_data):
    source = load_source("imdb", data_dir=shared_data)
    subsets = build_subsets(source, per_class=40, val_per_class=5, test_per_class=500)
    assert counts(subsets.test) == {0: 500, 1: 500}
    assert len(source.splits["test"]) == 25_000
