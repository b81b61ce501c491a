"""Tasks of 3 to 6 labels for the benchmarks: 20 Newsgroups with its groups merged into the six
top-level subjects of the collection's own hierarchy (computers, recreation, science, for sale,
politics, religion), or into a subset of them. They fill the gap between the 2–4-label tasks
(AG News, IMDB, Rotten Tomatoes) and the 20-label one, where label quotas inside greedy behave
differently.

    python benchmarks/coarse_newsgroup.py --out /tmp/w2d/data6
    python benchmarks/coarse_newsgroup.py --out /tmp/w2d/data6 --subjects Computers,Recreation,Science
    python benchmarks/quality.py --data-dir /tmp/w2d/data6 --datasets newsgroup6,newsgroup3 ...

Writes OUT/NAME/{train,test}.parquet and labels.json (NAME: --name, default newsgroup<n> with n the
number of subjects kept; the rows of DATA_DIR/newsgroup whose subject is kept, texts and splits
unchanged, only the labels change), and links every other dataset of the data directory into OUT,
so OUT serves as the data directory of a whole run (the corpus included). The source data is not
copied into the repository.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from label_subset import add_output_flags, check_kept, report, write_relabelled
from weights2data.data import data_dir
from weights2data.errors import W2DError, exit_on_error

SUBJECTS = {  # subject: the 20 Newsgroups prefixes merged into it
    "Computers": ("comp.",),
    "Recreation": ("rec.",),
    "Science": ("sci.",),
    "Forsale": ("misc.forsale",),
    "Politics": ("talk.politics.",),
    "Religion": ("alt.atheism", "soc.religion.", "talk.religion."),
}


def subject_of(group: str) -> int:
    """The index in SUBJECTS of a 20 Newsgroups group name."""
    for index, prefixes in enumerate(SUBJECTS.values()):
        if group.startswith(prefixes):
            return index
    raise W2DError(f"newsgroup {group!r} belongs to none of the six subjects")


def write_coarse(
    source: Path, out: Path, subjects: Sequence[str] = tuple(SUBJECTS), name: str | None = None
) -> tuple[str, list[int]]:
    """OUT/NAME (default newsgroup<n>) from SOURCE/newsgroup, keeping the rows of SUBJECTS
    (labelled in that order), written atomically, and links to SOURCE's other datasets; returns
    NAME and the training rows per subject."""
    check_kept(subjects, list(SUBJECTS), "--subjects")
    groups = json.loads((source / "newsgroup" / "labels.json").read_text())
    subject_per_group = [list(SUBJECTS)[subject_of(g)] for g in groups]
    name = name or f"newsgroup{len(subjects)}"
    return name, write_relabelled(source, out, "newsgroup", name, subject_per_group, subjects)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="the one holding newsgroup; None: $W2D_DATA_DIR")
    p.add_argument(
        "--subjects",
        default=",".join(SUBJECTS),
        help="comma-separated subjects to keep, labelled in this order (default: all six)",
    )
    add_output_flags(p, "newsgroup<n>")
    args = p.parse_args()
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()]
    source = data_dir(args.data_dir)
    if source is None or not (source / "newsgroup" / "labels.json").exists():
        raise W2DError(f"no newsgroup dataset in the data directory {source} (--data-dir or $W2D_DATA_DIR)")
    name, counts = write_coarse(source, Path(args.out), subjects, args.name)
    report(Path(args.out), name, "newsgroup", subjects, counts, args.record)


if __name__ == "__main__":
    exit_on_error(main)
