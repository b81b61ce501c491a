"""The `w2d` command: a thin layer that builds configs from flags / TOML and calls the library."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import fields, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weights2data import __version__
from weights2data.config import (
    CONFIG_SECTIONS,
    DataConfig,
    DefenseConfig,
    EvalConfig,
    FinetuneConfig,
    GenerateConfig,
    RunConfig,
    RuntimeConfig,
    SelectConfig,
    SynthConfig,
    check_keys,
    load_toml,
    to_dict,
)
from weights2data.errors import W2DError

if TYPE_CHECKING:  # imported lazily below: `w2d --help` stays fast
    from weights2data.data import LabelSet
    from weights2data.distributed import Layout
    from weights2data.models import LoadedModel
    from weights2data.pipeline import Workspace
    from weights2data.recover import CorpusGradients
    from weights2data.templates import Template

log = logging.getLogger("weights2data")

SECTIONS = {
    DataConfig: "data",
    FinetuneConfig: "finetune",
    EvalConfig: "eval",
    RuntimeConfig: "runtime",
    SelectConfig: "select",
    RunConfig: "run",
    GenerateConfig: "generate",
    DefenseConfig: "defense",
    SynthConfig: "synth",
}

# The original research code's flag names (seed README), accepted by `w2d run`.
SEED_ALIASES = {
    DataConfig: {"seq_len": ["--sequence_length"], "data_dir": ["--data_dir"]},
    FinetuneConfig: {
        "lr": ["--expert_lr"],
        "batch_size": ["--expert_batch_size"],
        "steps": ["--num_steps_per_expert"],
        "train_scope": ["--train_scope"],
    },
    EvalConfig: {"eval_epochs": ["--num_eval_epochs"]},
    SelectConfig: {
        "k": ["-k", "--select_full_dataset_size"],
        "labels": ["--select_label_strategy"],
        "projection_dim": ["--select_projection_dim"],
        "pseudo_experts": ["--select_num_pseudoexperts"],
        "rounds": ["--max_iterations"],
        "student_steps": ["--select_steps_per_grad"],
    },
    RunConfig: {
        "base": ["--model"],
        "corpus": ["--select_seed_dataset"],
        "strategies": ["--select_batch_fill_strategy", "--strategy"],
        "optimizer_test": ["--optimizer_test"],
    },
    RuntimeConfig: {"exp_name": ["--exp_name"], "results_dir": ["--results_dir"]},
}
# Original options whose other values select machinery we do not implement: refused by name.
FIXED_SEED_OPTIONS = {
    # a no-op in the original: both values take the gradients at the finetuned weights (--grad-at)
    "select_use_expert_grads": (("0", "1"), "where gradients are taken is set by --grad-at"),
    "num_experts": (("1",), "only one expert is trained"),
}
# `w2d select` / `w2d run`: the generation flags carry a generate- prefix; --generate N asks for N
GENERATE_ALIASES = {"docs": ["--generate"]}
# `w2d select` / `w2d run`: the synthesis flags carry a synth- prefix; the original's names also work
SYNTH_ALIASES = {
    "method": ["--opt"],
    "rho": ["--admm_penalty_term"],
    "lr_tokens": ["--lr_tokens"],
    "inner_steps": ["--max_iterations_x"],
    "search_width": ["--search_width"],
    "swap_docs": ["--gcg_documents_to_swap"],
}
# `w2d run`: the defence flags carry a defense- prefix; --defense METHOD picks one
DEFENSE_ALIASES = {"method": ["--defense"]}
DEMO_MODEL = "smollm2-135m"
DISCOVER_DOCS = 128  # corpus texts read by --label-set discover (w2d inspect: --docs)
DEMO = {  # sized to finish within 10 minutes on a 2-core CPU; see README for the choice of scope
    "dataset": "ag_news_500",
    "corpus": "wiki_passages_3000",
    "k": 300,
    "scope": "top:2",
    "lr": 1e-4,
    "epochs": 2,
    "eval_rows": 500,
    "eval_epochs": 3,
    # at this setting, 3 seeds (benchmarks/results/quality_demo_setting_cpu.json), greedy closed 0.48 of
    # the gap with Adam preconditioning (the default) against 0.36 without; a quota per label on
    # K-FAC-whitened gradients 0.56 filled by greedy (quality_demo_setting_proxies_kfac_top2_cpu.json),
    # 0.65 by top-k, what --strategy auto runs for four labels (..._kfac_topk_top2_cpu.json); top-k
    # alone shows what greedy's redundancy term and the quota fix
    "strategies": "greedy,topk_balanced@precondition=kfac,topk",
}

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
CACHE_HELP = """\
the cache (--cache-dir, else $W2D_CACHE_DIR, else ~/.cache/weights2data) holds one folder per kind:
  models       the smollm2-135m converted from its GGUF file, its tokenizer; hub/ downloads
  finetuned    finetuned models (w2d finetune / run), keyed by base weights, data, task, settings
  defended     defended models (w2d defend, run --defense), keyed by the finetuned weights, the defence
               and what it reads (base weights, public text)
  hidden       hidden states in chunks, keyed by the weights below the layer, the token ids, layer, dtype
  lm-features  LM head-gradient sketches in chunks, keyed by both models' weights, inputs, sketch
  blocks       block gradient sketches (--grad-blocks) in chunks, keyed like lm-features plus the loss
  train-eval   scores of train-evaluate runs, keyed by weights, training and test rows, settings
Every key but a model's also holds the versions of weights2data and torch and the device kind
(cpu, cuda, mps) that computed the entry: an entry from another version or device kind is never
reused, only listed and pruned. Chunked kinds resume: a killed run keeps its finished chunks.
Last use is the newest modification time of an entry; reusing an entry updates it.
A killed run can leave temporary files (.NAME.HEX.tmp); readers ignore them, and `w2d cache
prune` deletes those older than {minutes} minutes.
"""


# ---------------------------------------------------------------- flags from dataclasses


def add_config_args(
    parser: argparse.ArgumentParser,
    cls: type,
    aliases: dict[str, list[str]] | None = None,
    skip: tuple[str, ...] = (),
    prefix: str = "",
) -> None:
    """One flag per dataclass field (--PREFIXfield-name), with the field's help text and default."""
    group = parser.add_argument_group(f"{SECTIONS.get(cls, cls.__name__)} options")
    for f in fields(cls):
        if f.name in skip:
            continue
        names = ["--" + prefix + f.name.replace("_", "-"), *(aliases or {}).get(f.name, [])]
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        dest = f"{cls.__name__}.{f.name}"
        if f.type == "bool":
            group.add_argument(
                *names, dest=dest, action="store_true", default=argparse.SUPPRESS, help=help_text
            )
        else:
            group.add_argument(
                *names,
                dest=dest,
                type=_flag_type(f.type),
                default=argparse.SUPPRESS,
                metavar=f.name.upper(),
                help=help_text,
            )


def _flag_type(annotation: str) -> Callable[[str], Any]:
    base = annotation.replace(" | None", "")
    return {"int": int, "float": float}.get(base, str)


def build_config(cls: type, args: argparse.Namespace, toml: dict[str, dict], **overrides: Any) -> Any:
    """Dataclass defaults, then the TOML table, then explicit flags, then forced overrides."""
    table = dict(toml.get(SECTIONS.get(cls, cls.__name__.lower()), {}))
    prefix = cls.__name__ + "."
    flags = {k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix)}
    return cls(**{**table, **flags, **overrides})


def read_toml(args: argparse.Namespace) -> dict[str, dict]:
    if not getattr(args, "config", None):
        return {}
    toml = load_toml(args.config)
    unknown = sorted(set(toml) - set(SECTIONS.values()))
    if unknown:
        raise W2DError(f"unknown section(s) in {args.config}: {', '.join(unknown)}")
    for cls, section in SECTIONS.items():  # a typo is an error even in a table this command does not read
        check_keys(toml.get(section, {}), cls, section)
    return toml


# ---------------------------------------------------------------- subcommands


def cmd_finetune(args: argparse.Namespace) -> int:
    from weights2data.pipeline import Workspace, finetune_cached

    toml = read_toml(args)
    data, ft, rt = (build_config(c, args, toml) for c in (DataConfig, FinetuneConfig, RuntimeConfig))
    run = open_run(
        args, rt, "finetune", {"model": args.model, "data": to_dict(data), "finetune": to_dict(ft)}
    )
    ws = Workspace.from_config(rt, data)
    dataset = ws.dataset(data.dataset, data, ft.seed)
    started = time.time()
    path, meta = finetune_cached(ws, args.model, dataset, data, ft)
    metrics = {
        "model": str(path),
        "seconds": round(time.time() - started, 1),
        "train_rows": len(dataset.train),
        "history": meta["history"],
    }
    link(run / "model", path)
    finish(run, rt, metrics)
    last = meta["history"][-1] if meta["history"] else {}
    print(
        f"finetuned model: {path}\n  (linked from {run / 'model'}); final train loss "
        f"{last.get('train_loss', float('nan')):.4f} after {sum(h['steps'] for h in meta['history'])} steps"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from weights2data.pipeline import Workspace, task_for_model
    from weights2data.train import evaluate, labelled_split

    toml = read_toml(args)
    data, ev, rt = (build_config(c, args, toml) for c in (DataConfig, EvalConfig, RuntimeConfig))
    run = open_run(args, rt, "evaluate", {"model": args.model, "data": to_dict(data), "eval": to_dict(ev)})
    ws = Workspace.from_config(rt, data)
    dataset = ws.dataset(data.dataset, data)
    if dataset.test is None:
        raise W2DError(f"dataset '{dataset.name}' has no test split")
    loaded = ws.model(args.model)
    task = task_for_model(loaded, data, dataset)
    metrics = evaluate(loaded, labelled_split(dataset, dataset.test, task), task, ev, cache_root=ws.cache)
    finish(run, rt, {"model": args.model, "dataset": dataset.name, "task": task.kind, **metrics})
    print(format_metrics(f"{args.model} on {dataset.name} test", metrics))
    return 0


def cmd_train_eval(args: argparse.Namespace) -> int:
    from weights2data.experiment import finetuned_reference
    from weights2data.pipeline import Workspace
    from weights2data.train import agreement_split, labelled_split, resolve_task, train_eval

    toml = read_toml(args)
    data, ft, ev, rt = (
        build_config(c, args, toml) for c in (DataConfig, FinetuneConfig, EvalConfig, RuntimeConfig)
    )
    if args.agreement_corpus is not None and args.finetuned is None:
        raise W2DError("--agreement-corpus compares the student with the finetuned model: give --finetuned")
    run = open_run(
        args,
        rt,
        "train-eval",
        {
            "model": args.model,
            "train": args.train,
            "finetuned": args.finetuned,
            "agreement_corpus": args.agreement_corpus,
            "data": to_dict(data),
            "finetune": to_dict(ft),
            "eval": to_dict(ev),
        },
    )
    ws = Workspace.from_config(rt, data)
    target = ws.dataset(data.dataset, data, ft.seed)
    train = ws.dataset(args.train, data, ft.seed)
    if target.test is None:
        raise W2DError(f"dataset '{target.name}' has no test split")
    loaded = ws.model(args.model)
    finetuned = None if args.finetuned is None else ws.finetuned(args.finetuned, loaded)
    task = resolve_task(data, target, loaded, ft.lm_loss)
    fit = labelled_split(train, train.train, task)
    reference = None
    if args.agreement_corpus is not None:
        corpus = ws.dataset(args.agreement_corpus, data, ft.seed).train
        labelled = finetuned_reference(loaded, finetuned, corpus, task, data, ev, ft.seed, ws.cache)
        reference = agreement_split(labelled, fit, ev, task)  # less --train's own passages
    result = train_eval(
        loaded, fit, target.test, task, ft, ev, cache_root=ws.cache, reference=reference, finetuned=finetuned
    )
    finish(run, rt, result)
    print(
        f"{args.model} trained on {args.train}, tested on {target.name}: {result['metric']}\n"
        f"  best over epochs (the original's figure; selected on test): {result['best_epoch_test']:.4f}"
        f" (epoch {result['best_epoch']})\n"
        f"  honest ({result['honest_rule']}): {result['val_selected_test']:.4f}"
        f" (epoch {result['val_selected_epoch']})"
    )
    if finetuned is not None:
        print(f"  weight change cosine to {args.finetuned} (honest epoch): {result['weight_cos']:.4f}")
    if reference is not None:
        where = f"{len(reference)} held-out {args.agreement_corpus} passages"
        print(agreement_lines(result, args.finetuned, where, len(task.label_set.names)))
    return 0


def agreement_lines(result: dict, finetuned: str, where: str, labels: int) -> str:
    """The student's agreement with the finetuned model, and a warning where it is below chance:
    the training sets measured so were at best slightly better than random passages (RESULTS.md,
    "A student that disagrees with the expert")."""
    chance = 1 / labels
    text = (
        f"  agreement with {finetuned}'s labels on {where}"
        f" (honest epoch): {result['agreement']:.4f} (balanced {result['balanced_agreement']:.4f};"
        f" chance {chance:.4f})"
    )
    if result["agreement"] < chance:
        text += (
            "\n  below chance: the student labels passages against the finetuned model; training sets"
            " measured so were at best slightly better than random passages (benchmarks/RESULTS.md):"
            " treat this selection as failed"
        )
    return text


def cmd_select(args: argparse.Namespace) -> int:
    """Under torchrun (WORLD_SIZE > 1) every rank runs this on its shard of the corpus; rank 0 writes."""
    from weights2data.distributed import Layout, check_shardable, process_group
    from weights2data.pipeline import Workspace

    toml = read_toml(args)
    data, sel, rt = (build_config(c, args, toml) for c in (DataConfig, SelectConfig, RuntimeConfig))
    gen = build_config(GenerateConfig, args, toml, seed=sel.seed)
    synth = build_config(SynthConfig, args, toml, seed=sel.seed)
    layout = Layout.from_env()
    if layout.sharded:
        check_shardable(sel, gen.docs, rt.device_map)
        if synth.synthesises:
            raise W2DError(f"--opt {synth.method} runs in one process: run it without torchrun")
    config = {
        "base": args.base,
        "finetuned": args.finetuned,
        "corpus": args.corpus,
        "data": to_dict(data),
        "select": to_dict(sel),
        **({"generate": to_dict(gen)} if gen.docs else {}),
        **({"synth": to_dict(synth)} if synth.synthesises else {}),
    }
    if layout.rank != 0:  # one run directory and one log: rank 0's
        log.setLevel(logging.WARNING)
    run = open_run(args, rt, "select", config) if layout.rank == 0 else None
    ws = Workspace.from_config(rt, data)
    ws = replace(ws, device=layout.device(ws.device))
    with process_group(layout, ws.device):
        return select_and_write(args, ws, data, sel, gen, synth, rt, run, layout)


def select_and_write(
    args: argparse.Namespace,
    ws: Workspace,
    data: DataConfig,
    sel: SelectConfig,
    gen: GenerateConfig,
    synth: SynthConfig,
    rt: RuntimeConfig,
    run: Path | None,
    layout: Layout,
) -> int:
    from weights2data.adapters import select_for_adapter
    from weights2data.distributed import Shard, sharded_gradients, sharded_select
    from weights2data.generate import mark_sources, with_generated
    from weights2data.precondition import WHOLE, CorpusSlice
    from weights2data.recover import (
        check_lm_selection,
        corpus_gradients,
        generated_label_distribution,
        generation_labeller,
        lm_corpus_gradients,
        recover,
        resolve_strategy,
        write_recovery,
    )
    from weights2data.templates import resolve_template
    from weights2data.train import label_loss_of

    corpus = ws.corpus(args.corpus, data, sel.k, sel.seed)
    base = ws.model(args.base)
    finetuned = ws.finetuned(args.finetuned, base)
    sel = select_for_adapter(sel, base, finetuned)
    saved_task = finetuned.meta.get("task") or {}
    template = resolve_template(data.template, data.chat_template, finetuned.meta)
    if data.task == "lm" or (data.task == "auto" and saved_task.get("kind") == "lm"):
        check_lm_selection(sel, [sel.strategy])
        label_set = None
    else:
        label_set = select_label_set(ws, sel, data, base, finetuned, corpus.texts, template)
    label_loss = data.label_loss or label_loss_of(saved_task)
    num_labels = None if label_set is None else len(label_set.names)
    sel = resolve_strategy(sel, num_labels, label_loss)
    labeller = None if label_set is None else generation_labeller(base, finetuned, label_set, data)
    corpus, sources = with_generated(corpus, base, finetuned, gen, data.seq_len, ws.cache, labeller)

    def gradients(texts: list[str], corpus: CorpusSlice = WHOLE) -> CorpusGradients:
        if label_set is None:
            lm_loss = lm_loss_of(args, finetuned)
            grads = lm_corpus_gradients(
                base, finetuned, texts, data.seq_len, lm_loss, sel, ws.cache, template
            )
        else:
            grads = corpus_gradients(base, finetuned, texts, label_set, data, sel, ws.cache, corpus=corpus)
        return grads.to(ws.device)  # a GPU selects where its features are

    if layout.sharded:
        shard = Shard.of(len(corpus), layout, ws.device)
        grads = sharded_gradients(shard, corpus.texts, gradients)
        selector = partial(sharded_select, shard)
        recovery = recover(grads, corpus.texts, label_set, sel, progress=layout.rank == 0, selector=selector)
    elif sel.rounds > 1:
        from weights2data.rounds import recover_in_rounds
        from weights2data.train import Task
        from weights2data.trajectory import expert_settings

        task = Task(
            "lm" if label_set is None else "classification",
            data.seq_len,
            label_set,
            lm_loss_of(args, finetuned),
            template,
            label_loss,
        )
        grads = gradients(corpus.texts)
        recovery = recover_in_rounds(
            base,
            finetuned,
            corpus.texts,
            task,
            data,
            sel,
            expert_settings(base, finetuned, sel.student_steps),
            sel.strategy,
            ws.cache,
            grads,
        )
    else:
        grads = gradients(corpus.texts)
        recovery = recover(grads, corpus.texts, label_set, sel)
    if run is None:  # a rank other than 0: rank 0 holds the same selection and writes it
        return 0
    recovery = mark_sources(recovery, sources, generated_label_distribution(grads, sources, label_set))
    if synth.synthesises:
        from weights2data.synthesis import refine_selection
        from weights2data.train import Task

        if label_set is None:
            raise W2DError(f"--opt {synth.method} synthesises classification documents: use --opt SELECT")
        task = Task("classification", data.seq_len, label_set, template=template, label_loss=label_loss)
        recovery = refine_selection(
            base, finetuned, grads, corpus.texts, recovery, sources, task, sel, synth, ws.cache
        )
    if label_set is not None:
        recovery.summary["label_set"] = label_set.to_dict()
    parquet, _ = write_recovery(recovery, run)
    finish(run, rt, recovery.summary)
    print(
        f"selected {sel.k} of {len(corpus)} documents with {recovery.summary['strategy']}: {parquet}\n"
        f"  objective cos(sum of selected gradients, delta) = {recovery.summary['objective_cos']:.4f}\n"
        f"  labels: {recovery.summary.get('label_distribution')}"
        + confidence_line(recovery.summary.get("label_confidence"))
        + sparse_label_line(recovery.summary)
        + (f"\n  generated: {recovery.summary['generated_picks']} of the picks" if gen.docs else "")
        + (f"; candidates by label: {labels}" if (labels := recovery.summary.get("generated_labels")) else "")
        + (
            f"\n  synthesised: {recovery.summary['synthesised']} of the documents (objective at the start "
            f"{recovery.summary['objective_init']:.4f})"
            if synth.synthesises
            else ""
        )
    )
    return 0


def select_label_set(
    ws: Workspace,
    sel: SelectConfig,
    data: DataConfig,
    base: LoadedModel,
    finetuned: LoadedModel,
    texts: list[str],
    template: Template,
) -> LabelSet:
    """--label-set: a dataset, a word list, `discover` (inspect's suggestion over the first
    DISCOVER_DOCS corpus texts), else the finetuned model's metadata."""
    from weights2data.recover import resolve_label_set

    if sel.label_set == "discover":
        from weights2data.inspect_model import discover_label_set

        label_set = discover_label_set(
            base, finetuned, texts[:DISCOVER_DOCS], template, data.seq_len, ws.cache
        )
        log.info("--label-set discover: %s", ", ".join(repr(t) for t in label_set.tokens))
        return label_set
    label_data = ws.dataset(sel.label_set, data) if sel.label_set and "," not in sel.label_set else None
    return resolve_label_set(sel, data, finetuned, label_data, template)


def cmd_inspect(args: argparse.Namespace) -> int:
    from weights2data.inspect_model import inspect_finetune, markdown
    from weights2data.pipeline import Workspace
    from weights2data.store import write_json
    from weights2data.templates import resolve_template

    toml = read_toml(args)
    data, rt = build_config(DataConfig, args, toml), build_config(RuntimeConfig, args, toml)
    config = {"base": args.base, "finetuned": args.finetuned, "corpus": args.corpus, "docs": args.docs}
    run = open_run(args, rt, "inspect", {**config, "data": to_dict(data)})
    ws = Workspace.from_config(rt, data)
    texts = ws.corpus(args.corpus, data, 1).texts[: args.docs]
    base = ws.model(args.base)
    finetuned = ws.finetuned(args.finetuned, base)
    template = resolve_template(data.template, data.chat_template, finetuned.meta)
    report = inspect_finetune(base, finetuned, texts, template, data.seq_len, ws.cache)
    write_json(run / "inspect.json", report)
    (run / "inspect.md").write_text(markdown(report))
    finish(run, rt, {key: report[key] for key in ("scope", "task", "label_set", "label_count")})
    print(markdown(report) + f"\nreport: {run / 'inspect.json'} (and inspect.md)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from weights2data.generate import generate_cached, write_generated
    from weights2data.pipeline import Workspace
    from weights2data.store import write_json

    toml = read_toml(args)
    gen, rt = build_config(GenerateConfig, args, toml), build_config(RuntimeConfig, args, toml)
    if gen.docs < 1:
        raise W2DError("w2d generate needs -n N, the number of documents to generate (at least 1)")
    config = {"base": args.base, "finetuned": args.finetuned, "generate": to_dict(gen)}
    run = open_run(args, rt, "generate", config)
    ws = Workspace.from_config(rt)
    base = ws.model(args.base)
    finetuned = ws.finetuned(args.finetuned, base)
    # the length the finetune was trained at, when it recorded one
    seq_len = gen.seq_len or (finetuned.meta.get("task") or {}).get("seq_len") or DataConfig().seq_len
    started = time.time()
    texts = generate_cached(base, finetuned, gen, seq_len, ws.cache)
    parquet = write_generated(texts, run)
    summary = {
        "base": args.base,
        "finetuned": args.finetuned,
        "docs": len(texts),
        "distinct": len(set(texts)),
        "seconds": round(time.time() - started, 1),
        "settings": {**to_dict(gen), "seq_len": seq_len},
    }
    write_json(run / "summary.json", summary)
    finish(run, rt, summary)
    print(
        f"generated {len(texts)} documents ({len(set(texts))} distinct, {seq_len} tokens at most): "
        f"{parquet}\n  first: {texts[0]!r}"
    )
    return 0


def cmd_defend(args: argparse.Namespace) -> int:
    from weights2data.defend import defend_cached, saved_task
    from weights2data.pipeline import Workspace

    toml = read_toml(args)
    data, cfg, rt = (build_config(c, args, toml) for c in (DataConfig, DefenseConfig, RuntimeConfig))
    config = {"model": args.model, "base": args.base, "corpus": args.corpus, "data": to_dict(data)}
    run = open_run(args, rt, "defend", {**config, "defense": to_dict(cfg)})
    ws = Workspace.from_config(rt, data)
    finetuned = ws.model(args.model)
    base = ws.model(args.base) if args.base else None
    corpus = ws.dataset(args.corpus, data).train if args.corpus else None
    started = time.time()
    path, meta = defend_cached(ws.cache, finetuned, cfg, base, corpus, saved_task(finetuned, data.seq_len))
    link(run / "model", path)
    record = meta["defense"]
    finish(run, rt, {"model": str(path), "seconds": round(time.time() - started, 1), "defense": record})
    update = f" (the finetune's own change: {record['update']:.4g})" if "update" in record else ""
    print(
        f"defended model ({cfg.method}, strength {cfg.strength:g}): {path}\n  (linked from {run / 'model'}); "
        f"weights moved by {record['moved']:.4g}{update}"
    )
    return 0


def lm_loss_of(args: argparse.Namespace, finetuned) -> str:
    """The LM loss a selection scores: the flag, else the one the finetune recorded, else full."""
    return args.lm_loss or (finetuned.meta.get("task") or {}).get("lm_loss") or "full"


def cmd_run(args: argparse.Namespace) -> int:
    check_fixed_seed_options(args)
    toml = read_toml(args)
    data, ft, ev, run_cfg, rt = (
        build_config(c, args, toml)
        for c in (DataConfig, FinetuneConfig, EvalConfig, RunConfig, RuntimeConfig)
    )
    sel = build_config(SelectConfig, args, toml, seed=ft.seed)  # one --seed for the whole experiment
    gen = build_config(GenerateConfig, args, toml, seed=ft.seed)
    defense = build_config(DefenseConfig, args, toml, seed=ft.seed)
    synth = build_config(SynthConfig, args, toml, seed=ft.seed)
    return run_and_print(args, rt, data, ft, ev, sel, run_cfg, gen, defense=defense, synth=synth)


def run_and_print(
    args: argparse.Namespace,
    rt: RuntimeConfig,
    data: DataConfig,
    ft: FinetuneConfig,
    ev: EvalConfig,
    sel: SelectConfig,
    run_cfg: RunConfig,
    gen: GenerateConfig | None = None,
    results_json: str | None = None,
    defense: DefenseConfig | None = None,
    synth: SynthConfig | None = None,
) -> int:
    from weights2data.experiment import format_table, run_experiment
    from weights2data.pipeline import Workspace
    from weights2data.report_defences import format_utility

    config = {
        "data": to_dict(data),
        "finetune": to_dict(ft),
        "eval": to_dict(ev),
        "select": to_dict(sel),
        "run": to_dict(run_cfg),
        **({"generate": to_dict(gen)} if gen and gen.docs else {}),
        **({"defense": to_dict(defense)} if defense and defense.method != "none" else {}),
        **({"synth": to_dict(synth)} if synth and synth.synthesises else {}),
    }
    run = open_run(args, rt, "run", config)
    ws = Workspace.from_config(rt, data)
    results = run_experiment(ws, run, data, ft, ev, sel, run_cfg, gen, defense, synth)
    finish(run, rt, {"table": results["table"], "seconds": results["seconds"]})
    print(
        f"\n{results['expert_dataset']}: expert vs {sel.k} documents recovered from {run_cfg.corpus} "
        f"({ft.train_scope} scope, {results['seconds']:.0f} s)"
    )
    print(format_table(results))
    if "defense" in results:
        print(format_utility(results))
    if synth and synth.synthesises:
        made = results["selections"][synth.method.lower()]
        print(
            f"{synth.method}: objective {made['objective_cos']:.4f} (start {made['objective_init']:.4f}), "
            f"{made['synthesised']} of {sel.k} documents synthesised"
        )
    if gen and gen.docs:
        picks = {name: s["generated_picks"] for name, s in results["selections"].items()}
        made = next(iter(results["selections"].values()))
        print(
            f"generated documents among the {sel.k} picks "
            f"(of {made['generated_candidates']} candidates): {picks}"
            + (f"; candidates by label: {made['generated_labels']}" if "generated_labels" in made else "")
        )
    print(f"results: {run / 'results.json'}")
    if results_json:  # e.g. benchmarks/results/demo_cpu.json, the figures the README quotes
        Path(results_json).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run / "results.json", results_json)
        print(f"  copied to {results_json}")
    return 0


def check_fixed_seed_options(args: argparse.Namespace) -> None:
    for name, (supported, why) in FIXED_SEED_OPTIONS.items():
        value = getattr(args, name, None)
        if value is not None and str(value) not in supported:
            raise W2DError(f"--{name} {value} is not supported: {why} (only {' or '.join(supported)})")


def cmd_demo(args: argparse.Namespace) -> int:
    """The recovery experiment on the embedded default, sized for a 2-core CPU."""
    rt = build_config(RuntimeConfig, args, {})
    rt.exp_name = rt.exp_name or "demo"
    data = DataConfig(dataset=DEMO["dataset"], data_dir=args.data_dir)
    ft = FinetuneConfig(train_scope=DEMO["scope"], lr=DEMO["lr"], epochs=DEMO["epochs"], batch_size=16)
    ev = EvalConfig(max_eval_rows=DEMO["eval_rows"], eval_epochs=DEMO["eval_epochs"], patience=3)
    sel = SelectConfig(k=DEMO["k"])
    run_cfg = RunConfig(base=DEMO_MODEL, corpus=DEMO["corpus"], strategies=DEMO["strategies"])
    print(
        f"demo: {DEMO_MODEL}, {DEMO['scope']} scope; expert on {DEMO['dataset']}; recover k = {DEMO['k']} "
        f"from {DEMO['corpus']}; train on each and score on AG News test ({DEMO['eval_rows']} rows)"
    )
    return run_and_print(args, rt, data, ft, ev, sel, run_cfg, results_json=args.results_json)


def cmd_report(args: argparse.Namespace) -> int:
    from weights2data.report import build_report

    if not args.run_dirs and not args.defences:
        raise W2DError("give a RUN_DIR written by `w2d run`, or --defences FILE")
    if args.out:
        out = Path(args.out)
    elif args.run_dirs:
        out = default_report_dir([Path(p) for p in args.run_dirs])
    else:  # benchmarks/results/defences_x.json -> benchmarks/results/defences_x-report
        first = Path(args.defences[0])
        out = first.with_name(first.stem + "-report")
    html_path = build_report(args.run_dirs, out, data_dir=args.data_dir, defences=args.defences)
    print(f"report: {html_path}\n  markdown: {html_path.with_name('report.md')} (figures beside it)")
    return 0


def default_report_dir(run_dirs: list[Path]) -> Path:
    """<run>/report for one run; <common parent>/report-<hash of the runs> for several."""
    from weights2data.store import stable_hash

    if len(run_dirs) == 1:
        return run_dirs[0] / "report"
    resolved = [str(p.resolve()) for p in run_dirs]
    return Path(os.path.commonpath(resolved)) / f"report-{stable_hash(sorted(resolved), 8)}"


def cmd_similarity(args: argparse.Namespace) -> int:
    from weights2data.metrics import SentenceEmbedder, dataset_similarity
    from weights2data.pipeline import Workspace, pick_device

    toml = read_toml(args)
    data, rt = build_config(DataConfig, args, toml), build_config(RuntimeConfig, args, toml)
    run = open_run(
        args,
        rt,
        "similarity",
        {"a": args.a, "b": args.b, "max_docs": args.max_docs, "seed": args.seed, "data": to_dict(data)},
    )
    ws = Workspace.from_config(rt, data)
    a, b = ws.dataset(args.a, data).train, ws.dataset(args.b, data).train
    embedder = SentenceEmbedder(device=str(pick_device(rt.device)))
    metrics = dataset_similarity(a.texts, b.texts, embedder=embedder, max_docs=args.max_docs, seed=args.seed)
    finish(run, rt, {"a": args.a, "b": args.b, **metrics})
    leak = metrics["leakage"]
    print(
        f"similarity of A = {args.a} ({metrics['n_selection']} texts) to B = {args.b} "
        f"({metrics['n_truth']} texts)\n"
        f"  Sinkhorn divergence     {metrics['sinkhorn_divergence']:.4f}  (0 = same distribution; "
        f"{metrics['ot_n_selection']} vs {metrics['ot_n_truth']} embedded)\n"
        f"  matching distance       {metrics['matching_distance']:.4f}\n"
        f"  example containment     {metrics['example_containment']:.4f}  "
        f"(share of B's examples in A; near: {metrics['near_example_containment']:.4f})\n"
        f"  vocabulary containment  {metrics['vocabulary_containment']:.4f}  "
        f"(share of B's word types in A)\n"
        f"  leakage                 exact {leak['exact_duplicate_fraction']:.4f}, near "
        f"{leak['near_duplicate_fraction']:.4f}  (share of A copied from B)\n"
        f"metrics: {run / 'metrics.json'}"
    )
    return 0


def cmd_cache_ls(args: argparse.Namespace) -> int:
    from weights2data.cache import KINDS, entries, format_listing
    from weights2data.store import cache_dir, remove_stale_temps

    root = cache_dir(build_config(RuntimeConfig, args, read_toml(args)).cache_dir)
    listed = entries(root, args.kind or tuple(KINDS))
    print(format_listing(root, listed, remove_stale_temps(root, dry_run=True)))
    return 0


def cmd_cache_prune(args: argparse.Namespace) -> int:
    from weights2data.cache import format_pruned, prune
    from weights2data.store import cache_dir

    root = cache_dir(build_config(RuntimeConfig, args, read_toml(args)).cache_dir)
    doomed, temps = prune(root, args.kind, args.older_than, args.all, args.dry_run)
    print(format_pruned(doomed, temps, args.dry_run))
    return 0


# ---------------------------------------------------------------- run directories and output


def open_run(args: argparse.Namespace, rt: RuntimeConfig, command: str, config: dict) -> Path:
    """Create the run directory; main() removes it again if the command fails before finishing."""
    from weights2data.store import RunDir, stable_hash

    path = Path(rt.results_dir) / (rt.exp_name or f"{command}-{stable_hash(config, 8)}")
    if not path.exists():
        args.new_run_dir = path
    # where and on what it runs (the runtime settings) is not part of a run's identity, nor of its name
    record = {"command": command, **config, "runtime": to_dict(rt)}
    defaults = {name: to_dict(cls()) for name, cls in CONFIG_SECTIONS.items() if name in config}
    run = RunDir.create(rt.results_dir, path.name, record, ignore=("runtime",), defaults=defaults)
    run.attach_log()
    log.info("run directory: %s", run.path)
    return run.path


def confidence_line(confidence: dict | None) -> str:
    """The expert's mean confidence in the picks' autolabels against the corpus's, for select's report."""
    if confidence is None:
        return ""
    return (
        f"\n  expert's mean probability of the autolabels: {confidence['picked']:.3f} on the picks, "
        f"{confidence['corpus']:.3f} over the corpus"
    )


def sparse_label_line(summary: dict) -> str:
    """A hint, under select's report, when an unbalanced strategy left a label with few picks."""
    from weights2data.recover import sparse_labels
    from weights2data.selection import BALANCED

    sparse = sparse_labels(summary.get("label_distribution") or {})
    if not sparse or summary["strategy"] in BALANCED:
        return ""
    return (
        f"\n  few picks carry {', '.join(sparse)}: unless the finetuning data is known to be this "
        "skewed, --strategy greedy_balanced (a quota per label) may recover more; it did on "
        "finetunes whose autolabels lean to one label"
    )


def finish(run: Path, rt: RuntimeConfig, metrics: dict) -> None:
    from weights2data.store import RunDir

    RunDir(run).write_metrics(metrics)
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
    parts = [
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
        for k, v in metrics.items()
        if isinstance(v, int | float)
    ]
    return f"{name}: " + ", ".join(parts)


# ---------------------------------------------------------------- parser and entry point


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="w2d",
        description="weights2data: recover an approximation of a language model's finetuning data "
        "from its weights.",
        epilog=DATASET_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"weights2data {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str, func: Callable, help_text: str, parent: Any = sub, epilog: str = DATASET_HELP
    ) -> argparse.ArgumentParser:
        p = parent.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=func)
        p.add_argument(
            "--config",
            metavar="TOML",
            help="TOML file with [data], [finetune], [eval], [runtime] "
            "tables giving defaults; explicit flags win",
        )
        return p

    p = command("finetune", cmd_finetune, "finetune a model on a dataset and save it (safetensors)")
    p.add_argument("--model", default=DEMO_MODEL, help="base model to finetune (default: %(default)s)")
    for cls in (DataConfig, FinetuneConfig, RuntimeConfig):
        add_config_args(p, cls)

    p = command("evaluate", cmd_evaluate, "score a model on a dataset's test split (accuracy / perplexity)")
    p.add_argument("--model", default=DEMO_MODEL, help="model to evaluate (default: %(default)s)")
    for cls in (DataConfig, EvalConfig, RuntimeConfig):
        add_config_args(p, cls)

    p = command(
        "train-eval",
        cmd_train_eval,
        "finetune a base model on one training set and score it on another dataset's test split "
        "after every epoch; reports the original's best-over-epochs figure and an honest one",
    )
    p.add_argument("--model", default=DEMO_MODEL, help="base model (default: %(default)s)")
    p.add_argument(
        "--train", required=True, help="training set (any dataset argument, e.g. a selection.parquet)"
    )
    p.add_argument(
        "--finetuned",
        default=None,
        help="the finetuned model --train was recovered from (as w2d select's --finetuned): also "
        "report cos(θ − θ0, θ1 − θ0), how closely training on --train moved --model's weights the "
        "way the finetune did, at the honest epoch. The cosine reads no test split: between selections "
        "from one finetune (e.g. --precondition adam and kfac) the larger cosine is a guess at the "
        "better one (benchmarks/RESULTS.md measures how often it is right)",
    )
    p.add_argument(
        "--agreement-corpus",
        default=None,
        help="with --finetuned (a classifier): also report how often the trained model gives "
        "--agreement-rows passages of this corpus (none of --train's) the finetuned model's label, at "
        "the honest epoch, and warn below chance (1 / labels): selections whose students disagree "
        "with the finetune so were at best slightly better than random (benchmarks/RESULTS.md). Reads "
        "no test split",
    )
    for cls in (DataConfig, FinetuneConfig, EvalConfig, RuntimeConfig):
        add_config_args(p, cls)

    p = command(
        "select",
        cmd_select,
        "recover a labelled subset of a corpus from base and finetuned weights "
        "(writes selection.parquet + summary.json)",
    )
    p.add_argument("--base", required=True, help="base model (before finetuning)")
    p.add_argument(
        "--finetuned",
        required=True,
        help="finetuned model: any directory transformers can load, or a LoRA adapter directory "
        "(adapter_config.json) applied to --base",
    )
    p.add_argument("--corpus", required=True, help="candidate corpus (a dataset argument)")
    add_config_args(p, SelectConfig, {"k": ["-k"]})
    add_config_args(p, DataConfig, skip=("dataset",))
    p.add_argument(
        "--lm-loss",
        choices=("full", "last"),
        default=None,
        help="--task lm: the loss whose gradients are matched, full (every next token) or last "
        "(default: the finetuned model's saved setting, else full); --projection-dim 0 means a "
        "4096-dimensional Kronecker sketch for LM",
    )
    add_config_args(p, GenerateConfig, GENERATE_ALIASES, skip=("seed", "seq_len"), prefix="generate-")
    add_config_args(p, SynthConfig, SYNTH_ALIASES, skip=("seed",), prefix="synth-")
    add_config_args(p, RuntimeConfig)

    p = command(
        "inspect",
        cmd_inspect,
        "what a finetune changed and how much: relative weight change per layer group, the train "
        "scope (head, top:N, full, LoRA), whether it looks like a classifier, and candidate label "
        "tokens with a suggested --label-set (writes inspect.json + inspect.md)",
    )
    p.add_argument("--base", required=True, help="base model (before finetuning)")
    p.add_argument(
        "--finetuned",
        required=True,
        help="finetuned model: a directory, a merged checkpoint or a LoRA adapter",
    )
    p.add_argument(
        "--corpus",
        default="wiki_passages_1000",
        help="texts read at the label position for the next-token shift (default: %(default)s)",
    )
    p.add_argument("--docs", type=int, default=DISCOVER_DOCS, help="corpus texts read (default: %(default)s)")
    add_config_args(p, DataConfig, skip=("dataset", "verbalizer", "task", "label_column", "label_loss"))
    add_config_args(p, RuntimeConfig)

    p = command(
        "generate",
        cmd_generate,
        "sample in-domain documents from the finetuned model contrasted against the base "
        "(next-token logits: finetuned − alpha · base; writes generated.parquet + summary.json)",
    )
    p.add_argument("--base", required=True, help="base model (before finetuning)")
    p.add_argument("--finetuned", required=True, help="finetuned model (any directory transformers can load)")
    add_config_args(p, GenerateConfig, {"docs": ["-n"]}, skip=("per_label", "max_draws"))  # need a label set
    add_config_args(p, RuntimeConfig)

    p = command(
        "defend",
        cmd_defend,
        "change a finetuned model before release so that its weights say less about its training data "
        "(noise, relative-noise, retrain, head-obfuscate); writes a model directory that every command "
        "reads as a finetune, its w2d.json keeping the task and label set and recording the defence",
    )
    p.add_argument(
        "--model",
        required=True,
        help="the finetuned model to defend; its task (label set, sequence length) comes from its "
        "w2d.json, and without one it is taken for language modelling at --seq-len",
    )
    p.add_argument(
        "--base",
        default=None,
        help="its base model: relative-noise and retrain need it (the update, the scope it changed); "
        "head-obfuscate reuses its cached lower-block states",
    )
    p.add_argument(
        "--corpus",
        default=None,
        help="public text (a dataset argument, e.g. wiki_passages_2000): retrain trains on it, "
        "head-obfuscate keeps the outputs on it",
    )
    add_config_args(p, DefenseConfig)
    add_config_args(p, DataConfig, skip=("dataset", "label_column", "verbalizer", "task"))
    add_config_args(p, RuntimeConfig)

    p = command(
        "run",
        cmd_run,
        "the whole experiment: finetune the expert, select from the corpus, train on the expert's "
        "data / the selection / random documents, and compare on the expert's test split. Accepts "
        "the original run.py flag names.",
    )
    for cls in (RunConfig, DataConfig, FinetuneConfig, EvalConfig, SelectConfig, RuntimeConfig):
        add_config_args(
            p,
            cls,
            SEED_ALIASES.get(cls),
            skip=("strategy", "seed", "label_set") if cls is SelectConfig else (),
        )
    add_config_args(p, GenerateConfig, GENERATE_ALIASES, skip=("seed", "seq_len"), prefix="generate-")
    add_config_args(p, SynthConfig, SYNTH_ALIASES, skip=("seed",), prefix="synth-")
    add_config_args(p, DefenseConfig, DEFENSE_ALIASES, skip=("seed",), prefix="defense-")
    seed = p.add_argument_group("original options with one supported value (others are refused)")
    for name, (supported, why) in FIXED_SEED_OPTIONS.items():
        seed.add_argument(f"--{name}", default=None, help=f"only {' or '.join(supported)}: {why}")

    p = command(
        "demo",
        cmd_demo,
        "the recovery experiment on the embedded default (smollm2-135m, AG News, "
        "Wikipedia passages), sized for a laptop CPU",
    )
    p.add_argument("--data-dir", default=None, help="data directory (default: $W2D_DATA_DIR)")
    p.add_argument(
        "--results-json",
        default=None,
        metavar="PATH",
        help="also copy the run's results.json to PATH (e.g. benchmarks/results/demo_cpu.json)",
    )
    add_config_args(p, RuntimeConfig)

    p = command(
        "report",
        cmd_report,
        "an HTML and markdown report of one or more `w2d run` directories: "
        "scores and gap closure, metric vs k, per-epoch curves, label histograms, similarity, "
        "sample recovered documents; and the defence trade-off measured by benchmarks/defences.py",
    )
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="run directories written by `w2d run`")
    p.add_argument(
        "--defences",
        action="append",
        default=[],
        metavar="FILE",
        help="a results file of benchmarks/defences.py (repeatable): utility against closure over its "
        "seeds, as a table and a figure",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default: RUN_DIR/report for one run, <common parent>/report-<hash> for several)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="where the expert's training data is found, for the true "
        "label distribution (default: $W2D_DATA_DIR)",
    )

    p = command(
        "similarity",
        cmd_similarity,
        "dataset similarity of A's training texts to B's: optimal-transport distances between "
        "sentence embeddings, containment of B's examples and vocabulary in A, leakage of B into A",
    )
    p.add_argument("a", metavar="A", help="dataset argument, e.g. a selection.parquet (the selection side)")
    p.add_argument("b", metavar="B", help="dataset argument, e.g. ag_news_1000 (the truth side)")
    p.add_argument(
        "--max-docs",
        type=int,
        default=2000,
        help="texts per side embedded for the optimal-transport distances (a seeded subsample; "
        "default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of that subsample (default: %(default)s)")
    skip = ("dataset", "verbalizer", "seq_len", "task", "template", "chat_template", "label_loss")
    add_config_args(p, DataConfig, skip=skip)
    add_config_args(p, RuntimeConfig, skip=("cache_dir", "allow_pickle"))
    add_cache_commands(sub, command)
    return parser


def add_cache_commands(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """`w2d cache ls` and `w2d cache prune`."""
    from weights2data.cache import KINDS, PROTECTED
    from weights2data.store import STALE_TEMP_S

    epilog = CACHE_HELP.format(minutes=STALE_TEMP_S // 60)
    cache = sub.add_parser(
        "cache",
        help="list the cache (w2d cache ls) or free its space (w2d cache prune)",
        description="list the cache or free its space",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = cache.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    runtime_only = tuple(f.name for f in fields(RuntimeConfig) if f.name != "cache_dir")
    kind_help = f"only entries of this kind ({', '.join(KINDS)}); repeat for several"
    p = command(
        "ls",
        cmd_cache_ls,
        "what the cache holds: per kind its entries, size and last use, then one line per entry "
        "with a summary of its key",
        actions,
        epilog,
    )
    p.add_argument("--kind", action="append", choices=list(KINDS), metavar="KIND", help=kind_help)
    add_config_args(p, RuntimeConfig, skip=runtime_only)
    p = command(
        "prune",
        cmd_cache_prune,
        "free space: delete the entries last used over DAYS days ago (--older-than) or all of them "
        f"(--all), of every kind but {', '.join(PROTECTED)} unless --kind names it; always deletes "
        "temporary files left by killed runs. Do not prune under a running command: it may be "
        "using the entries.",
        actions,
        epilog,
    )
    p.add_argument(
        "--kind",
        action="append",
        choices=list(KINDS),
        metavar="KIND",
        help=f"{kind_help} (default: every kind but {', '.join(PROTECTED)}: the converted "
        "smollm2-135m and hub downloads are deleted only when asked for by --kind models)",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--older-than",
        type=float,
        metavar="DAYS",
        help="delete the entries last used more than DAYS days ago (fractions allowed: 0.5 = 12 hours)",
    )
    which.add_argument("--all", action="store_true", help="delete every entry of the chosen kinds")
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")
    add_config_args(p, RuntimeConfig, skip=runtime_only)


def setup_logging() -> None:
    """Log the package's INFO messages to stderr (main() removes the handlers it added)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def discard_unfinished_run(args: argparse.Namespace) -> None:
    """A run directory this command created but never finished holds nothing a user should trust."""
    path = getattr(args, "new_run_dir", None)
    if path is not None and path.exists() and not (path / "metrics.json").exists():
        shutil.rmtree(path)


def check_launch(args: argparse.Namespace) -> None:
    """Under torchrun only `w2d select` splits its work; any other command would run N times over."""
    from weights2data.distributed import Layout

    if Layout.from_env().sharded and args.func is not cmd_select:
        raise W2DError(
            f"w2d {args.command} runs in one process; only w2d select shards the corpus across "
            "torchrun's ranks (launch this command without torchrun)"
        )


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    before = list(log.handlers)
    setup_logging()
    try:
        check_launch(args)
        return args.func(args)
    except W2DError as exc:
        print(f"w2d: error: {exc}", file=sys.stderr)
        discard_unfinished_run(args)
        return 2
    except KeyboardInterrupt:
        print("w2d: interrupted; finished cache chunks are kept and the next run resumes", file=sys.stderr)
        return 130
    finally:
        for handler in [h for h in log.handlers if h not in before]:
            log.removeHandler(handler)
            handler.close()


if __name__ == "__main__":
    sys.exit(main())
