"""benchmarks/gpu_check.py at tiny sizes on the CPU: every section runs and writes strict JSON."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from weights2data.store import read_json

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_small_runs_on_cpu(
    tmp_path: Path, fresh_cache: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("W2D_DATA_DIR", str(data_dir))
    monkeypatch.setenv("W2D_CACHE_DIR", str(fresh_cache))
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # its dataclass looks itself up there
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "check.json"
    assert gpu_check.main(["--small", "--device", "cpu", "--out", str(out)]) == 0
    results = read_json(out)
    assert results["complete"] and results["args"]["small"]
    assert [row["dtype"] for row in results["throughput"]] == ["float32", "bfloat16"]
    assert results["engine"]["engine"] == "float32 step" and results["engine"]["stream_bytes_per_pick"] > 0
    assert [row["model"] for row in results["quality"]["table"]] == ["expert", "greedy", "random"]
