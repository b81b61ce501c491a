"""The README's Python example runs as written, on the tiny model and small sizes."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.parquet as pq

README = Path(__file__).resolve().parents[1] / "README.md"
SIZES = re.compile(r"^BASE, TASK, CORPUS, K = .*$", re.MULTILINE)


def python_example() -> str:
    """The first ```python block after the README's "## Python" heading."""
    section = README.read_text().split("\n## Python\n", 1)[1]
    return section.split("```python\n", 1)[1].split("\n```", 1)[0]


def test_python_example_selects_and_scores(cli_env: Path) -> None:
    code = python_example()
    assert SIZES.search(code), "the example's first settings line names BASE, TASK, CORPUS and K"
    code = SIZES.sub('BASE, TASK, CORPUS, K = "tiny-test", "ag_news_64", "wiki_passages_200", 20', code)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)

    recovery, accuracy = scope["recovery"], scope["accuracy"]
    assert len(recovery.texts) == 20 and len(set(recovery.rows.tolist())) == 20
    assert recovery.labels.max() < len(recovery.label_set.names) == 4
    assert pq.read_table(cli_env / "runs" / "from-python" / "selection.parquet").num_rows == 20
    assert set(accuracy) == {"expert", "recovered", "random"}
    assert all(0.0 <= value <= 1.0 for value in accuracy.values())
