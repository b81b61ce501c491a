"""benchmarks/label_subset.py on the real AG News: the kept labels' rows, relabelled, a usable data dir."""

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from weights2data.data import load_dataset
from weights2data.errors import W2DError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import label_subset  # noqa: E402


def test_kept_labels_keep_their_rows_in_the_given_order_and_the_output_serves_as_a_data_dir(
    data_dir: Path, tmp_path: Path
) -> None:
    kept = ("Sci/Tech", "World", "Sports")
    name, counts = label_subset.write_subset(data_dir, tmp_path, "ag_news", kept)
    assert name == "ag_news3"
    four = load_dataset("ag_news", data_dir=data_dir)
    three = load_dataset("ag_news3", data_dir=tmp_path)
    assert three.label_names == list(kept)
    pairs = zip(four.test.texts, four.test.labels, strict=True)
    names = four.label_names
    expected = [(text, kept.index(names[label])) for text, label in pairs if names[label] in kept]
    assert list(zip(three.test.texts, three.test.labels, strict=True)) == expected
    written = pq.read_table(tmp_path / "ag_news3" / "train.parquet")["label"].to_pylist()
    assert counts == [written.count(label) for label in range(3)]
    assert counts == [sum(names[label] == k for label in four.train.labels) for k in kept]
    assert len(load_dataset("wiki_passages_10", data_dir=tmp_path).train) == 10
    assert not list(tmp_path.glob(".*"))  # no partial folder left

    record = tmp_path / "records" / "task_ag_news3.json"
    label_subset.report(tmp_path, name, "ag_news", kept, counts, str(record))
    assert json.loads(record.read_text()) == {
        "dataset": "ag_news3",
        "source": "ag_news",
        "labels": list(kept),
        "train_rows_per_label": dict(zip(kept, counts, strict=True)),
        "train_rows": sum(counts),
    }

    named, _ = label_subset.write_subset(data_dir, tmp_path, "ag_news", ("Business", "World"), "ag_bw")
    assert load_dataset(named, data_dir=tmp_path).label_names == ["Business", "World"]


def test_bad_labels_or_names_are_clear_errors(data_dir: Path, tmp_path: Path) -> None:
    for bad in (("World",), ("World", "Sport"), ("World", "World")):
        with pytest.raises(W2DError, match="--labels needs two or more distinct names"):
            label_subset.write_subset(data_dir, tmp_path, "ag_news", bad)
    with pytest.raises(W2DError, match="no dataset 'ag_newz'"):
        label_subset.write_subset(data_dir, tmp_path, "ag_newz", ("World", "Sports"))
    with pytest.raises(W2DError, match="would replace the source"):
        label_subset.write_subset(data_dir, tmp_path, "ag_news", ("World", "Sports"), "ag_news")
