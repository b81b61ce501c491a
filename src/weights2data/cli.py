"""The `w2d` command: a thin layer that builds configs from flags / TOML and calls the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from weights2data.config import DataConfig, EvalConfig, FinetuneConfig, RuntimeConfig, check_keys, load_toml, to_dict
from weights2data.errors import W2DError

log = logging.getLogger("weights2data")

SECTIONS = {DataConfig: "data", FinetuneConfig: "finetune", EvalConfig: "eval", RuntimeConfig: "runtime"}
DEMO_MODEL = "smollm2-135m"

DATASET_HELP = """\
datasets: a name from the data directory (--data-dir or $W2D_DATA_DIR, laid out as
<dir>/<name>/{train,validation,test}.parquet + labels.json) or one of the original's
names (ag_news, dbpedia, rotten_tomatoes, imdb, newsgroup, nq, msmarco; fetched from the
hub when reachable); NAME_N keeps N training rows after a seeded shuffle (the test split
stays whole); a local parquet / csv / jsonl file or folder; several separated by spaces
are concatenated, e.g. "ag_news_10000 wiki_passages_10000".
models: smollm2-135m (embedded, the default), tiny-test (a random 2-layer Llama), a local
Hugging Face directory with safetensors weights, or a hub name (gpt2, llama3-1b, ...).
"""


# ---------------------------------------------------------------- flags from dataclasses


def add_config_args(parser: argparse.ArgumentParser, cls: type, aliases: dict[str, list[str]] | None = None,
                    skip: tuple[str, ...] = ()) -> None:
    """One flag per dataclass field (--field-name), with the field's help text and default."""
    group = parser.add_argument_group(f"{SECTIONS.get(cls, cls.__name__)} options")
    for f in fields(cls):
        if f.name in skip:
            continue
        names = ["--" + f.name.replace("_", "-"), *(aliases or {}).get(f.name, [])]
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        dest = f"{cls.__name__}.{f.name}"
        if f.type == "bool":
            group.add_argument(*names, dest=dest, action="store_true", default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(*names, dest=dest, type=_flag_type(f.type), default=argparse.SUPPRESS,
                               metavar=f.name.upper(), help=help_text)


def _flag_type(annotation: str) -> Callable[[str], Any]:
    base = annotation.replace(" | None", "")
    return {"int": int, "float": float}.get(base, str)


def build_config(cls: type, args: argparse.Namespace, toml: dict[str, dict], **overrides: Any) -> Any:
    """Dataclass defaults, then the TOML table, then explicit flags, then forced overrides."""
    section = SECTIONS.get(cls, cls.__name__.lower())
    table = dict(toml.get(section, {}))
    check_keys(table, cls, section)
    prefix = cls.__name__ + "."
    flags = {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)}
    return cls(**{**table, **flags, **overrides})


def read_toml(args: argparse.Namespace) -> dict[str, dict]:
    if not getattr(args, "config", None):
        return {}
    toml = load_toml(args.config)
    unknown = sorted(set(toml) - set(SECTIONS.values()) - {"select", "run"})
    if unknown:
        raise W2DError(f"unknown section(s) in {args.config}: {', '.join(unknown)}")
    return toml


# ---------------------------------------------------------------- subcommands


def cmd_finetune(args: argparse.Namespace) -> int:
    from weights2data.pipeline import Workspace, finetune_cached

    toml = read_toml(args)
    data, ft, rt = (build_config(c, args, toml) for c in (DataConfig, FinetuneConfig, RuntimeConfig))
    run = open_run(rt, "finetune", {"model": args.model, "data": to_dict(data), "finetune": to_dict(ft)})
    ws = Workspace.from_config(rt, data)
    dataset = ws.dataset(data.dataset, data, ft.seed)
    started = time.time()
    path, meta = finetune_cached(ws, args.model, dataset, data, ft)
    metrics = {"model": str(path), "seconds": round(time.time() - started, 1), "train_rows": len(dataset.train),
               "history": meta["history"]}
    link(run / "model", path)
    finish(run, rt, metrics)
    last = meta["history"][-1] if meta["history"] else {}
    print(f"finetuned model: {path}\n  (linked from {run / 'model'}); final train loss "
          f"{last.get('train_loss', float('nan')):.4f} after {sum(h['steps'] for h in meta['history'])} steps")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from weights2data.pipeline import Workspace, task_for_model
    from weights2data.train import evaluate

    toml = read_toml(args)
    data, ev, rt = (build_config(c, args, toml) for c in (DataConfig, EvalConfig, RuntimeConfig))
    run = open_run(rt, "evaluate", {"model": args.model, "data": to_dict(data), "eval": to_dict(ev)})
    ws = Workspace.from_config(rt, data)
    dataset = ws.dataset(data.dataset, data)
    if dataset.test is None:
        raise W2DError(f"dataset '{dataset.name}' has no test split")
    loaded = ws.model(args.model)
    task = task_for_model(loaded, data, dataset)
    metrics = evaluate(loaded, dataset.test, task, ev, cache_root=ws.cache)
    finish(run, rt, {"model": args.model, "dataset": dataset.name, "task": task.kind, **metrics})
    print(format_metrics(f"{args.model} on {dataset.name} test", metrics))
    return 0


def cmd_train_eval(args: argparse.Namespace) -> int:
    from weights2data.pipeline import Workspace
    from weights2data.train import resolve_task, train_eval

    toml = read_toml(args)
    data, ft, ev, rt = (build_config(c, args, toml) for c in (DataConfig, FinetuneConfig, EvalConfig, RuntimeConfig))
    run = open_run(rt, "train-eval", {"model": args.model, "train": args.train, "data": to_dict(data),
                                      "finetune": to_dict(ft), "eval": to_dict(ev)})
    ws = Workspace.from_config(rt, data)
    target = ws.dataset(data.dataset, data, ft.seed)
    train = ws.dataset(args.train, data, ft.seed).train
    if target.test is None:
        raise W2DError(f"dataset '{target.name}' has no test split")
    loaded = ws.model(args.model)
    task = resolve_task(data, target, loaded, ft.lm_loss)
    check_train_labels(train, task, args.train)
    result = train_eval(loaded, train, target.test, task, ft, ev, cache_root=ws.cache)
    finish(run, rt, result)
    print(f"{args.model} trained on {args.train}, tested on {target.name}: {result['metric']}\n"
          f"  best over epochs (the original's figure; model selection on test): {result['best_epoch_test']:.4f}"
          f" (epoch {result['best_epoch']})\n"
          f"  honest ({result['honest_rule']}): {result['val_selected_test']:.4f}"
          f" (epoch {result['val_selected_epoch']})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Finetune smollm2-135m's head on AG News and compare it with the base model."""
    from weights2data.pipeline import Workspace, finetune_cached
    from weights2data.train import evaluate, resolve_task

    rt = build_config(RuntimeConfig, args, {})
    data = DataConfig(dataset="ag_news_1000", data_dir=args.data_dir)
    ft = FinetuneConfig(train_scope="head", lr=1e-3, epochs=3)
    ev = EvalConfig(max_eval_rows=1000)
    ws = Workspace.from_config(rt, data)
    dataset = ws.dataset(data.dataset, data)
    print(f"demo: {DEMO_MODEL}, linear probe (head scope) on {dataset.name}, tested on {len(dataset.test)} rows")
    path, _ = finetune_cached(ws, DEMO_MODEL, dataset, data, ft)
    rows = []
    for name, spec in (("base", DEMO_MODEL), ("finetuned", str(path))):
        loaded = ws.model(spec)
        task = resolve_task(data, dataset, loaded)
        rows.append((name, evaluate(loaded, dataset.test, task, ev, cache_root=ws.cache)))
    for name, metrics in rows:
        print(format_metrics(name, metrics))
    return 0


def check_train_labels(train: Any, task: Any, name: str) -> None:
    if task.kind != "classification":
        return
    if train.labels is None:
        raise W2DError(f"training set '{name}' has no labels, but the task is classification")
    if train.labels.max() >= len(task.label_set.names):
        raise W2DError(f"training set '{name}' has label ids beyond the {len(task.label_set.names)} labels")


# ---------------------------------------------------------------- run directories and output


def open_run(rt: RuntimeConfig, command: str, config: dict) -> Path:
    from weights2data.store import RunDir, stable_hash

    run = RunDir.create(rt.results_dir, rt.exp_name or f"{command}-{stable_hash(config, 8)}")
    run.write_config({"command": command, **config, "runtime": to_dict(rt)})
    run.attach_log()
    log.info("run directory: %s", run.path)
    return run.path


def finish(run: Path, rt: RuntimeConfig, metrics: dict) -> None:
    from weights2data.store import write_json

    write_json(run / "metrics.json", metrics)
    if rt.wandb:
        try:
            import wandb
        except ImportError as exc:
            raise W2DError("--wandb needs the wandb package: pip install wandb") from exc
        wandb_run = wandb.init(project="weights2data", name=run.name, dir=str(run))
        wandb_run.log({k: v for k, v in metrics.items() if isinstance(v, int | float)})
        wandb_run.finish()


def link(path: Path, target: Path) -> None:
    if path.is_symlink() or path.exists():
        path.unlink()
    path.symlink_to(target.resolve(), target_is_directory=True)


def format_metrics(name: str, metrics: dict) -> str:
    parts = [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
             if isinstance(v, int | float)]
    return f"{name}: " + ", ".join(parts)


# ---------------------------------------------------------------- parser and entry point


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="w2d",
        description="weights2data: recover an approximation of a language model's finetuning data from its weights.",
        epilog=DATASET_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version="weights2data 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, func: Callable, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=DATASET_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        p.add_argument("--config", metavar="TOML", help="TOML file with [data], [finetune], [eval], [runtime] "
                       "tables giving defaults; explicit flags win")
        return p

    p = command("finetune", cmd_finetune, "finetune a model on a dataset and save it (safetensors)")
    p.add_argument("--model", default=DEMO_MODEL, help="base model to finetune (default: %(default)s)")
    for cls in (DataConfig, FinetuneConfig, RuntimeConfig):
        add_config_args(p, cls)

    p = command("evaluate", cmd_evaluate, "score a model on a dataset's test split (accuracy / perplexity)")
    p.add_argument("--model", default=DEMO_MODEL, help="model to evaluate (default: %(default)s)")
    for cls in (DataConfig, EvalConfig, RuntimeConfig):
        add_config_args(p, cls)

    p = command("train-eval", cmd_train_eval,
                "finetune a base model on one training set and score it on another dataset's test split "
                "after every epoch; reports the original's best-over-epochs figure and an honest one")
    p.add_argument("--model", default=DEMO_MODEL, help="base model (default: %(default)s)")
    p.add_argument("--train", required=True, help="training set (any dataset argument, e.g. a selection.parquet)")
    for cls in (DataConfig, FinetuneConfig, EvalConfig, RuntimeConfig):
        add_config_args(p, cls)

    p = command("demo", cmd_demo, "the embedded demonstration on smollm2-135m and AG News")
    p.add_argument("--data-dir", default=None, help="data directory (default: $W2D_DATA_DIR)")
    add_config_args(p, RuntimeConfig)
    return parser


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    setup_logging()
    try:
        return args.func(args)
    except W2DError as exc:
        print(f"w2d: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("w2d: interrupted; finished cache chunks are kept and the next run resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
