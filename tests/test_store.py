"""store: atomic writes, JSON round trips, content hashes, run directories."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from weights2data.errors import W2DError
from weights2data.store import (
    RunDir,
    atomic_dir,
    atomic_path,
    cache_dir,
    hash_texts,
    read_json,
    stable_hash,
    write_json,
)


def test_atomic_path_leaves_nothing_when_the_block_raises(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half written")
        raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_keeps_the_old_file_on_failure_and_replaces_it_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        tmp.write_text("new but broken")
        raise ValueError
    assert target.read_text() == "old"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_writes_honour_the_umask_like_a_plain_open(tmp_path: Path) -> None:
    umask = os.umask(0o022)  # results and checkpoints are shared: not mkstemp's 0600 / mkdtemp's 0700
    try:
        with atomic_path(tmp_path / "results.json") as tmp:
            tmp.write_text("{}")
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755


def test_atomic_dir_leaves_nothing_when_the_block_raises(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "weights.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_keeps_old_contents_on_failure_and_replaces_them_on_success(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("new")
        raise RuntimeError
    assert [p.name for p in target.iterdir()] == ["a.txt"]
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_write_json_read_json_round_trip(tmp_path: Path) -> None:
    obj = {"a": 1, "b": [1.5, "x", None], "c": {"nested": True}}
    write_json(tmp_path / "sub" / "x.json", obj)
    assert read_json(tmp_path / "sub" / "x.json") == obj


def test_write_json_converts_numpy_and_paths(tmp_path: Path) -> None:
    write_json(
        tmp_path / "x.json", {"n": np.int64(3), "f": np.float32(0.5), "arr": np.arange(3), "p": Path("/a/b")}
    )
    assert read_json(tmp_path / "x.json") == {"n": 3, "f": 0.5, "arr": [0, 1, 2], "p": "/a/b"}


def test_write_json_refuses_unserialisable_objects_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        write_json(tmp_path / "x.json", {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_stable_hash_ignores_key_order_but_not_values() -> None:
    a = {"lr": 0.001, "epochs": 3, "nested": {"x": 1, "y": [1, 2]}}
    b = {"nested": {"y": [1, 2], "x": 1}, "epochs": 3, "lr": 0.001}
    assert stable_hash(a) == stable_hash(b)
    assert stable_hash(a) != stable_hash({**a, "lr": 0.002})
    assert stable_hash({**a, "nested": {"x": 1, "y": [2, 1]}}) != stable_hash(a)
    assert len(stable_hash(a)) == 16 and len(stable_hash(a, length=8)) == 8


def test_hash_texts_changes_with_content_boundaries_and_labels() -> None:
    base = hash_texts(["ab", "c"])
    assert hash_texts(["ab", "c"]) == base
    assert hash_texts(["ab", "d"]) != base
    assert hash_texts(["a", "bc"]) != base  # row boundaries count
    assert hash_texts(["c", "ab"]) != base  # order counts
    assert hash_texts(["ab", "c"], np.array([0, 1])) != base
    assert hash_texts(["ab", "c"], np.array([0, 1])) != hash_texts(["ab", "c"], np.array([1, 0]))


def test_cache_dir_order_flag_then_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("W2D_CACHE_DIR", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env" and (tmp_path / "env").is_dir()
    assert cache_dir(tmp_path / "flag") == tmp_path / "flag"


def test_run_dir_writes_config_and_metrics(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, "exp", {"model": "tiny-test"})
    run.write_metrics({"accuracy": np.float64(0.5)})
    assert read_json(tmp_path / "exp" / "config.json") == {"model": "tiny-test"}
    assert read_json(tmp_path / "exp" / "metrics.json") == {"accuracy": 0.5}


def test_a_finished_run_from_before_an_option_existed_is_the_same_run(tmp_path: Path) -> None:
    old = {"model": "m", "select": {"k": 3}}
    RunDir.create(tmp_path, "exp", old).write_metrics({"accuracy": 0.5})
    defaults = {"select": {"k": 10, "new_option": 1.0}}
    same = {"model": "m", "select": {"k": 3, "new_option": 1.0}}
    assert RunDir.create(tmp_path, "exp", same, defaults=defaults).path == tmp_path / "exp"
    RunDir(tmp_path / "exp").write_metrics({"accuracy": 0.5})
    other = {"model": "m", "select": {"k": 3, "new_option": 0.5}}
    with pytest.raises(W2DError, match="holds a finished run"):
        RunDir.create(tmp_path, "exp", other, defaults=defaults)
