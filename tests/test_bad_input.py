"""Every class of bad input, on every command: one line `w2d: error: ...` last on stderr, exit 2,
no traceback, and nothing left behind (no run directory, no output file, no cache entry deleted).

docs/bad-input.md quotes these messages; each row there names the case here that covers it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from weights2data.cli import main
from weights2data.data import make_label_set
from weights2data.models import load_model, save_model
from weights2data.train import Task

AG_NEWS = ["World", "Sports", "Business", "Sci/Tech"]
FILES = {  # written into the working directory of every case
    "notext.csv": "body,label\nhello world,0\nanother one,1\n",
    "numtext.csv": "text,label\n123,0\n456,1\n",
    "data.txt": "hello\n",
    "broken.jsonl": '{"text": "a"\n',
    "empty.csv": "text,label\n",
    "blank.csv": 'text,label\n"   ",0\n"",1\n',
    "neglabels.csv": "text,label\na b,0\nc d,-1\ne f,1\n",
    "nanlabels.jsonl": '{"text": "a b", "label": 0}\n{"text": "c d", "label": NaN}\n',
    "emptylabel.csv": "text,label\na b,0\nc d,\n",
    "fraclabels.csv": "text,label\na b,0.5\nc d,1\n",
    "strlabels/train.jsonl": '{"text": "a b", "label": "pos"}\n{"text": "c d", "label": "meh"}\n',
    "strlabels/labels.json": '["pos", "neg"]',
    "outids/train.jsonl": '{"text": "a b", "label": 0}\n{"text": "c d", "label": 5}\n',
    "outids/labels.json": '["pos", "neg"]',
    "badlabels/train.jsonl": '{"text": "a b", "label": 0}\n',
    "badlabels/labels.json": '{"0": "pos"',
    "multitok/train.jsonl": '{"text": "a b", "label": 0}\n{"text": "c d", "label": 1}\n',
    "multitok/labels.json": '["very positive review", "extremely negative review"]',
    "unknown_key.toml": "[select]\nkk = 3\n",
    "wrong_type.toml": '[select]\nk = "ten"\n',
    "syntax.toml": "[select\nk = 3\n",
    "unknown_table.toml": "[selector]\nk = 3\n",
    "nested.toml": "[select]\n[select.inner]\nk = 3\n",
    "not_table.toml": "data = 3\n",
    "label_set.toml": '[select]\nlabel_set = "A,B"\n',
    "taken.txt": "a file where a folder should go\n",
    "notrun/notes.txt": "not a run\n",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    """A classifier and an LM saved by weights2data (tiny-test:1 with metadata), and broken copies."""
    root = tmp_path_factory.mktemp("models")
    tiny = load_model("tiny-test:1", cache=cache)
    label_set = make_label_set(AG_NEWS, tiny.tokenizer)
    save_model(tiny, root / "classifier", {"task": Task("classification", 32, label_set).to_dict()})
    save_model(tiny, root / "lm", {"task": Task("lm", 32).to_dict()})
    for name, drop in [
        ("no-config", ["config.json"]),
        ("no-weights", ["model.safetensors"]),
        ("no-tokenizer", ["tokenizer.json", "tokenizer_config.json"]),
        ("pickle", ["model.safetensors"]),
    ]:
        shutil.copytree(root / "classifier", root / name)
        for file in drop:
            (root / name / file).unlink()
    torch.save(tiny.model.state_dict(), root / "pickle" / "pytorch_model.bin")
    narrow = LlamaConfig.from_dict(
        {**tiny.model.config.to_dict(), "hidden_size": 32, "intermediate_size": 64}
    )
    AutoModelForCausalLM.from_config(narrow).save_pretrained(root / "narrow")
    tiny.tokenizer.save_pretrained(root / "narrow")
    return root


@pytest.fixture
def workdir(cli_env: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The CLI environment with the bad files in its working directory, and the hub offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, content in FILES.items():
        (cli_env / name).parent.mkdir(exist_ok=True)
        (cli_env / name).write_text(content)
    (cli_env / "garbage.parquet").write_bytes(b"not parquet at all")
    return cli_env


def refused(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run `w2d argv`; check it fails cleanly and return its error line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert [line for line in lines if line.startswith("w2d: error: ")] == [lines[-1]], err
    return lines[-1]


def assert_nothing_left(workdir: Path) -> None:
    runs = workdir / "runs"
    assert not runs.exists() or list(runs.iterdir()) == []


FT = ["finetune", "--model", "tiny-test", "--dataset"]
EV = ["evaluate", "--dataset", "ag_news", "--max-eval-rows", "8", "--model"]
EV_TINY = [*EV, "tiny-test"]
SEL = ["select", "--base", "tiny-test", "--corpus", "wiki_passages_60", "-k", "6", "--finetuned"]
SEL_CLS = [*SEL, "{models}/classifier"]
SEL_LM = [*SEL, "{models}/lm"]
RUN = ["run", "--model", "tiny-test", "--dataset", "ag_news_32", "--select_seed_dataset", "wiki_passages_60"]
RUN += ["-k", "6", "--train-scope", "head", "--eval-epochs", "1", "--max-eval-rows", "8", "--skip-similarity"]
GEN = ["generate", "--base", "tiny-test", "-n", "2", "--finetuned"]

# (case id: argv, a fragment of the error line); docs/bad-input.md has one row per case
CASES = {
    # dataset names
    "unknown dataset": ([*FT, "no_such_data"], "unknown dataset 'no_such_data': not a file or directory"),
    "N too large": ([*FT, "ag_news_999999"], "asked for 999999 rows but ag_news has"),
    "N zero": ([*FT, "ag_news_0"], "ag_news_0: the number of rows must be at least 1"),
    "N negative": ([*FT, "ag_news_-5"], "ag_news_-5: the number of rows must be at least 1"),
    "empty dataset name": ([*FT, ""], "empty dataset name"),
    "missing data directory": ([*FT, "ag_news_10", "--data-dir", "no/such/dir"], "is not a folder"),
    # files
    "missing file": ([*FT, "missing.csv"], "dataset file not found: missing.csv"),
    "unsupported file type": (
        [*FT, "data.txt"],
        "data.txt: unsupported file type (use parquet, csv or jsonl)",
    ),
    "not parquet": ([*FT, "garbage.parquet"], "garbage.parquet: could not read the file"),
    "broken jsonl": ([*FT, "broken.jsonl"], "broken.jsonl: could not read the file: JSON parse error"),
    "header only": ([*FT, "empty.csv"], "empty.csv: the training split is empty"),
    "blank texts only": ([*FT, "blank.csv"], "blank.csv: the training split is empty"),
    "broken labels.json": ([*FT, "badlabels"], "labels.json: could not read the label names"),
    # columns
    "no text column": ([*FT, "notext.csv"], "no text column 'text' (columns: body, label)"),
    "text column typo": ([*FT, "ag_news_10", "--text-column", "body"], "no text column 'body'"),
    "label column typo": ([*FT, "ag_news_10", "--label-column", "topic"], "no label column 'topic'"),
    "numbers as text": (
        [*FT, "numtext.csv"],
        "the text column 'text' holds int values such as 123, not text",
    ),
    # labels
    "string labels not in labels.json": ([*FT, "strlabels"], "labels ['meh'] are not in the label set"),
    "negative labels": (
        [*FT, "neglabels.csv"],
        "label ids must lie in 0..1 (labels: ['0', '1']); found [-1]",
    ),
    "NaN labels": ([*FT, "nanlabels.jsonl"], "the label column has missing values"),
    "empty label cell": ([*FT, "emptylabel.csv"], "the label column has missing values"),
    "fractional labels": ([*FT, "fraclabels.csv"], "labels must be integer ids or names (strings), not 0.5"),
    "ids beyond labels.json": (
        [*FT, "outids"],
        "label ids must lie in 0..1 (labels: ['pos', 'neg']); found [5]",
    ),
    "multi-token label names": (
        [*FT, "multitok", "--verbalizer", "names"],
        "every label word must be a single token",
    ),
    "verbalizer typo": ([*FT, "ag_news_10", "--verbalizer", "lettrs"], "unknown verbalizer 'lettrs'"),
    "verbalizer count": ([*FT, "ag_news_10", "--verbalizer", "A,B"], "the verbalizer lists 2 tokens"),
    "train labels differ from the test set's": (
        ["train-eval", "--model", "tiny-test", "--train", "imdb_32", "--dataset", "ag_news"],
        "dataset 'imdb_32' has the labels ['neg', 'pos'], but the task's are",
    ),
    "unlabelled training set": (
        ["train-eval", "--model", "tiny-test", "--train", "wiki_passages_10", "--dataset", "ag_news"],
        "dataset 'wiki_passages_10' has no labels, but the task is classification",
    ),
    "model labels differ from the dataset's": (
        ["evaluate", "--model", "{models}/classifier", "--dataset", "imdb", "--max-eval-rows", "8"],
        "dataset 'imdb' has the labels ['neg', 'pos'], but the task's are",
    ),
    # --label-set
    "label set typo": ([*SEL_CLS, "--label-set", "ag_nwes"], "unknown dataset 'ag_nwes'"),
    "label set unlike the model's": (
        [*SEL_CLS, "--label-set", "A,B"],
        "but the finetuned model was trained on",
    ),
    "label set with an empty entry": ([*SEL, "tiny-test:1", "--label-set", "A,,B"], "has an empty entry"),
    "label set of several-token words": (
        [*SEL, "tiny-test:1", "--label-set", "World,Sci/Tech"],
        "'Sci/Tech' -> ' Sci/Tech' is 3 tokens",
    ),
    "label set of an unlabelled dataset": (
        [*SEL, "tiny-test:1", "--label-set", "wiki_passages"],
        "--label-set wiki_passages: that dataset has no labels",
    ),
    "no label set at all": ([*SEL, "tiny-test:1"], "classification selection needs a label set"),
    # k
    "k larger than the corpus": ([*SEL_CLS, "-k", "100"], "k = 100 is larger than the corpus (60 documents)"),
    "k zero": ([*SEL_CLS, "-k", "0"], "k must be at least 1 (got 0)"),
    # TOML
    "TOML unknown key": ([*EV_TINY, "--config", "unknown_key.toml"], "unknown key(s) in [select]: kk"),
    "TOML wrong type": (
        [
            "select",
            "--base",
            "tiny-test",
            "--finetuned",
            "{models}/classifier",
            "--corpus",
            "wiki_passages_60",
        ]
        + ["--config", "wrong_type.toml"],
        "k must be an int (got 'ten')",
    ),
    "TOML syntax error": ([*EV_TINY, "--config", "syntax.toml"], "could not read config file syntax.toml"),
    "TOML unknown table": ([*EV_TINY, "--config", "unknown_table.toml"], "unknown section(s) in"),
    "TOML nested table": ([*EV_TINY, "--config", "nested.toml"], "unknown key(s) in [select]: inner"),
    "TOML key outside a table": ([*EV_TINY, "--config", "not_table.toml"], "data must be a table"),
    "TOML file missing": ([*EV_TINY, "--config", "missing.toml"], "could not read config file missing.toml"),
    # models
    "unknown model": ([*EV, "no-such-model-w2d"], "unknown model 'no-such-model-w2d'"),
    "hub name offline": ([*EV, "gpt2"], "the Hugging Face hub is unreachable"),
    "missing model directory": ([*EV, "./no/such/model"], "model directory not found: ./no/such/model"),
    "bad tiny-test seed": ([*EV, "tiny-test:x"], "bad model 'tiny-test:x'"),
    "no config.json": ([*EV, "{models}/no-config"], "is not a Hugging Face model directory (no config.json)"),
    "no weights": ([*EV, "{models}/no-weights"], "holds no weights (expected model.safetensors)"),
    "pickle only": ([*EV, "{models}/pickle"], "holds only pickle checkpoints (pytorch_model.bin)"),
    "no tokenizer": ([*EV, "{models}/no-tokenizer"], "has no tokenizer files (tokenizer.json"),
    "different architectures": (
        [*SEL, "{models}/narrow", "--label-set", "A,B"],
        "base and finetuned models do not match: config hidden_size: base 64 vs finetuned 32",
    ),
    "same weights twice (select)": (
        [*SEL, "tiny-test", "--label-set", "A,B"],
        "the finetuned weights equal the base weights",
    ),
    "same weights twice (generate)": ([*GEN, "tiny-test"], "contrasting a model with itself"),
    # devices
    "device nonsense": ([*EV_TINY, "--device", "nonsense"], "unknown device 'nonsense'"),
    "device of an unsupported kind": ([*EV_TINY, "--device", "meta"], "unsupported device 'meta'"),
    # disk
    "results dir is a file": (
        [*EV_TINY, "--results-dir", "taken.txt"],
        "a file stands where a folder is needed: choose another folder",
    ),
    "cache dir is a file": (
        [*EV_TINY, "--cache-dir", "taken.txt"],
        "could not write taken.txt: a file stands",
    ),
    "run name with a slash": ([*EV_TINY, "--exp-name", "../elsewhere"], "exp_name must be a folder name"),
    # option combinations the config refuses
    "path-combine sum with grad-blocks": (
        [*SEL_CLS, "--path-combine", "sum", "--grad-blocks", "1", "--pseudo-experts", "2"],
        "--path-combine sum joins head gradients only",
    ),
    "rounds larger than k": ([*SEL_CLS, "--rounds", "10"], "rounds must be between 1 and k = 6 (got 10)"),
    "label prior of the wrong length": (
        [*SEL_CLS, "--strategy", "topk_balanced", "--label-prior", "1,2"],
        "--label-prior gives 2 weights for 4 labels",
    ),
    "label prior malformed": ([*SEL_CLS, "--label-prior", "1,x"], "label_prior must be uniform, predicted"),
    "pseudo-experts zero": ([*SEL_CLS, "--pseudo-experts", "0"], "pseudo_experts must be at least 1 (got 0)"),
    "precondition nonsense": ([*SEL_CLS, "--precondition", "nonsense"], "unknown precondition 'nonsense'"),
    "batch-reset zero": ([*SEL_CLS, "--batch-reset", "0"], "batch_reset must be at least 1 (got 0)"),
    "balanced strategy in LM mode": (
        [*SEL_LM, "--strategy", "topk_balanced"],
        "topk_balanced balances labels",
    ),
    "random labels in LM mode": ([*SEL_LM, "--labels", "random"], "--labels random labels the picks"),
    "preconditioner in LM mode": (
        [*SEL_LM, "--precondition", "adam"],
        "--precondition adam rescales classification head gradients",
    ),
    "label set in LM mode": ([*SEL_LM, "--label-set", "A,B"], "--label-set A,B labels the picks"),
    "per-document loss drop for a classifier": (
        [*SEL_CLS, "--strategy", "loss_drop", "--loss-drop-per", "document"],
        "a classifier's loss drop has one label token",
    ),
    "generation per label in LM mode": (
        [*SEL_LM, "--generate", "2", "--generate-per-label"],
        "--generate-per-label needs a classifier's label set",
    ),
    "no strategy": ([*RUN, "--strategies", ""], "strategies names no strategy"),
    "label set for w2d run": ([*RUN, "--config", "label_set.toml"], "--label-set is for w2d select"),
    "generate nothing": ([*GEN, "{models}/lm", "-n", "0"], "w2d generate needs -n N"),
    "missing openings file": ([*GEN, "{models}/lm", "--prefixes", "no/openings.txt"], "no such file"),
    # report, similarity, cache
    "report on a folder that is not a run": (["report", "notrun"], "notrun: not a w2d run directory"),
    "report on a missing folder": (["report", "missing"], "missing: not a directory"),
    "report with nothing to report": (["report"], "give a RUN_DIR written by `w2d run`, or --defences FILE"),
    "report --defences on other results": (
        ["report", "--defences", "data.txt"],
        "--defences data.txt: could not read it as JSON",
    ),
    "similarity of an empty set": (["similarity", "empty.csv", "ag_news_10"], "the training split is empty"),
    "similarity with --max-docs 0": (
        ["similarity", "ag_news_10", "ag_news_10", "--max-docs", "0"],
        "max_docs",
    ),
    "prune with negative age": (
        ["cache", "prune", "--older-than", "-1"],
        "--older-than takes a number of days",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case: str, workdir: Path, models: Path, capsys: pytest.CaptureFixture) -> None:
    argv, expected = CASES[case]
    line = refused([arg.format(models=models) for arg in argv], capsys)
    assert expected in line
    assert_nothing_left(workdir)
    assert not (workdir / "notrun" / "report").exists()


def test_cuda_without_a_gpu(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    if torch.cuda.is_available():
        line = refused([*EV_TINY, "--device", f"cuda:{torch.cuda.device_count()}"], capsys)
        assert f"this machine has {torch.cuda.device_count()} GPU(s)" in line
    else:
        assert "--device cuda was asked for but no GPU is available" in refused(
            [*EV_TINY, "--device", "cuda"], capsys
        )
    assert_nothing_left(workdir)


def test_hub_name_fails_fast(cli_env: Path, hub_offline: None, capsys: pytest.CaptureFixture) -> None:
    started = time.monotonic()
    line = refused(
        ["select", "--base", "gpt2", "--finetuned", "gpt2", "--corpus", "wiki_passages_60", "-k", "6"], capsys
    )
    assert "unknown model 'gpt2'" in line and "the Hugging Face hub is unreachable" in line
    assert time.monotonic() - started < 20  # the hub client alone would retry for ~25 s
    assert_nothing_left(cli_env)


def test_unwritable_results_dir(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc, where no folder can be made")
    assert "could not write /proc/w2d-runs/" in refused([*EV_TINY, "--results-dir", "/proc/w2d-runs"], capsys)


def test_pickle_loads_with_allow_pickle(workdir: Path, models: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([*EV, str(models / "pickle"), "--allow-pickle", "--exp-name", "ok"]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_a_finished_run_is_kept(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    """The same command again (on any device) reuses its run directory; other settings may not
    overwrite its results."""
    argv = [*EV_TINY, "--exp-name", "ev"]
    assert main(argv) == 0
    assert main([*argv, "--device", "cpu"]) == 0  # where it runs is not part of a run's identity
    run = workdir / "runs" / "ev"
    config, metrics = (run / "config.json").read_text(), (run / "metrics.json").read_text()
    line = refused([*argv, "--max-eval-rows", "4"], capsys)
    assert "runs/ev holds a finished run of another command or other settings" in line
    assert (run / "config.json").read_text() == config and (run / "metrics.json").read_text() == metrics
    assert json.loads(config)["runtime"]["device"] == "cpu"


def test_whole_float_labels_are_ids(workdir: Path) -> None:
    """Not bad input: a float column of whole numbers (pandas' integers with gaps) holds ids."""
    from weights2data.data import load_dataset

    (workdir / "floats.jsonl").write_text('{"text": "a b", "label": 1.0}\n{"text": "c d", "label": 0.0}\n')
    dataset = load_dataset("floats.jsonl")
    assert dataset.train.labels.tolist() == [1, 0] and dataset.label_names == ["0", "1"]
