"""data: the real data directory, local files, concatenation, verbalizers and tokenisation."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from weights2data.data import (
    encode_classification,
    encode_lm,
    load_dataset,
    make_label_set,
    split_size_suffix,
)
from weights2data.errors import W2DError

AG_NAMES = ["World", "Sports", "Business", "Sci/Tech"]


# ---------------------------------------------------------------- the data directory


def test_ag_news_sizes_and_label_names(data_dir: Path) -> None:
    ds = load_dataset("ag_news", data_dir=data_dir)
    assert (len(ds.train), len(ds.test)) == (13411, 7600)
    assert ds.validation is None
    assert ds.label_names == AG_NAMES and ds.num_labels == 4 and ds.has_labels
    assert ds.train.labels.dtype == np.int64
    assert set(np.unique(ds.train.labels)) == {0, 1, 2, 3}
    assert np.bincount(ds.test.labels).tolist() == [1900] * 4
    assert all(isinstance(t, str) and t.strip() for t in ds.train.texts[:100])


def test_ag_news_n_subsets_are_seeded(data_dir: Path) -> None:
    full = load_dataset("ag_news", data_dir=data_dir)
    a = load_dataset("ag_news_1000", data_dir=data_dir, seed=0)
    b = load_dataset("ag_news_1000", data_dir=str(data_dir), seed=0)  # a str directory is fine too
    c = load_dataset("ag_news_1000", data_dir=data_dir, seed=1)
    assert a.name == "ag_news_1000"
    assert len(a.train) == 1000 and len(a.test) == 7600  # the test split stays whole
    assert a.label_names == AG_NAMES
    assert a.train.texts == b.train.texts and np.array_equal(a.train.labels, b.train.labels)
    assert a.train.fingerprint == b.train.fingerprint
    assert a.train.texts != c.train.texts and a.train.fingerprint != c.train.fingerprint
    # the rows are real training rows, labels kept with their texts
    lookup = dict(zip(full.train.texts, full.train.labels.tolist(), strict=True))
    assert all(lookup[t] == y for t, y in zip(a.train.texts, a.train.labels.tolist(), strict=True))
    assert len(set(a.train.texts)) == 1000


def test_rotten_tomatoes_has_a_validation_split(data_dir: Path) -> None:
    ds = load_dataset("rotten_tomatoes", data_dir=data_dir)
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (8530, 1066, 1066)
    assert ds.validation.labels is not None and ds.num_labels == 2


def test_wiki_passages_is_unlabelled(data_dir: Path) -> None:
    ds = load_dataset("wiki_passages_500", data_dir=data_dir)
    assert len(ds.train) == 500
    assert ds.train.labels is None and ds.label_names is None and not ds.has_labels
    assert ds.test is not None and ds.test.labels is None


def test_concatenation_drops_labels_when_label_sets_differ(data_dir: Path) -> None:
    ag = load_dataset("ag_news_100", data_dir=data_dir)
    wiki = load_dataset("wiki_passages_100", data_dir=data_dir)
    ds = load_dataset("ag_news_100 wiki_passages_100", data_dir=data_dir)
    assert ds.name == "ag_news_100 wiki_passages_100"
    assert len(ds.train) == 200
    assert ds.train.texts == ag.train.texts + wiki.train.texts
    assert ds.train.labels is None and ds.label_names is None and not ds.has_labels


def test_concatenation_keeps_labels_when_label_sets_agree(data_dir: Path) -> None:
    ds = load_dataset("ag_news_10  ag_news_20", data_dir=data_dir)
    assert len(ds.train) == 30 and ds.label_names == AG_NAMES
    assert ds.train.labels.shape == (30,)


def test_newsgroup_drops_empty_texts(data_dir: Path) -> None:
    ds = load_dataset("newsgroup", data_dir=data_dir)
    raw = pq.read_table(data_dir / "newsgroup" / "train.parquet").column("text").to_pylist()
    nonempty = [t for t in raw if t and t.strip()]
    assert len(nonempty) < len(raw)  # the file does hold empty texts
    assert ds.train.texts == nonempty
    assert len(ds.train.labels) == len(nonempty)
    assert ds.num_labels == 20


def test_unknown_name_lists_the_known_ones(data_dir: Path) -> None:
    with pytest.raises(W2DError) as err:
        load_dataset("agnews", data_dir=data_dir)
    message = str(err.value)
    assert "unknown dataset 'agnews'" in message
    for name in ("ag_news", "wiki_passages", "imdb", "dbpedia"):
        assert name in message


def test_n_larger_than_the_dataset(data_dir: Path) -> None:
    with pytest.raises(W2DError, match="asked for 99999 rows.*8530"):
        load_dataset("rotten_tomatoes_99999", data_dir=data_dir)
    with pytest.raises(W2DError, match="at least 1"):
        load_dataset("rotten_tomatoes_0", data_dir=data_dir)


def test_empty_spec() -> None:
    with pytest.raises(W2DError, match="empty"):
        load_dataset("   ")


@pytest.mark.usefixtures("hub_offline")
def test_seed_name_missing_from_the_data_dir_fails_fast_offline(data_dir: Path) -> None:
    started = time.monotonic()
    with pytest.raises(W2DError, match="dbpedia.*not in the data directory"):
        load_dataset("dbpedia_100", data_dir=data_dir)
    assert time.monotonic() - started < 10


def test_size_suffix() -> None:
    assert split_size_suffix("ag_news_1000") == ("ag_news", 1000)
    assert split_size_suffix("ag_news") == ("ag_news", None)
    assert split_size_suffix("wiki_passages_5") == ("wiki_passages", 5)


def test_data_dir_folder_whose_name_ends_in_digits(tmp_path: Path) -> None:
    folder = tmp_path / "mnist_10"
    folder.mkdir()
    pq.write_table(pa.table({"text": ["a", "b", "c"]}), folder / "train.parquet")
    assert len(load_dataset("mnist_10", data_dir=tmp_path).train) == 3
    assert len(load_dataset("mnist_10_2", data_dir=tmp_path).train) == 2


# ---------------------------------------------------------------- local files


def test_local_csv_with_custom_columns(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text('body,y,other\n"great, film",1,x\nawful,0,y\nfine,1,z\n')
    ds = load_dataset(str(path), text_column="body", label_column="y")
    assert ds.name == "reviews"
    assert ds.train.texts == ["great, film", "awful", "fine"]
    assert ds.train.labels.tolist() == [1, 0, 1]
    assert ds.label_names == ["0", "1"] and ds.test is None


def test_local_jsonl_with_string_labels(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    rows = [
        {"content": "good", "sentiment": "pos"},
        {"content": "bad", "sentiment": "neg"},
        {"content": "ok", "sentiment": "pos"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_dataset(str(path), text_column="content", label_column="sentiment")
    assert ds.label_names == ["neg", "pos"]
    assert ds.train.labels.tolist() == [1, 0, 1]


def test_local_string_labels_follow_labels_json(tmp_path: Path) -> None:
    pq.write_table(
        pa.table({"text": ["a", "b", "c"], "label": ["zebra", "ant", "zebra"]}), tmp_path / "train.parquet"
    )
    (tmp_path / "labels.json").write_text('["zebra", "ant"]')
    ds = load_dataset(str(tmp_path))
    assert ds.label_names == ["zebra", "ant"] and ds.train.labels.tolist() == [0, 1, 0]
    (tmp_path / "labels.json").write_text('["zebra", "bee"]')
    with pytest.raises(W2DError, match="not in the label set"):
        load_dataset(str(tmp_path))


def test_local_parquet_folder_with_splits(tmp_path: Path) -> None:
    pq.write_table(
        pa.table({"text": ["a", "b", "c", "d"], "label": [0, 1, 2, 0]}), tmp_path / "train.parquet"
    )
    pq.write_table(pa.table({"text": ["e", "f"], "label": [1, 2]}), tmp_path / "test.parquet")
    ds = load_dataset(str(tmp_path))
    assert len(ds.train) == 4 and len(ds.test) == 2
    assert ds.label_names == ["0", "1", "2"]
    assert ds.test.labels.tolist() == [1, 2]


def test_local_unlabelled_file(tmp_path: Path) -> None:
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": ["one", "two", "  ", "three"]}), path)
    ds = load_dataset(str(path))
    assert ds.train.texts == ["one", "two", "three"] and not ds.has_labels


def test_missing_text_column_names_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("sentence,label\nhello,0\n")
    with pytest.raises(W2DError, match="no text column 'text'.*sentence.*--text-column"):
        load_dataset(str(path))


def test_label_ids_out_of_range(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 5]}), tmp_path / "train.parquet")
    (tmp_path / "labels.json").write_text('["x", "y"]')
    with pytest.raises(W2DError, match="label ids must lie in 0..1"):
        load_dataset(str(tmp_path))


def test_missing_label_values(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": null}\n')
    with pytest.raises(W2DError, match="missing values"):
        load_dataset(str(path))


def test_unreadable_parquet(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"\x00\xffPAR1 this is not parquet" * 10)
    with pytest.raises(W2DError, match="could not read"):
        load_dataset(str(path))


def test_truncated_parquet(tmp_path: Path, data_dir: Path) -> None:
    path = tmp_path / "train.parquet"
    path.write_bytes((data_dir / "rotten_tomatoes" / "train.parquet").read_bytes()[:5000])
    with pytest.raises(W2DError, match="could not read"):
        load_dataset(str(path))


def test_garbage_csv_and_jsonl(tmp_path: Path) -> None:
    csv, jsonl = tmp_path / "x.csv", tmp_path / "x.jsonl"
    csv.write_bytes(b"text\n\xff\xfe\xfa bad utf8\n")
    jsonl.write_text('{"text": "a"}\n{not json\n')
    for path in (csv, jsonl):
        with pytest.raises(W2DError):
            load_dataset(str(path))


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("hello\n")
    with pytest.raises(W2DError, match="unsupported file type"):
        load_dataset(str(path))


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.csv", ""),
        ("header.csv", "text,label\n"),
        ("blank.csv", 'text\n" "\n"  "\n'),
        ("empty.jsonl", ""),
    ],
)
def test_empty_files(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(W2DError):
        load_dataset(str(path))


def test_folder_without_train_split(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "test.parquet")
    with pytest.raises(W2DError, match="no train split"):
        load_dataset(str(tmp_path))


# ---------------------------------------------------------------- verbalizers


def test_letters_are_single_tokens(tokenizer) -> None:
    labels = make_label_set(AG_NAMES, tokenizer, "letters")
    assert labels.tokens == [" A", " B", " C", " D"]
    assert labels.names == AG_NAMES
    assert [tokenizer.encode(t, add_special_tokens=False) for t in labels.tokens] == [
        [i] for i in labels.token_ids
    ]
    assert len(set(labels.token_ids)) == 4
    assert type(labels).from_dict(labels.to_dict()) == labels


def test_names_for_ag_news_fail_on_multi_token_names(tokenizer) -> None:
    with pytest.raises(W2DError, match="single token") as err:
        make_label_set(AG_NAMES, tokenizer, "names")
    assert "Sci/Tech" in str(err.value)


def test_names_for_imdb_work(tokenizer, data_dir: Path) -> None:
    names = json.loads((data_dir / "imdb" / "labels.json").read_text())
    labels = make_label_set(names, tokenizer, "names")
    assert labels.tokens == [" neg", " pos"]
    assert labels.token_ids == [
        tokenizer.encode(" neg", add_special_tokens=False)[0],
        tokenizer.encode(" pos", add_special_tokens=False)[0],
    ]


def test_explicit_list(tokenizer) -> None:
    labels = make_label_set(["negative", "positive"], tokenizer, "no, yes")
    assert labels.tokens == [" no", " yes"] and labels.names == ["negative", "positive"]


@pytest.mark.parametrize(
    ("verbalizer", "match"),
    [
        ("A,B,C", "lists 3 tokens but the dataset has 4"),
        ("A,B,C,A", "share"),
        ("A,B,C,Sci/Tech", "single token"),
        ("A,B,,D", "empty"),
    ],
)
def test_bad_explicit_lists(tokenizer, verbalizer: str, match: str) -> None:
    with pytest.raises(W2DError, match=match):
        make_label_set(AG_NAMES, tokenizer, verbalizer)


def test_letters_need_at_most_26_labels(tokenizer) -> None:
    assert len(make_label_set([str(i) for i in range(26)], tokenizer).token_ids) == 26
    with pytest.raises(W2DError, match="27 labels"):
        make_label_set([str(i) for i in range(27)], tokenizer, "letters")


# ---------------------------------------------------------------- tokenisation


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_classification_left_truncation_keeps_the_end(tokenizer) -> None:
    text = " ".join(f"word{i}" for i in range(50)) + " the very end"
    ids = _ids(tokenizer, text)
    enc = encode_classification(tokenizer, [text], seq_len=8)
    assert enc.input_ids.shape == (1, 7)
    assert enc.input_ids[0].tolist() == ids[-7:]
    assert enc.attention_mask.tolist() == [[1] * 7]
    assert tokenizer.decode(enc.input_ids[0]).endswith("the very end")


def test_classification_left_padding(tokenizer) -> None:
    short, longer = "Hi there", "A somewhat longer sentence here"
    enc = encode_classification(tokenizer, [short, longer], seq_len=12)
    n_short, n_long = len(_ids(tokenizer, short)), len(_ids(tokenizer, longer))
    assert enc.input_ids.shape == (2, 11)
    row, mask = enc.input_ids[0].tolist(), enc.attention_mask[0].tolist()
    assert mask == [0] * (11 - n_short) + [1] * n_short
    assert row[: 11 - n_short] == [tokenizer.pad_token_id] * (11 - n_short)
    assert row[11 - n_short :] == _ids(tokenizer, short)
    assert enc.attention_mask[1].sum() == n_long


def test_position_ids_skip_left_padding(tokenizer) -> None:
    enc = encode_classification(tokenizer, ["Hi", "one two three four five six"], seq_len=10)
    n = int(enc.attention_mask[0].sum())
    assert enc.position_ids[0, -n:].tolist() == list(range(n))
    assert enc.position_ids[0, :-n].tolist() == [0] * (9 - n)
    assert enc.position_ids[1, -1] == enc.attention_mask[1].sum() - 1
    # a text's positions do not depend on how much padding it gets
    wide = encode_classification(tokenizer, ["Hi"], seq_len=30)
    assert wide.position_ids[0, -n:].tolist() == list(range(n))


def test_seq_len_two_keeps_one_context_token(tokenizer) -> None:
    enc = encode_classification(tokenizer, ["The quick brown fox"], seq_len=2)
    assert enc.input_ids.tolist() == [[_ids(tokenizer, "The quick brown fox")[-1]]]
    assert enc.attention_mask.tolist() == [[1]] and enc.position_ids.tolist() == [[0]]
    with pytest.raises(W2DError, match="at least 2"):
        encode_classification(tokenizer, ["x"], seq_len=1)
    with pytest.raises(W2DError, match="at least 2"):
        encode_lm(tokenizer, ["x"], seq_len=1)


def test_lm_encoding_keeps_the_start_and_right_pads(tokenizer) -> None:
    long_text = "the very start " + " ".join(f"w{i}" for i in range(60))
    enc = encode_lm(tokenizer, [long_text, "Hi"], seq_len=9)
    assert enc.input_ids.shape == (2, 9)
    assert enc.input_ids[0].tolist() == _ids(tokenizer, long_text)[:9]
    assert tokenizer.decode(enc.input_ids[0]).startswith("the very start")
    n = len(_ids(tokenizer, "Hi"))
    assert enc.attention_mask[1].tolist() == [1] * n + [0] * (9 - n)
    assert enc.input_ids[1, n:].tolist() == [tokenizer.pad_token_id] * (9 - n)
    assert enc.position_ids[1, :n].tolist() == list(range(n))
    assert enc.subset(torch.tensor([1])).input_ids.shape == (1, 9)
