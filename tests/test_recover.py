"""The factored classification gradients against autograd, and the select pipeline on tiny models."""

from __future__ import annotations

import copy
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from weights2data.config import DataConfig, SelectConfig
from weights2data.data import encode_classification, make_label_set
from weights2data.errors import W2DError
from weights2data.features import forward_hidden, hidden_states
from weights2data.models import LoadedModel, tiny_test_model, untie_head
from weights2data.recover import (
    check_full_loss,
    check_pair,
    corpus_gradients,
    recover,
    resolve_strategy,
    sparse_labels,
    unsure_rows,
    write_recovery,
)
from weights2data.selection import DenseFeatures, cosines, objective, select, unit_weights

TEXTS = [
    "The team won the championship after a dramatic overtime goal.",
    "Stocks fell sharply as investors worried about interest rates.",
    "A new species of frog was discovered in the rainforest.",
    "The prime minister met foreign leaders at the summit.",
    "The company reported record quarterly earnings on Tuesday.",
    "Scientists launched a satellite to study the ozone layer.",
    "The striker signed a three-year contract with the club.",
    "Oil prices rose after the pipeline was shut down.",
    "Researchers trained a neural network to read handwriting.",
    "Elections were held peacefully across the country.",
    "The museum opened an exhibition of medieval manuscripts.",
    "Heavy rain flooded the streets of the capital overnight.",
]


@pytest.fixture(scope="module")
def pair(cache) -> tuple[LoadedModel, LoadedModel]:
    base = tiny_test_model(cache, seed=0)
    untie_head(base.model)
    finetuned = LoadedModel(copy.deepcopy(base.model), base.tokenizer, "tiny-finetuned")
    generator = torch.Generator().manual_seed(0)  # the same model whatever ran before
    with torch.no_grad():  # a finetune that moved the head and the last block
        head = finetuned.model.lm_head.weight
        head.add_(0.05 * torch.randn(head.shape, generator=generator))
        for p in finetuned.model.model.layers[-1].parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    return base, finetuned


def autograd_head_gradients(
    model: torch.nn.Module,
    texts: list[str],
    tokenizer,
    token_ids: list[int],
    labels: torch.Tensor,
    seq_len: int,
) -> torch.Tensor:
    """(N, V·d) per-example gradients of the label-restricted loss w.r.t. the full head."""
    encoded = encode_classification(tokenizer, texts, seq_len)
    head = model.get_output_embeddings()
    grads = []
    for i in range(len(texts)):
        hidden = forward_hidden(model, encoded.subset(slice(i, i + 1)))[:, -1]  # (1, d), no grad
        weight = head.weight.detach().clone().requires_grad_(True)
        logits = F.linear(hidden, weight)[:, token_ids]
        F.cross_entropy(logits, labels[i : i + 1]).backward()
        grads.append(weight.grad.reshape(-1))
    return torch.stack(grads)


def last_logits(loaded: LoadedModel, seq_len: int) -> torch.Tensor:
    """(N, V) the model's logits at the last position of each of TEXTS' classification prompts."""
    encoded = encode_classification(loaded.tokenizer, TEXTS, seq_len)
    with torch.no_grad():
        return loaded.model(
            input_ids=encoded.input_ids,
            attention_mask=encoded.attention_mask,
            position_ids=encoded.position_ids,
        ).logits[:, -1]


def test_factored_gradients_match_autograd(pair, tmp_path) -> None:
    base, finetuned = pair
    label_set = make_label_set(["a", "b", "c", "d"], finetuned.tokenizer, "letters")
    data, cfg = DataConfig(seq_len=16), SelectConfig(k=5, projection_dim=0, precondition="none")
    grads = corpus_gradients(base, finetuned, TEXTS, label_set, data, cfg, cache_root=tmp_path)
    dense = autograd_head_gradients(
        finetuned.model, TEXTS, finetuned.tokenizer, label_set.token_ids, grads.labels, data.seq_len
    )
    delta = (base.model.lm_head.weight - finetuned.model.lm_head.weight).detach().reshape(-1)
    exact = DenseFeatures(dense, delta)
    factored = grads.features
    # Rows outside the label set carry no gradient, so every inner product is the same; cosines
    # differ only by the constant ‖Δ_labels‖ / ‖Δ‖, which no strategy's ranking depends on.
    torch.testing.assert_close(factored.target_dots, exact.target_dots, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(factored.sq_norms, exact.sq_norms, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(factored.dots_with(3), exact.dots_with(3), atol=1e-6, rtol=1e-5)
    cos_dense = exact.target_dots / exact.sq_norms.sqrt()
    cos_factored = factored.target_dots / factored.sq_norms.sqrt()
    torch.testing.assert_close(cos_factored, cos_dense, atol=1e-5, rtol=1e-5)
    for strategy in ("greedy", "greedy_batched", "topk", "bottomk"):
        a = select(strategy, factored, 6, batch_size=3, progress=False)
        b = select(strategy, exact, 6, batch_size=3, progress=False)
        assert a.indices.tolist() == b.indices.tolist(), strategy


def test_auto_labels_are_the_finetuned_prediction(pair, tmp_path) -> None:
    base, finetuned = pair
    label_set = make_label_set(["a", "b"], finetuned.tokenizer, "letters")
    grads = corpus_gradients(
        base, finetuned, TEXTS, label_set, DataConfig(seq_len=16), SelectConfig(k=3), tmp_path
    )
    logits = last_logits(finetuned, 16)[:, label_set.token_ids]
    assert grads.labels.tolist() == logits.argmax(-1).tolist()
    expected_loss = F.cross_entropy(logits, grads.labels, reduction="none")
    torch.testing.assert_close(grads.losses, expected_loss, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("label_loss", ["restricted", "full"])
def test_loss_drop_reads_each_autolabels_loss_under_the_base_model(pair, tmp_path, label_loss) -> None:
    base, finetuned = pair
    label_set = make_label_set(["a", "b", "c"], finetuned.tokenizer, "letters")
    data = DataConfig(seq_len=16, label_loss=label_loss)
    cfg = SelectConfig(k=4, strategy="loss_drop", precondition="none")
    grads = corpus_gradients(base, finetuned, TEXTS, label_set, data, cfg, tmp_path)
    logits = last_logits(base, 16)
    ids = torch.tensor(label_set.token_ids)
    if label_loss == "full":
        expected = F.cross_entropy(logits, ids[grads.labels], reduction="none")
    else:
        expected = F.cross_entropy(logits[:, ids], grads.labels, reduction="none")
    torch.testing.assert_close(grads.base_losses, expected, atol=1e-5, rtol=1e-4)
    picked = recover(grads, TEXTS, label_set, cfg, progress=False)
    drop = expected - grads.losses
    assert set(picked.rows.tolist()) == set(drop.argsort(descending=True)[:4].tolist())
    assert (
        corpus_gradients(
            base, finetuned, TEXTS, label_set, data, replace(cfg, strategy="greedy"), None
        ).base_losses
        is None
    )


def test_auto_is_a_whitened_quota_for_a_few_labels_and_greedy_elsewhere(pair, tmp_path, caplog) -> None:
    base, finetuned = pair
    label_set = make_label_set(["a", "b"], finetuned.tokenizer, "letters")
    data, auto = DataConfig(seq_len=16), SelectConfig(k=4)
    asked = SelectConfig(k=4, strategy="greedy_balanced", precondition="kfac")
    with caplog.at_level("INFO", logger="weights2data"):
        grads = corpus_gradients(base, finetuned, TEXTS, label_set, data, auto, tmp_path)
        chosen = recover(grads, TEXTS, label_set, auto, progress=False)
    assert grads.timings["precondition"] == "kfac"
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--strategy auto")]
    assert said == ["--strategy auto: greedy_balanced, --precondition kfac"]  # once, for a library caller
    explicit = recover(corpus_gradients(base, finetuned, TEXTS, label_set, data, asked, tmp_path),
                       TEXTS, label_set, asked, progress=False)  # fmt: skip
    assert chosen.summary["strategy"] == "greedy_balanced"
    assert chosen.rows.tolist() == explicit.rows.tolist()
    assert chosen.summary["finetune_scope"] == "top:1"  # the pair moved the head and the last block
    with pytest.raises(W2DError, match="resolved where the gradients are computed"):
        recover(corpus_gradients(base, finetuned, TEXTS, label_set, data, asked, tmp_path),
                TEXTS, label_set, auto, progress=False)  # fmt: skip
    whole = LoadedModel(copy.deepcopy(finetuned.model), finetuned.tokenizer, "tiny-full")
    with torch.no_grad():  # the first block moved too: a full finetune
        for p in whole.model.model.layers[0].parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    full = corpus_gradients(base, whole, TEXTS, label_set, data, auto, tmp_path)
    assert (full.timings["finetune_scope"], full.timings["precondition"]) == ("full", "kfac")
    two_full = recover(full, TEXTS, label_set, auto, progress=False)
    assert two_full.summary["strategy"] == "greedy_balanced"  # two labels: as in top:N
    topk = replace(asked, strategy="topk_balanced")
    for labels in (3, 4, 6, 10):  # top-k fills the quotas from three labels to ten
        assert resolve_strategy(auto, labels, "restricted") == topk
    greedy = replace(auto, strategy="greedy")
    assert resolve_strategy(auto, 11, "restricted") == greedy  # unmeasured from 11 to 19 labels
    assert resolve_strategy(auto, 20, "restricted") == greedy  # the quota lost with 20 labels
    # language modelling (no labels): the loss drop, greedy where gradients shape the selection
    assert resolve_strategy(auto, None, "restricted") == replace(auto, strategy="loss_drop")
    shaped = [{"grad_blocks": 2}, {"pseudo_experts": 2}, {"grad_at": "base"}, {"rounds": 2}, {"pool": 2.0}]
    for options in shaped:
        assert resolve_strategy(replace(auto, **options), None, "restricted").strategy == "greedy"
    # the full-vocabulary loss: a quota on the raw gradients (head or blocks), greedy past ten labels
    for labels in (2, 4, 10):
        assert resolve_strategy(auto, labels, "full") == replace(
            auto, strategy="greedy_balanced", precondition="none"
        )
    assert resolve_strategy(replace(auto, grad_blocks=-1), 2, "full").strategy == "greedy_balanced"
    assert resolve_strategy(auto, 11, "full") == greedy
    with pytest.raises(W2DError, match="need --label-loss restricted"):  # not silently dropped
        check_full_loss(resolve_strategy(replace(auto, precondition="adam"), 2, "full"))
    blocks = replace(auto, grad_blocks=2)
    assert resolve_strategy(blocks, 2, "restricted") == replace(greedy, grad_blocks=2)
    # with block gradients, three to ten labels: top-k balanced on Adam-preconditioned gradients
    blocks_topk = replace(blocks, strategy="topk_balanced", precondition="adam")
    for labels in (3, 4, 10):
        assert resolve_strategy(blocks, labels, "restricted") == blocks_topk
    assert resolve_strategy(replace(blocks, precondition="adam"), 4, "restricted") == blocks_topk
    assert resolve_strategy(blocks, 11, "restricted").strategy == "greedy"
    assert resolve_strategy(replace(blocks, k=1000), 4, "restricted").strategy == "greedy"
    assert resolve_strategy(replace(blocks, precondition="none"), 4, "restricted").strategy == "greedy"
    adam = replace(auto, precondition="adam")
    assert resolve_strategy(adam, 2, "restricted") == replace(adam, strategy="greedy")
    assert resolve_strategy(replace(auto, strategy="topk"), 2, "restricted").strategy == "topk"


def test_keep_confident_picks_only_each_labels_surest_documents(pair, tmp_path) -> None:
    base, finetuned = pair
    label_set = make_label_set(["a", "b"], finetuned.tokenizer, "letters")
    grads = corpus_gradients(
        base, finetuned, TEXTS, label_set, DataConfig(seq_len=16), SelectConfig(k=3), tmp_path
    )
    confidence = grads.probs.max(1).values
    dropped = set(unsure_rows(grads, 0.5).tolist())
    for label in grads.labels.unique().tolist():
        rows = (grads.labels == label).nonzero().squeeze(1).tolist()
        kept = [r for r in rows if r not in dropped]
        assert len(kept) == -(-len(rows) // 2)  # ceil: half of each label, the surest
        assert min(confidence[kept]) >= max(confidence[list(dropped & set(rows))], default=0)
    recovery = recover(grads, TEXTS, label_set, SelectConfig(k=3, keep_confident=0.5), progress=False)
    assert not dropped & set(recovery.rows.tolist())
    assert recovery.summary["unsure_skipped"] == len(dropped)
    reported = recovery.summary["label_confidence"]  # the autolabel is the argmax: its probability
    assert reported["picked"] == pytest.approx(confidence[recovery.rows].mean().item())
    assert reported["corpus"] == pytest.approx(confidence.mean().item())
    assert unsure_rows(grads, 1.0).numel() == 0
    with pytest.raises(W2DError, match="leaves 6 of the 12 documents"):
        recover(grads, TEXTS, label_set, SelectConfig(k=7, keep_confident=0.5), progress=False)
    with pytest.raises(W2DError, match="keep_confident"):
        SelectConfig(keep_confident=0.0)


def test_normalize_unit_runs_greedy_over_unit_length_gradients(pair, tmp_path) -> None:
    base, finetuned = pair
    label_set = make_label_set(["a", "b"], finetuned.tokenizer, "letters")
    cfg = SelectConfig(k=4, normalize="unit")
    grads = corpus_gradients(base, finetuned, TEXTS, label_set, DataConfig(seq_len=16), cfg, tmp_path)
    for strategy in ("greedy", "greedy_balanced", "topk"):
        recovery = recover(grads, TEXTS, label_set, cfg, strategy, progress=False)
        weights = unit_weights(grads.features)
        expected = select(strategy, grads.features, 4, labels=grads.labels, weights=weights, progress=False)
        assert recovery.rows.tolist() == expected.indices.tolist(), strategy
        assert recovery.summary["config"]["normalize"] == "unit"
        assert recovery.summary["objective_cos"] == pytest.approx(objective(grads.features, recovery.rows))
    with pytest.raises(W2DError, match="normalize"):
        SelectConfig(normalize="l2")


def test_pool_lets_greedy_pick_only_among_the_documents_most_aligned_on_their_own(
    pair, tmp_path, caplog
) -> None:
    base, finetuned = pair
    label_set = make_label_set(["a", "b"], finetuned.tokenizer, "letters")
    cfg = SelectConfig(k=4, precondition="none")
    grads = corpus_gradients(base, finetuned, TEXTS, label_set, DataConfig(seq_len=16), cfg, tmp_path)
    cos, labels = cosines(grads.features), grads.labels
    best = cos.argsort(descending=True)
    picks = recover(grads, TEXTS, label_set, replace(cfg, pool=1.5), "greedy", progress=False).rows
    assert set(picks.tolist()) <= set(best[:6].tolist())  # ⌈1.5 · 4⌉ = 6
    top = recover(grads, TEXTS, label_set, cfg, "topk", progress=False).rows
    one = recover(grads, TEXTS, label_set, replace(cfg, pool=1), "greedy", progress=False).rows
    assert set(one.tolist()) == set(top.tolist())
    balanced = recover(grads, TEXTS, label_set, replace(cfg, pool=2), "greedy_balanced", progress=False).rows
    for label in labels.unique():  # each label's quota is 2: its 4 best documents form its pool
        mine = (labels == label).nonzero().squeeze(1)
        pool = set(mine[cos[mine].argsort(descending=True)[:4]].tolist())
        chosen = [r for r in balanced.tolist() if labels[r] == label]
        assert len(chosen) == 2 and set(chosen) <= pool
    tkb = recover(grads, TEXTS, label_set, cfg, "topk_balanced", progress=False).rows
    same = recover(grads, TEXTS, label_set, replace(cfg, pool=1), "greedy_balanced", progress=False).rows
    assert set(same.tolist()) == set(tkb.tolist())
    confident = replace(cfg, pool=1, keep_confident=0.5)  # the pool is taken among the kept documents
    kept = set(range(len(TEXTS))) - set(unsure_rows(grads, 0.5).tolist())
    assert set(recover(grads, TEXTS, label_set, confident, "greedy", progress=False).rows.tolist()) <= kept
    random = recover(grads, TEXTS, label_set, replace(cfg, pool=1), "random", progress=False).rows
    assert torch.equal(random, recover(grads, TEXTS, label_set, cfg, "random", progress=False).rows)
    assert "--pool 1 narrows by gradient cosine, and random ranks without gradients: ignored" in caplog.text
    with pytest.raises(W2DError, match="pool must be 0"):
        SelectConfig(pool=0.5)


def test_sparse_labels_hold_under_half_an_equal_share() -> None:
    assert sparse_labels({"negative": 5, "positive": 95}) == ["negative"]
    assert sparse_labels({"negative": 30, "positive": 70}) == []  # 0.30 of 2 labels: over 0.25
    four = {"World": 194, "Sports": 34, "Business": 34, "Sci/Tech": 38}  # 37.5 is half of 300 / 4
    assert sparse_labels(four) == ["Sports", "Business"]
    assert sparse_labels({}) == [] and sparse_labels({"a": 0, "b": 0}) == []


def test_projection_approximates_exact_cosines(pair, tmp_path) -> None:
    base, finetuned = pair
    label_set = make_label_set(["a", "b", "c", "d"], finetuned.tokenizer, "letters")
    data = DataConfig(seq_len=16)
    exact = corpus_gradients(base, finetuned, TEXTS, label_set, data, SelectConfig(k=3), tmp_path).features
    projected = corpus_gradients(
        base, finetuned, TEXTS, label_set, data, SelectConfig(k=3, projection_dim=4096, seed=1), tmp_path
    ).features
    cos = lambda f: f.target_dots / (f.sq_norms.sqrt() * f.delta_sq_norm**0.5)  # noqa: E731
    assert (cos(exact) - cos(projected)).abs().max() < 0.1


def test_hidden_states_are_cached(pair, tmp_path) -> None:
    base, finetuned = pair
    label_set = make_label_set(["a", "b"], finetuned.tokenizer, "letters")
    args = (base, finetuned, TEXTS, label_set, DataConfig(seq_len=16), SelectConfig(k=3))
    first = corpus_gradients(*args, tmp_path)
    chunks = list((tmp_path / "hidden").rglob("chunk_*.safetensors"))
    assert chunks
    second = corpus_gradients(*args, tmp_path)
    assert list((tmp_path / "hidden").rglob("chunk_*.safetensors")) == chunks
    torch.testing.assert_close(first.features.target_dots, second.features.target_dots)


def test_write_recovery(pair, tmp_path) -> None:
    base, finetuned = pair
    label_set = make_label_set(["x", "y"], finetuned.tokenizer, "letters")
    grads = corpus_gradients(
        base, finetuned, TEXTS, label_set, DataConfig(seq_len=16), SelectConfig(k=4), tmp_path
    )
    recovery = recover(grads, TEXTS, label_set, SelectConfig(k=4), progress=False)
    parquet, summary = write_recovery(recovery, tmp_path / "out")
    table = pq.read_table(parquet).to_pydict()
    assert table["rank"] == [0, 1, 2, 3]
    assert [TEXTS[i] for i in table["corpus_row"]] == table["text"]
    assert set(table["label_name"]) <= {"x", "y"}
    assert summary.exists() and sum(recovery.summary["label_distribution"].values()) == 4


def test_check_pair_names_the_difference(pair, cache) -> None:
    base, _ = pair
    other = tiny_test_model(cache, seed=1)
    check_pair(base, other)  # same architecture, other weights: fine
    other.model.config.hidden_size = 128
    with pytest.raises(W2DError, match="hidden_size"):
        check_pair(base, other)


def test_cached_rows_are_reused_by_other_sets(pair, tmp_path, monkeypatch) -> None:
    import weights2data.features as features

    _, finetuned = pair
    encoded = encode_classification(finetuned.tokenizer, TEXTS, 16)
    monkeypatch.setattr(features, "CHUNK_ROWS", 5)
    hidden_states(finetuned, encoded.subset(slice(0, 8)), last_only=True, cache_root=tmp_path)
    run, real_forward = [], features.forward_hidden

    def counted(model, batch, layer):
        run.append(len(batch))
        return real_forward(model, batch, layer)

    monkeypatch.setattr(features, "forward_hidden", counted)
    mixed = torch.tensor([7, 2, 11, 2, 9, 0])  # cached rows, a repeat and rows never seen
    got = hidden_states(finetuned, encoded.subset(mixed), last_only=True, cache_root=tmp_path)
    assert sum(run) == 2  # rows 11 and 9 only
    torch.testing.assert_close(got, hidden_states(finetuned, encoded.subset(mixed), last_only=True))
    run.clear()
    layered = hidden_states(finetuned, encoded.subset(mixed), layer=1, cache_root=tmp_path)
    assert sum(run) == 6  # another layer is another family: nothing to reuse
    assert layered.shape == (6, 15, finetuned.model.config.hidden_size)
