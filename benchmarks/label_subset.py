"""Tasks with fewer labels cut from a dataset of the data directory: the rows of DATASET whose label
is one of LABELS, relabelled in the given order. They fill in label counts the datasets lack (3 or 10) and
give a count more than one source (e.g. AG News without one of its four classes beside 20
Newsgroups).

    python benchmarks/label_subset.py --out /tmp/w2d/data6 --dataset ag_news --labels World,Sports,Business
    python benchmarks/label_subset.py ... --record benchmarks/results/task_ag_news3.json  # the counts as JSON
    python benchmarks/quality.py --data-dir /tmp/w2d/data6 --datasets ag_news3 ...

Writes OUT/NAME/{train,test}.parquet and labels.json (NAME: --name, default DATASET<n> with n the
number of labels kept; texts and splits unchanged, only the labels change) and links every other
dataset of the data directory into OUT, so OUT serves as the data directory of a whole run (the
corpus included). The source data is not copied into the repository.
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
from weights2data.store import write_json


def write_relabelled(
    source: Path, out: Path, dataset: str, name: str, named: Sequence[str], labels: Sequence[str]
) -> list[int]:
    """OUT/NAME from SOURCE/DATASET, a row of label l kept where named[l] is one of LABELS and
    relabelled by its index there, written atomically, with links to SOURCE's other datasets;
    returns the training rows per new label."""
    if name == dataset:
        raise W2DError(f"--name {name!r} would replace the source dataset; choose another")
    new_label = [labels.index(n) if n in labels else -1 for n in named]  # -1: dropped
    mapping = pa.array(new_label, pa.int64())
    out.mkdir(parents=True, exist_ok=True)
    partial, final = out / f".{name}.partial", out / name
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    for split in ("train", "test"):
        table = pq.read_table(source / dataset / f"{split}.parquet", columns=["text", "label"])
        relabelled = pc.take(mapping, table["label"])
        table = table.set_column(1, "label", relabelled).filter(pc.greater_equal(relabelled, 0))
        pq.write_table(table, partial / f"{split}.parquet")
        if split == "train":
            counts = [pc.sum(pc.equal(table["label"], i)).as_py() or 0 for i in range(len(labels))]
    (partial / "labels.json").write_text(json.dumps(list(labels)) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    for folder in source.iterdir():
        link = out / folder.name
        if folder.is_dir() and not link.exists():
            link.symlink_to(folder.resolve(), target_is_directory=True)
    return counts


def check_kept(kept: Sequence[str], known: Sequence[str], flag: str) -> None:
    """A clear error unless KEPT names two or more distinct members of KNOWN."""
    if set(kept) - set(known) or len(kept) < 2 or len(set(kept)) != len(kept):
        names, got = ", ".join(known), ", ".join(kept)
        raise W2DError(f"{flag} needs two or more distinct names of {names}; got {got}")


def write_subset(
    source: Path, out: Path, dataset: str, kept: Sequence[str], name: str | None = None
) -> tuple[str, list[int]]:
    """OUT/NAME holding SOURCE/DATASET's rows whose label is in KEPT, labelled in KEPT's order;
    returns NAME and the training rows per label."""
    labels_file = source / dataset / "labels.json"
    if not labels_file.exists():
        raise W2DError(f"no dataset {dataset!r} with a labels.json in the data directory {source}")
    labels = json.loads(labels_file.read_text())
    check_kept(kept, labels, "--labels")
    name = name or f"{dataset}{len(kept)}"
    return name, write_relabelled(source, out, dataset, name, labels, kept)


def report(
    out: Path, name: str, source: str, kept: Sequence[str], counts: Sequence[int], record: str | None
) -> None:
    """Print the training rows per label and, given RECORD, write them there as JSON (what the
    docs quote about a derived task then comes from a committed file, not from a terminal)."""
    print(f"wrote {out / name}; training rows per label:")
    for label, count in zip(kept, counts, strict=True):
        print(f"  {label:<11} {count}")
    if record:
        per_label = dict(zip(kept, counts, strict=True))
        task = {"dataset": name, "source": source, "labels": list(kept)}
        write_json(record, task | {"train_rows_per_label": per_label, "train_rows": sum(counts)})


def add_output_flags(p: argparse.ArgumentParser, default_name: str) -> None:
    """--out, --name and --record, shared by the scripts that cut tasks."""
    p.add_argument("--out", required=True, help="the data directory to write (NAME + links)")
    p.add_argument("--name", default=None, help=f"the new dataset's name (default: {default_name})")
    p.add_argument("--record", default=None, help="also write the training rows per label to this JSON")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="the one holding DATASET; None: $W2D_DATA_DIR")
    p.add_argument("--dataset", required=True, help="the dataset to cut from (e.g. ag_news)")
    p.add_argument("--labels", required=True, help="comma-separated labels to keep, in this order")
    add_output_flags(p, "DATASET<n>")
    args = p.parse_args()
    kept = [s.strip() for s in args.labels.split(",") if s.strip()]
    source = data_dir(args.data_dir)
    if source is None:
        raise W2DError("no data directory: pass --data-dir or set $W2D_DATA_DIR")
    name, counts = write_subset(source, Path(args.out), args.dataset, kept, args.name)
    report(Path(args.out), name, args.dataset, kept, counts, args.record)


if __name__ == "__main__":
    exit_on_error(main)
