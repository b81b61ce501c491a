"""Recovery from models weights2data did not train: a Trainer-built classifier and a peft LoRA adapter.

Two experts are finetuned from the base on NAME_<train-rows> with plain `transformers.Trainer`
(not weights2data's trainer), the usual way: each review in a prompt template, the label as a
word after it (" negative" / " positive"), right padding, and the model's own cross-entropy over
the full vocabulary on the label position only (labels -100 elsewhere):
- `trainer`: the head untied from the embeddings, every block but the top --top-blocks frozen
  (a top:N-like finetune, sized for a CPU);
- `lora`: a peft LoRA adapter (r 8, alpha 16, q_proj and v_proj of every block, learning rate 5e-4),
  the head frozen; the `trainer` expert learns at 1e-4 (AdamW, constant, batch 16).
Neither directory holds weights2data metadata. Then, through the `w2d` commands a user runs:
1. `w2d inspect`: does it find the label tokens (and the train scope)?
2. `w2d select` with the template and without it (the original's plain format), for greedy,
   topk and random, --label-loss full, on every seed;
3. `w2d train-eval`: the base trained on each selection (weights2data's trainer, the top
   --top-blocks blocks and the head, in the template), scored on the test split; next to the base
   trained the same way on NAME_<train-rows> (true rows, drawn with each seed: the expert row of
   the closure) and to the Trainer expert itself (`w2d evaluate`). Seeds vary the selection
   (random picks) and the training; the experts are trained once, with --expert-seed.
4. `--variants "--grad-at base; --grad-at both"`: extra `w2d select` flags, each measured as one
   more line per `--variant-strategies` strategy (greedy unless told; with the template) on every
   seed. `--strategies auto` is what a user gets by default (balanced greedy for two labels under
   the full-vocabulary loss).
`--experts`, `--strategies` and `--formats` narrow the run (say `--strategies greedy,random
--formats template` to measure the variants against their baselines alone); `--expert-epochs` trains
the experts longer and `--max-grad-norm` sets Trainer's gradient clipping (its default, 1.0; 0 turns
it off), `--expert-seed` its seed (the order of the rows; 0 unless told): give such a run its own
`--work-dir`, as an expert directory there is reused as it is.

    python benchmarks/foreign_finetune.py --quick   # minutes: tiny-test model, tiny sizes
    python benchmarks/foreign_finetune.py           # smollm2-135m; hours on a 2-core CPU (see README)

Results: benchmarks/results/foreign_finetune.json (--quick: foreign_finetune_quick.json), strict
JSON, rewritten after every step with `complete: false` until the last one.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from quality import confidence_figures, format_figure, seed_statistics
from weights2data.cli import main as w2d
from weights2data.data import data_dir, load_dataset
from weights2data.errors import exit_on_error
from weights2data.experiment import closure
from weights2data.models import decoder_layers, load_model, untie_head
from weights2data.store import cache_dir, read_json, write_json

RESULTS = Path(__file__).resolve().parent / "results"
TEMPLATE = "Review: {text}\nSentiment:"
WORDS = ("negative", "positive")  # labels 0 and 1 of the sentiment sets
SENTIMENT = ("rotten_tomatoes", "imdb")  # the datasets whose labels WORDS names
FULL = dict(
    model="smollm2-135m",
    dataset="rotten_tomatoes",
    train_rows=1000,
    corpus="wiki_passages_2000",
    k=100,
    seq_len=64,
    top_blocks=4,
    seeds="0,1,2",
    expert_epochs=1,
    max_grad_norm=1.0,
    expert_seed=0,
    eval_epochs=5,
    max_eval_rows=512,
    experts="trainer,lora",
    strategies="greedy,topk,random",
    formats="template,plain",
    variants="",
    variant_strategies="greedy",
)
QUICK = FULL | dict(
    model="tiny-test", train_rows=64, corpus="wiki_passages_120", k=16, seq_len=32, top_blocks=1, seeds="0",
    eval_epochs=2, max_eval_rows=64,
)  # fmt: skip


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="minutes on a CPU: " + json.dumps(QUICK))
    for name, value in FULL.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=None, help=f"default {value}")
    p.add_argument(
        "--out", default=None, help="results file (default: results/foreign_finetune[_quick].json)"
    )
    p.add_argument("--work-dir", default="runs/foreign", help="experts and w2d run directories")
    args = p.parse_args()
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name, choices in (("experts", ("trainer", "lora")), ("formats", ("template", "plain"))):
        given = getattr(args, name)
        if not set(given.split(",")) <= set(choices):
            p.error(f"--{name} takes {' and/or '.join(choices)}, comma-separated, not {given!r}")
    if args.dataset not in SENTIMENT:
        p.error(
            f"--dataset takes {' or '.join(SENTIMENT)} (label 0 negative, 1 positive), not {args.dataset!r}"
        )
    if "random" not in args.strategies.split(","):
        p.error("--strategies must include random: every closure is against that seed's random selection")
    args.out = args.out or str(
        RESULTS / ("foreign_finetune_quick.json" if args.quick else "foreign_finetune.json")
    )
    return args


# ---------------------------------------------------------------- the experts, trained with Trainer


def examples(tokenizer, texts: list[str], labels: list[int], seq_len: int) -> list[dict]:
    """Prompt + label word per row; the text is cut from its start to fit; loss on the label only."""
    before, after = TEMPLATE.split("{text}")
    room = seq_len - 1 - len(tokenizer.encode(before + after, add_special_tokens=False))
    words = [tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in WORDS]
    rows = []
    for text, label in zip(texts, labels, strict=True):
        ids = tokenizer.encode(text, add_special_tokens=False)
        prompt = before + (tokenizer.decode(ids[-room:]) if len(ids) > room else text) + after
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        rows.append(
            {"input_ids": prompt_ids + [words[label]], "labels": [-100] * len(prompt_ids) + [words[label]]}
        )
    return rows


def collate(pad_id: int):
    def pad(batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in batch)
        out = {"input_ids": [], "labels": [], "attention_mask": []}
        for row in batch:
            gap = width - len(row["input_ids"])
            out["input_ids"].append(row["input_ids"] + [pad_id] * gap)
            out["labels"].append(row["labels"] + [-100] * gap)
            out["attention_mask"].append([1] * len(row["input_ids"]) + [0] * gap)
        return {key: torch.tensor(value) for key, value in out.items()}

    return pad


def train_expert(args: argparse.Namespace, kind: str, path: Path) -> dict:
    """Finetune the base with transformers.Trainer and save it (`trainer`: a model directory with its
    tokenizer; `lora`: an adapter directory alone). An expert already saved is reused, with the
    training time and loss recorded beside it when it was made."""
    record = path.parent / f"{path.name}-training.json"
    if (path / ("adapter_config.json" if kind == "lora" else "config.json")).exists():
        made = read_json(record) if record.exists() else {}
        return {"path": str(path), **made, "reused": True}
    base = load_model(args.model, cache=cache_dir())
    model, tokenizer = copy.deepcopy(base.model), base.tokenizer
    train = load_dataset(f"{args.dataset}_{args.train_rows}", data_dir=data_dir()).train
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        lr = 5e-4
    else:
        untie_head(model)
        model.requires_grad_(False)
        for module in (*decoder_layers(model)[-args.top_blocks :], model.model.norm, model.lm_head):
            module.requires_grad_(True)
        lr = 1e-4
    settings = TrainingArguments(
        output_dir=str(path.parent / f".{kind}-trainer"), per_device_train_batch_size=16,
        num_train_epochs=args.expert_epochs, learning_rate=lr, lr_scheduler_type="constant",
        seed=args.expert_seed, max_grad_norm=args.max_grad_norm, save_strategy="no", report_to=[],
        logging_steps=10, remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
    )  # fmt: skip
    rows = examples(tokenizer, train.texts, train.labels.tolist(), args.seq_len)
    started = time.time()
    trainer = Trainer(
        model=model, args=settings, train_dataset=rows, data_collator=collate(tokenizer.pad_token_id)
    )
    history = trainer.train()
    model.save_pretrained(path)
    if kind != "lora":  # an adapter directory usually holds no tokenizer: weights2data lends the base's
        tokenizer.save_pretrained(path)
    made = {
        "train_s": round(time.time() - started, 1),
        "train_loss": history.training_loss,
        # the gradient norm before clipping, every logging_steps steps: how often --max-grad-norm bit
        "grad_norms": [round(log["grad_norm"], 3) for log in trainer.state.log_history if "grad_norm" in log],
    }
    write_json(record, made)
    return {"path": str(path), **made}


# ---------------------------------------------------------------- the w2d commands


def run(argv: list[str]) -> None:
    print("\n$ w2d " + shlex.join(argv), flush=True)
    if w2d(argv) != 0:
        raise SystemExit(f"w2d {argv[0]} failed")


def read(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / name).read_text())


def task_flags(args: argparse.Namespace) -> list[str]:
    return ["--seq-len", str(args.seq_len), "--label-loss", "full", "--verbalizer", ",".join(WORDS)]


def measure(args: argparse.Namespace, kind: str, expert: dict, out: dict, save) -> None:
    """inspect, evaluate, then select and train-eval each strategy, template variant and seed."""
    work = Path(args.work_dir)
    common = ["--results-dir", str(work), "--seq-len", str(args.seq_len)]
    template = ["--template", TEMPLATE]
    pair = ["--base", args.model, "--finetuned", expert["path"]]
    run(["inspect", *pair, "--corpus", args.corpus, *template, *common, "--exp-name", f"{kind}-inspect"])
    report = read(work / f"{kind}-inspect", "inspect.json")
    found = sorted((report["label_set"] or "").split(",")) == sorted(WORDS)
    expert["inspect"] = {key: report[key] for key in ("scope", "task", "label_set", "label_count")} | {
        "found_labels": found
    }
    if kind == "trainer":
        evaluate = [
            "evaluate",
            "--model",
            expert["path"],
            "--dataset",
            args.dataset,
            *template,
            *task_flags(args),
        ]
        run(
            [
                *evaluate,
                "--max-eval-rows",
                str(args.max_eval_rows),
                "--results-dir",
                str(work),
                "--exp-name",
                "trainer-eval",
            ]
        )
        expert["evaluate"] = read(work / "trainer-eval", "metrics.json")
    save()
    for seed in [int(s) for s in args.seeds.split(",")]:
        for templated in [fmt == "template" for fmt in args.formats.split(",")]:
            for strategy in args.strategies.split(","):
                select_and_score(args, kind, expert, templated, strategy, seed, "", out)
                save()
        for variant in filter(None, (v.strip() for v in args.variants.split(";"))):
            for strategy in args.variant_strategies.split(","):
                select_and_score(args, kind, expert, True, strategy, seed, variant, out)
                save()


def select_and_score(
    args: argparse.Namespace,
    kind: str,
    expert: dict,
    templated: bool,
    strategy: str,
    seed: int,
    variant: str,
    out: dict,
) -> None:
    """`w2d select` (with the template or without; `variant`: extra select flags) then train-eval."""
    work = Path(args.work_dir)
    slug = "".join(c if c.isalnum() else "-" for c in variant).strip("-")
    name = "-".join(filter(None, (kind, "template" if templated else "plain", strategy, slug, str(seed))))
    select = ["select", "--base", args.model, "--finetuned", expert["path"], "--corpus", args.corpus]
    select += ["-k", str(args.k), "--strategy", strategy, "--seed", str(seed), "--label-set", ",".join(WORDS)]
    select += [
        "--label-loss",
        "full",
        *(["--template", TEMPLATE] if templated else []),
        *shlex.split(variant),
    ]
    run([*select, "--results-dir", str(work), "--seq-len", str(args.seq_len), "--exp-name", name])
    summary = read(work / name, "summary.json")
    scores = train_eval(args, work / name / "selection.parquet", seed, f"{name}-te")
    out["rows"].append(
        {"expert": kind, "template": templated, "select": variant, "strategy": strategy, "seed": seed,
         "k": args.k, "objective_cos": summary["objective_cos"], "features_s": summary.get("features_s"),
         "label_distribution": summary["label_distribution"], **confidence_figures(summary), **scores}
    )  # fmt: skip


def train_eval(args: argparse.Namespace, train: str | Path, seed: int, name: str) -> dict:
    """The base trained on `train` by w2d train-eval, in the template; both figures."""
    work = Path(args.work_dir)
    argv = ["train-eval", "--model", args.model, "--train", str(train), "--dataset", args.dataset]
    argv += ["--template", TEMPLATE, *task_flags(args), "--train-scope", f"top:{args.top_blocks}"]
    argv += ["--eval-epochs", str(args.eval_epochs), "--max-eval-rows", str(args.max_eval_rows)]
    run([*argv, "--seed", str(seed), "--results-dir", str(work), "--exp-name", name])
    metrics = read(work / name, "metrics.json")
    return {key: metrics[key] for key in ("best_epoch_test", "val_selected_test")}


FIGURES = ("best_epoch_test", "val_selected_test")
CLOSURES = tuple(f"closure_{figure}" for figure in FIGURES)
CONFIDENCES = ("picked_confidence", "corpus_confidence")


def summarise(data: dict) -> list[dict]:
    """Mean ± std over seeds per expert, template and strategy, and of the true rows (the `truth`
    entry, which every expert's row shares). Each seed's closure is against that seed's random
    selection (same expert and format) and its true-rows row; undefined where they tie."""
    truth = {row["seed"]: row for row in data["truth"]}
    randoms = {(r["expert"], r["template"], r["seed"]): r for r in data["rows"] if r["strategy"] == "random"}
    groups: dict[tuple, list[dict]] = {}
    for row in data["rows"]:
        row = dict(row)
        random = randoms.get((row["expert"], row["template"], row["seed"]))
        if row["strategy"] != "random" and random is not None and row["seed"] in truth:
            for figure in FIGURES:
                row[f"closure_{figure}"] = closure(row[figure], random[figure], truth[row["seed"]][figure])
        key = (row["expert"], row["template"], row.get("select", ""), row["strategy"])
        groups.setdefault(key, []).append(row)
    summary = []
    if data["truth"]:
        entry = {
            "expert": "-",
            "template": "-",
            "select": "-",
            "strategy": "truth",
            "seeds": len(data["truth"]),
        }
        summary.append(entry | seed_statistics(data["truth"], FIGURES))
    for (kind, templated, select, strategy), members in groups.items():
        entry = {"expert": kind, "template": templated, "select": select, "strategy": strategy}
        entry["seeds"] = len(members)
        summary.append(entry | seed_statistics(members, FIGURES + CLOSURES + CONFIDENCES))
    return summary


def markdown(out: dict) -> str:
    lines = [
        "| expert | format | select flags | strategy | honest accuracy | closure (honest) | seeds |",
        "| --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    for e in out["summary"]:
        fmt = {True: "template", False: "plain"}.get(e["template"], "-")
        accuracy = format_figure(e, "val_selected_test", 100, 1)
        lines.append(
            f"| {e['expert']} | {fmt} | {e['select'] or 'default'} | {e['strategy']} | {accuracy} | "
            f"{format_figure(e, 'closure_val_selected_test', 1, 2)} | {e['seeds']} |"
        )
    for kind, expert in out["experts"].items():
        lines.append(f"\n{kind}: inspect found the labels: {expert.get('inspect', {}).get('found_labels')}")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    started = time.time()
    work = Path(args.work_dir)
    out = {"args": vars(args), "complete": False, "experts": {}, "truth": [], "rows": [], "summary": []}

    def save() -> None:  # strict JSON: a NaN (an empty split's loss, say) is written as null
        out["seconds"] = round(time.time() - started, 1)
        out["summary"] = summarise(out)
        write_json(Path(args.out), json.loads(json.dumps(out), parse_constant=lambda _: None))

    for seed in [int(s) for s in args.seeds.split(",")]:
        truth = train_eval(args, f"{args.dataset}_{args.train_rows}", seed, f"truth-{seed}")
        out["truth"].append({"seed": seed, **truth})
        save()
    for kind in args.experts.split(","):
        out["experts"][kind] = train_expert(args, kind, work / f"expert-{kind}")
        save()
        measure(args, kind, out["experts"][kind], out, save)
    out["complete"] = True
    save()
    print(markdown(out) + f"\n\nwritten {args.out} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    exit_on_error(main)
