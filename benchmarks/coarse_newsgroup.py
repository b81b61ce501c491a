"""Tasks of 3 to 6 labels for the benchmarks: 20 Newsgroups with its groups merged into the six
top-level subjects of the collection's own hierarchy (computers, recreation, science, for sale,
politics, religion), or into a subset of them. They fill the gap between the 2–4-label tasks
(AG News, IMDB, Rotten Tomatoes) and the 20-label one, where label quotas inside greedy behave
differently.

    python benchmarks/coarse_newsgroup.py --out /tmp/w2d/data6
    python benchmarks/coarse_newsgroup.py --out /tmp/w2d/data6 --subjects Computers,Recreation,Science
    python benchmarks/quality.py --data-dir /tmp/w2d/data6 --datasets newsgroup6,newsgroup3 ...

Writes OUT/newsgroup<n>/{train,test}.parquet and labels.json, n the number of subjects kept (the
rows of DATA_DIR/newsgroup whose subject is kept, texts and splits unchanged, only the labels
change), and links every other dataset of the data directory into OUT, so OUT serves as the data
directory of a whole run (the corpus included). The source data is not copied into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

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


def dataset_name(subjects: Sequence[str]) -> str:
    return f"newsgroup{len(subjects)}"


def write_coarse(source: Path, out: Path, subjects: Sequence[str] = tuple(SUBJECTS)) -> list[int]:
    """OUT/newsgroup<n> from SOURCE/newsgroup, keeping the rows of SUBJECTS (labelled in that
    order), written atomically, and links to SOURCE's other datasets; returns the training rows per
    subject."""
    unknown = sorted(set(subjects) - set(SUBJECTS))
    if unknown or len(subjects) < 2 or len(set(subjects)) != len(subjects):
        names, got = ", ".join(SUBJECTS), ", ".join(subjects)
        raise W2DError(f"--subjects needs two or more distinct names of {names}; got {got}")
    groups = json.loads((source / "newsgroup" / "labels.json").read_text())
    names = [list(SUBJECTS)[subject_of(g)] for g in groups]
    kept = [subjects.index(name) if name in subjects else -1 for name in names]
    mapping = pa.array(kept, pa.int64())  # group -> kept subject, -1 where dropped
    out.mkdir(parents=True, exist_ok=True)
    name = dataset_name(subjects)
    partial, final = out / f".{name}.partial", out / name
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    for split in ("train", "test"):
        table = pq.read_table(source / "newsgroup" / f"{split}.parquet", columns=["text", "label"])
        coarse = pc.take(mapping, table["label"])
        keep = pc.greater_equal(coarse, 0)
        table = table.set_column(1, "label", coarse).filter(keep)
        pq.write_table(table, partial / f"{split}.parquet")
        if split == "train":
            counts = [pc.sum(pc.equal(table["label"], i)).as_py() or 0 for i in range(len(subjects))]
    (partial / "labels.json").write_text(json.dumps(list(subjects)) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    for folder in source.iterdir():
        link = out / folder.name
        if folder.is_dir() and not link.exists():
            link.symlink_to(folder.resolve(), target_is_directory=True)
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="the one holding newsgroup; None: $W2D_DATA_DIR")
    p.add_argument("--out", required=True, help="the data directory to write (newsgroup<n> + links)")
    p.add_argument(
        "--subjects",
        default=",".join(SUBJECTS),
        help="comma-separated subjects to keep, labelled in this order (default: all six)",
    )
    args = p.parse_args()
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()]
    source = data_dir(args.data_dir)
    if source is None or not (source / "newsgroup" / "labels.json").exists():
        raise W2DError(f"no newsgroup dataset in the data directory {source} (--data-dir or $W2D_DATA_DIR)")
    counts = write_coarse(source, Path(args.out), subjects)
    print(f"wrote {Path(args.out) / dataset_name(subjects)}; training rows per subject:")
    for subject, count in zip(subjects, counts, strict=True):
        print(f"  {subject:<11} {count}")


if __name__ == "__main__":
    exit_on_error(main)
