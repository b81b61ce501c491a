"""config: validation, train scopes, TOML files and flag precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from weights2data.cli import build_config, make_parser, read_toml
from weights2data.config import (
    DataConfig,
    EvalConfig,
    FinetuneConfig,
    RunConfig,
    RuntimeConfig,
    parse_scope,
    select_overrides,
)
from weights2data.errors import W2DError


def test_defaults_are_valid_and_match_the_original() -> None:
    data, ft = DataConfig(), FinetuneConfig()
    assert (data.seq_len, data.verbalizer, data.task) == (32, "letters", "auto")
    assert (ft.optimizer, ft.lr, ft.train_scope, ft.lm_loss) == ("adam", None, "full", "full")


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_known_optimizers(optimizer: str) -> None:
    assert FinetuneConfig(optimizer=optimizer).optimizer == optimizer


def test_bad_optimizer_names_the_choices() -> None:
    with pytest.raises(W2DError, match="optimizer 'rmsprop'.*adam, adamw, sgd"):
        FinetuneConfig(optimizer="rmsprop")


@pytest.mark.parametrize("seq_len", [1, 0, -3])
def test_seq_len_below_two_is_refused(seq_len: int) -> None:
    with pytest.raises(W2DError, match="at least 2"):
        DataConfig(seq_len=seq_len)


def test_seq_len_two_is_allowed() -> None:
    assert DataConfig(seq_len=2).seq_len == 2


@pytest.mark.parametrize("scope", ["top:0", "foo", "top:", "top:-1", "top:x", "Head", "top: 2"])
def test_bad_scopes(scope: str) -> None:
    with pytest.raises(W2DError, match="train scope"):
        parse_scope(scope)
    with pytest.raises(W2DError, match="train scope"):
        FinetuneConfig(train_scope=scope)


@pytest.mark.parametrize(
    ("scope", "parsed"),
    [("full", ("full", 0)), ("head", ("head", 0)), ("top:1", ("top", 1)), ("top:12", ("top", 12))],
)
def test_parse_scope(scope: str, parsed: tuple[str, int]) -> None:
    assert parse_scope(scope) == parsed


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0},
        {"lr": -1e-3},
        {"batch_size": 0},
        {"epochs": 0},
        {"steps": 0},
        {"lm_loss": "mean"},
        {"weight_decay": -0.1},
    ],
)
def test_bad_finetune_numbers(kwargs: dict) -> None:
    with pytest.raises(W2DError):
        FinetuneConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_eval_rows": 0},
        {"eval_epochs": 0},
        {"patience": 0},
        {"val_fraction": 1.0},
        {"val_fraction": -0.1},
        {"eval_batch_size": 0},
    ],
)
def test_bad_eval_numbers(kwargs: dict) -> None:
    with pytest.raises(W2DError):
        EvalConfig(**kwargs)


def test_bad_task() -> None:
    with pytest.raises(W2DError, match="task 'regression'"):
        DataConfig(task="regression")


def _args(tmp_path: Path, toml: str, *flags: str):
    path = tmp_path / "run.toml"
    path.write_text(toml)
    args = make_parser().parse_args(["finetune", "--config", str(path), *flags])
    return args, read_toml(args)


def test_flags_beat_toml_which_beats_defaults(tmp_path: Path) -> None:
    args, toml = _args(tmp_path, "[finetune]\nlr = 0.5\nepochs = 3\n[data]\nseq_len = 16\n", "--lr", "0.1")
    ft = build_config(FinetuneConfig, args, toml)
    data = build_config(DataConfig, args, toml)
    assert ft.lr == 0.1  # flag
    assert ft.epochs == 3  # TOML
    assert ft.batch_size == 32  # default
    assert data.seq_len == 16


@pytest.mark.parametrize(
    ("toml", "match"),
    [
        ("[finetune]\nlearning_rate = 0.5\n", "unknown key.*learning_rate"),
        ("[select]\nkk = 3\n", r"unknown key.*\[select\]: kk"),  # a table `finetune` does not read
        ("[select]\n[select.inner]\nk = 3\n", "unknown key.*inner"),
        ("data = 3\n", "data must be a table"),
    ],
)
def test_toml_unknown_key_is_an_error(tmp_path: Path, toml: str, match: str) -> None:
    with pytest.raises(W2DError, match=match):
        _args(tmp_path, toml)


def test_toml_unknown_section_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[trainer]\nlr = 0.5\n")
    args = make_parser().parse_args(["finetune", "--config", str(path)])
    with pytest.raises(W2DError, match="unknown section.*trainer"):
        read_toml(args)


def test_toml_syntax_error_and_missing_file_are_w2d_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[finetune\nlr = ")
    for config in (path, tmp_path / "absent.toml"):
        args = make_parser().parse_args(["finetune", "--config", str(config)])
        with pytest.raises(W2DError, match="could not read config file"):
            read_toml(args)


@pytest.mark.parametrize(
    "toml",
    [
        '[finetune]\nlr = "fast"\n',
        '[finetune]\nepochs = "3"\n',
        "[data]\nseq_len = 3.5\n",
        "[finetune]\noptimizer = 1\n",
        '[runtime]\nallow_pickle = "yes"\n',
    ],
)
def test_toml_values_of_the_wrong_type_are_w2d_errors(tmp_path: Path, toml: str) -> None:
    args, table = _args(tmp_path, toml)
    cls = {"finetune": FinetuneConfig, "data": DataConfig, "runtime": RuntimeConfig}[
        toml[1 : toml.index("]")]
    ]
    with pytest.raises(W2DError, match="must be"):
        build_config(cls, args, table)


def test_toml_int_for_a_float_field_is_fine(tmp_path: Path) -> None:
    args, toml = _args(tmp_path, "[finetune]\nlr = 1\nsteps = 5\n")
    ft = build_config(FinetuneConfig, args, toml)
    assert ft.lr == 1 and ft.steps == 5


def test_learning_rate_defaults_follow_the_scope_and_task() -> None:
    assert FinetuneConfig(train_scope="head").lr is None  # filled in once the task is known
    assert FinetuneConfig(train_scope="head").for_task("classification").lr == 1e-3
    assert FinetuneConfig(train_scope="head").for_task("lm").lr == 1e-4
    assert FinetuneConfig(train_scope="top:2").for_task("classification").lr == 1e-4
    assert FinetuneConfig().for_task("lm").lr == 2e-5
    assert FinetuneConfig(train_scope="head", lr=0.5).for_task("lm").lr == 0.5


def test_a_strategy_can_carry_its_own_select_settings() -> None:
    run = RunConfig(strategies="greedy, greedy_balanced@precondition=kfac@pool=2 ,greedy")
    assert run.strategy_list == ["greedy", "greedy_balanced@precondition=kfac@pool=2"]
    assert run.strategy_specs == {
        "greedy": ("greedy", {}),
        "greedy_balanced@precondition=kfac@pool=2": (
            "greedy_balanced",
            {"precondition": "kfac", "pool": 2.0},
        ),
    }
    assert select_overrides("grad_at=base pseudo_experts=4") == {"grad_at": "base", "pseudo_experts": 4}


@pytest.mark.parametrize(
    ("strategies", "message"),
    [
        ("greedy@pool=wide", "pool takes a float"),
        ("greedy@magic=1", "'magic=1' is not SETTING=VALUE"),
        ("greedy@precondition", "'precondition' is not SETTING=VALUE"),
        ("greedy@k=10", "k is shared by every strategy"),
        ("magic@pool=2", "unknown strategy 'magic'"),
    ],
)
def test_bad_strategy_settings_say_what_is_wrong(strategies: str, message: str) -> None:
    with pytest.raises(W2DError, match=message):
        RunConfig(strategies=strategies)
