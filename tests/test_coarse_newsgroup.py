"""benchmarks/coarse_newsgroup.py on the real 20 Newsgroups: six subjects or a subset, a usable data dir."""

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from weights2data.data import load_dataset
from weights2data.errors import W2DError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import coarse_newsgroup  # noqa: E402


def subject_per_group(data_dir: Path) -> list[str]:
    """The subject name of each 20 Newsgroups label, in label order."""
    groups = json.loads((data_dir / "newsgroup" / "labels.json").read_text())
    return [list(coarse_newsgroup.SUBJECTS)[coarse_newsgroup.subject_of(g)] for g in groups]


def test_every_group_maps_to_its_subject_and_the_output_serves_as_a_data_dir(
    data_dir: Path, tmp_path: Path
) -> None:
    subjects = subject_per_group(data_dir)
    assert subjects.count("Computers") == 5 and subjects.count("Forsale") == 1
    groups = json.loads((data_dir / "newsgroup" / "labels.json").read_text())
    assert subjects[groups.index("talk.religion.misc")] == "Religion"
    assert subjects[groups.index("talk.politics.guns")] == "Politics"

    out = tmp_path / "data6"
    coarse_newsgroup.write_coarse(data_dir, out)
    coarse_newsgroup.write_coarse(data_dir, out)  # rerunning replaces it
    fine = load_dataset("newsgroup", data_dir=data_dir)
    six = load_dataset("newsgroup6", data_dir=out)
    assert six.label_names == list(coarse_newsgroup.SUBJECTS)
    assert six.train.texts == fine.train.texts and six.test.texts == fine.test.texts
    assert [subjects[g] for g in fine.train.labels] == [six.label_names[c] for c in six.train.labels]
    assert len(load_dataset("wiki_passages_10", data_dir=out).train) == 10
    assert not list(out.glob(".*"))  # no partial folder left


def test_a_subset_of_subjects_keeps_only_their_rows_labelled_in_the_given_order(
    data_dir: Path, tmp_path: Path
) -> None:
    subjects = subject_per_group(data_dir)
    kept = ("Science", "Computers", "Religion")
    name, counts = coarse_newsgroup.write_coarse(data_dir, tmp_path, kept)
    assert name == "newsgroup3"
    fine = load_dataset("newsgroup", data_dir=data_dir)
    three = load_dataset("newsgroup3", data_dir=tmp_path)
    assert three.label_names == list(kept)
    pairs = zip(fine.test.texts, fine.test.labels, strict=True)
    expected = [(text, kept.index(subjects[g])) for text, g in pairs if subjects[g] in kept]
    assert list(zip(three.test.texts, three.test.labels, strict=True)) == expected
    written = pq.read_table(tmp_path / "newsgroup3" / "train.parquet")["label"].to_pylist()
    assert counts == [written.count(label) for label in range(3)]
    source = pq.read_table(data_dir / "newsgroup" / "train.parquet")["label"].to_pylist()
    assert counts == [sum(subjects[g] == s for g in source) for s in kept]
    for bad in (("Science",), ("Science", "Sport"), ("Science", "Science")):
        with pytest.raises(W2DError, match="--subjects"):
            coarse_newsgroup.write_coarse(data_dir, tmp_path, bad)
    with pytest.raises(W2DError, match="would replace the source"):
        coarse_newsgroup.write_coarse(data_dir, tmp_path, kept, "newsgroup")
    named, _ = coarse_newsgroup.write_coarse(data_dir, tmp_path, ("Politics", "Religion"), "ng_talk")
    assert load_dataset(named, data_dir=tmp_path).label_names == ["Politics", "Religion"]
