"""A 6-label task for the benchmarks: 20 Newsgroups with its groups merged into the six top-level
subjects of the collection's own hierarchy (computers, recreation, science, for sale, politics,
religion). It fills the gap between the 2–4-label tasks (AG News, IMDB, Rotten Tomatoes) and the
20-label one, where label quotas inside greedy behave differently.

    python benchmarks/coarse_newsgroup.py --out /tmp/w2d/data6
    python benchmarks/quality.py --data-dir /tmp/w2d/data6 --datasets newsgroup6 ...

Writes OUT/newsgroup6/{train,test}.parquet and labels.json (the same rows and texts as
DATA_DIR/newsgroup, only the labels change) and links every other dataset of the data directory
into OUT, so OUT serves as the data directory of a whole run (the corpus included). The source
data is not copied into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from weights2data.data import data_dir
from weights2data.errors import W2DError, exit_on_error

NAME = "newsgroup6"
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


def write_coarse(source: Path, out: Path) -> list[int]:
    """OUT/newsgroup6 from SOURCE/newsgroup, written atomically, and links to SOURCE's other datasets;
    returns the training rows per subject."""
    groups = json.loads((source / "newsgroup" / "labels.json").read_text())
    mapping = pa.array([subject_of(g) for g in groups], pa.int64())
    out.mkdir(parents=True, exist_ok=True)
    partial, final = out / f".{NAME}.partial", out / NAME
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    for split in ("train", "test"):
        table = pq.read_table(source / "newsgroup" / f"{split}.parquet", columns=["text", "label"])
        coarse = pc.take(mapping, table["label"])
        pq.write_table(table.set_column(1, "label", coarse), partial / f"{split}.parquet")
        if split == "train":
            counts = [pc.sum(pc.equal(coarse, i)).as_py() or 0 for i in range(len(SUBJECTS))]
    (partial / "labels.json").write_text(json.dumps(list(SUBJECTS)) + "\n")
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
    p.add_argument("--out", required=True, help="the data directory to write (newsgroup6 + links)")
    args = p.parse_args()
    source = data_dir(args.data_dir)
    if source is None or not (source / "newsgroup" / "labels.json").exists():
        raise W2DError(f"no newsgroup dataset in the data directory {source} (--data-dir or $W2D_DATA_DIR)")
    counts = write_coarse(source, Path(args.out))
    print(f"wrote {Path(args.out) / NAME}; training rows per subject:")
    for subject, count in zip(SUBJECTS, counts, strict=True):
        print(f"  {subject:<11} {count}")


if __name__ == "__main__":
    exit_on_error(main)
