"""Select → retrain rounds on a tiny model: sizes, students, resuming after a kill."""

from __future__ import annotations

import copy
import json

import pyarrow.parquet as pq
import pytest
import torch

from test_recover import TEXTS
from weights2data import rounds as rounds_module
from weights2data.cli import main
from weights2data.config import DataConfig, FinetuneConfig, SelectConfig
from weights2data.data import Split, make_label_set
from weights2data.errors import W2DError
from weights2data.models import LoadedModel, tiny_test_model
from weights2data.recover import corpus_gradients, recover
from weights2data.rounds import recover_in_rounds, round_sizes
from weights2data.train import Task, finetune

DATA = DataConfig(seq_len=16)


class Killed(Exception):
    """Stands for the process being killed."""


STUDENT = FinetuneConfig(train_scope="full", lr=1e-3, steps=2, batch_size=4)


@pytest.fixture(scope="module")
def setting(cache):
    base = tiny_test_model(cache, seed=0)
    label_set = make_label_set(["a", "b", "c"], base.tokenizer, "letters")
    task = Task("classification", DATA.seq_len, label_set)
    finetuned = LoadedModel(copy.deepcopy(base.model), base.tokenizer, "tiny-finetuned")
    finetune(finetuned, Split(TEXTS, torch.arange(len(TEXTS)).numpy() % 3), task, STUDENT)
    return base, finetuned, task


def test_round_sizes() -> None:
    assert round_sizes(10, 3) == [4, 3, 3] and round_sizes(5, 1) == [5] and sum(round_sizes(100, 7)) == 100
    with pytest.raises(W2DError):
        round_sizes(3, 4)


def test_one_round_is_a_plain_selection(setting, tmp_path) -> None:
    base, finetuned, task = setting
    cfg = SelectConfig(k=5)
    grads = corpus_gradients(base, finetuned, TEXTS, task.label_set, DATA, cfg, tmp_path)
    plain = recover(grads, TEXTS, task.label_set, cfg, "greedy", progress=False)
    once = recover_in_rounds(base, finetuned, TEXTS, task, DATA, cfg, STUDENT, "greedy", tmp_path, grads)
    assert once.rows.tolist() == plain.rows.tolist()


def test_later_rounds_use_the_students_gradients(setting, tmp_path) -> None:
    base, finetuned, task = setting
    cfg = SelectConfig(k=6, rounds=2)
    out = recover_in_rounds(base, finetuned, TEXTS, task, DATA, cfg, STUDENT, "greedy", tmp_path)
    rows = out.rows.tolist()
    assert len(rows) == len(set(rows)) == 6 and [r["k"] for r in out.summary["rounds"]] == [3, 3]
    assert 0.5 <= out.summary["label_confidence"]["picked"] <= 1  # two labels: the argmax's probability
    # round 2 is greedy over the gradients at a student trained on round 1's picks, against θs − θ1
    first = corpus_gradients(base, finetuned, TEXTS, task.label_set, DATA, cfg, tmp_path)
    student = LoadedModel(copy.deepcopy(base.model), base.tokenizer, "student")
    finetune(student, Split([TEXTS[i] for i in rows[:3]], first.labels[rows[:3]].numpy()), task, STUDENT)
    at_student = SelectConfig(k=6, grad_at="base")
    grads = corpus_gradients(student, finetuned, TEXTS, task.label_set, DATA, at_student, tmp_path)
    again = recover(grads, TEXTS, task.label_set, SelectConfig(k=3), "greedy", False, torch.tensor(rows[:3]))
    assert rows[3:] == again.rows.tolist()
    assert out.labels.tolist() == first.labels[rows].tolist()  # labels stay the finetuned model's


def test_a_killed_run_resumes_at_its_round(setting, tmp_path, monkeypatch) -> None:
    base, finetuned, task = setting
    cfg = SelectConfig(k=6, rounds=3)
    whole = recover_in_rounds(base, finetuned, TEXTS, task, DATA, cfg, STUDENT, "greedy", tmp_path / "a")
    calls: list[int] = []
    real = rounds_module.student_gradients

    def dies_in_round_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 and kill:
            raise Killed  # killed while training round 3's student
        return real(*args, **kwargs)

    monkeypatch.setattr(rounds_module, "student_gradients", dies_in_round_3)
    kill = True
    with pytest.raises(Killed):
        recover_in_rounds(base, finetuned, TEXTS, task, DATA, cfg, STUDENT, "greedy", tmp_path / "b")
    kill, calls[:] = False, []
    resumed = recover_in_rounds(base, finetuned, TEXTS, task, DATA, cfg, STUDENT, "greedy", tmp_path / "b")
    assert len(calls) == 1 and resumed.rows.tolist() == whole.rows.tolist()  # only round 3's student trained


def test_select_command_runs_rounds(cli_env) -> None:
    args = ["select", "--base", "tiny-test", "--finetuned", "tiny-test:1", "--label-set", "A,B",
            "--corpus", "wiki_passages_20", "-k", "6", "--rounds", "2", "--student-steps", "2",
            "--seq-len", "8", "--exp-name", "rounds"]  # fmt: skip
    assert main(args) == 0
    run = cli_env / "runs" / "rounds"
    assert pq.read_table(run / "selection.parquet").num_rows == 6
    summary = json.loads((run / "summary.json").read_text())
    assert [r["k"] for r in summary["rounds"]] == [3, 3] and summary["student"]["steps"] == 2
