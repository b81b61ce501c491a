"""The README's linear probe, measured: its two `w2d` commands, and the base model for reference.

    python benchmarks/probe.py   # 14 min on this 2-core CPU while another benchmark shared it

Runs `w2d finetune ... --train-scope head --exp-name probe`, `w2d evaluate` of that probe and of
the base model, through the CLI in one process, in a scratch folder with a fresh cache (only the
converted base model is reused), so the finetune and the hidden states are computed, not read
back. Each command's wall time includes the imports it triggers, as a shell command's would.
Writes benchmarks/results/probe_cpu.json (--out).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import tempfile
import time
from pathlib import Path

import torch

from weights2data.cli import main as w2d
from weights2data.errors import exit_on_error
from weights2data.store import cache_dir, read_json, write_json

FINETUNE = "finetune --model smollm2-135m --dataset ag_news_1000 --train-scope head --exp-name probe"
EVALUATE = "evaluate --model runs/probe/model --dataset ag_news"
BASE = "evaluate --model smollm2-135m --dataset ag_news"


def run(command: str) -> dict:
    """One `w2d` command (run in a folder of its own): its wall time and the metrics.json it wrote."""
    before = set(Path("runs").glob("*"))
    started = time.time()
    if w2d(shlex.split(command)) != 0:
        raise SystemExit(f"w2d {command} failed")
    wall_s = round(time.time() - started, 1)
    (run_dir,) = set(Path("runs").glob("*")) - before
    return {"command": f"w2d {command}", "wall_s": wall_s, **read_json(run_dir / "metrics.json")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/probe_cpu.json", help="results JSON")
    args = p.parse_args()
    out, home = Path(args.out).resolve(), Path.cwd()
    models = cache_dir() / "models"  # the converted base model: a one-time cost, not the probe's
    models.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "cache").mkdir()
        (Path(scratch) / "cache" / "models").symlink_to(models, target_is_directory=True)
        os.environ["W2D_CACHE_DIR"] = str(Path(scratch) / "cache")
        os.chdir(scratch)
        load = os.getloadavg()[0]
        results = {"finetune": run(FINETUNE), "evaluate": run(EVALUATE), "base": run(BASE)}
        os.chdir(home)
    results["machine"] = {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_before": round(load, 2),  # the CPU may be shared: a busy machine is slower
    }
    write_json(out, results)
    print(f"finetune {results['finetune']['wall_s']} s; accuracy {results['evaluate']['accuracy']:.3f}")
    print(f"written {out}")


if __name__ == "__main__":
    exit_on_error(main)
