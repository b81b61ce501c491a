import subprocess
import sys
from pathlib import Path

import pytest

from weights2data.errors import W2DError, exit_on_error

REPO = Path(__file__).resolve().parents[1]


def test_exit_on_error_prints_the_message_and_exits_2(capsys):
    def main() -> int:
        raise W2DError("the corpus is empty")

    with pytest.raises(SystemExit) as exit_info:
        exit_on_error(main)
    assert exit_info.value.code == 2
    assert "error: the corpus is empty" in capsys.readouterr().err


def test_exit_on_error_passes_the_status_through():
    with pytest.raises(SystemExit) as exit_info:
        exit_on_error(lambda: 3)
    assert exit_info.value.code == 3


def test_a_benchmark_without_its_data_says_so_without_a_traceback(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "W2D_CACHE_DIR": str(tmp_path / "cache")}
    args = "--model tiny-test --datasets ag_news --scopes head --ks 10 --seeds 0".split()
    command = [sys.executable, "benchmarks/quality.py", *args, "--out", str(tmp_path / "q.json")]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "quality.py: error: dataset 'ag_news' is not in the data directory" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "q.json").exists()
