"""Training building blocks against hand computations: windows, kNN targets, self-exclusion, the loss."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("faiss")

from edge_memdec.scoring import mixed_ppl  # noqa: E402
from edge_memdec.train.knn_targets import build_index, drop_self, knn_distribution  # noqa: E402
from edge_memdec.train.loss import memdec_loss_sum  # noqa: E402
from edge_memdec.train.report import knn_lm_rows  # noqa: E402
from edge_memdec.windows import sliding_windows  # noqa: E402


@pytest.mark.parametrize(("n", "ctx", "stride"), [(2500, 1024, 512), (10, 4, 4), (3, 1024, 512), (17, 5, 2)])
def test_every_position_owned_once(n, ctx, stride):
    owned = [t for w in sliding_windows(n, ctx, stride) for t in range(w.first_new, w.end)]
    assert owned == list(range(n))
    assert all(w.end - w.begin <= ctx for w in sliding_windows(n, ctx, stride))


def test_drop_self_removes_own_index_not_first_hit():
    distances = np.array([[0.0, 0.0, 1.0], [0.5, 1.0, 2.0]], dtype=np.float32)
    neighbours = np.array([[7, 3, 9], [4, 5, 6]])
    d, i = drop_self(distances, neighbours, np.array([3, 8]), k=2)
    assert i.tolist() == [[7, 9], [4, 5]]
    assert d.tolist() == [[0.0, 1.0], [0.5, 1.0]]


def brute_force_targets(keys, values, k, temperature, top):
    """The kNN distribution of every position by a plain numpy loop (float64)."""
    out = []
    for q in range(len(keys)):
        d = ((keys - keys[q]) ** 2).sum(axis=1).astype(np.float64)
        d[q] = np.inf
        nearest = np.argsort(d, kind="stable")[:k]
        w = np.exp(-(d[nearest] - d[nearest].min()) / temperature)
        sums: dict[int, float] = {}
        for i, wi in zip(nearest, w / w.sum(), strict=True):
            sums[int(values[i])] = sums.get(int(values[i]), 0.0) + wi
        best = sorted(sums.items(), key=lambda item: -item[1])[:top]
        total = sum(p for _, p in best)
        out.append({t: p / total for t, p in best})
    return out


def test_targets_match_brute_force():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(300, 16)).astype(np.float32) * 0.3
    values = rng.integers(0, 12, size=300).astype(np.int32)
    k, temperature, top = 20, 1.0, 5
    index = build_index(keys, "flat")
    d, i = index.search(keys, k + 1)
    d, i = drop_self(d, i, np.arange(300), k)
    ids, probs = knn_distribution(d, values[i], temperature, top)
    expected = brute_force_targets(keys, values, k, temperature, top)
    for row in range(300):
        got = {int(t): float(p) for t, p in zip(ids[row], probs[row], strict=True) if p > 0}
        assert got.keys() == expected[row].keys()
        for t, p in expected[row].items():
            assert got[t] == pytest.approx(p, abs=1e-5)


def test_loss_matches_hand_computation():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, 0.3, 3.0, 1.0]])
    targets = torch.tensor([1, 2])
    knn_ids = torch.tensor([[1, 0, 0], [2, 3, 0]])
    knn_probs = torch.tensor([[0.75, 0.25, 0.0], [0.5, 0.5, 0.0]])
    total, kl, ce = memdec_loss_sum(logits, targets, knn_ids, knn_probs, beta=0.5)
    by_hand_ce, by_hand_kl = 0.0, 0.0
    for row in range(2):
        z = logits[row].tolist()
        log_z = math.log(sum(math.exp(v) for v in z))
        logp = [v - log_z for v in z]
        by_hand_ce -= logp[int(targets[row])]
        for t, p in zip(knn_ids[row].tolist(), knn_probs[row].tolist(), strict=True):
            if p > 0:
                by_hand_kl += p * (math.log(p) - logp[t])
    assert float(ce) == pytest.approx(by_hand_ce, rel=1e-6)
    assert float(kl) == pytest.approx(by_hand_kl, rel=1e-6)
    assert float(total) == pytest.approx(0.5 * by_hand_kl + 0.5 * by_hand_ce, rel=1e-6)


def test_mixed_ppl_endpoints_and_middle():
    base = np.log(np.array([0.5, 0.25]))
    mem = np.log(np.array([0.25, 0.5]))
    table = mixed_ppl(base, mem, [0.0, 0.5, 1.0])
    assert table[0.0] == pytest.approx(math.sqrt(8))
    assert table[1.0] == pytest.approx(math.sqrt(8))
    assert table[0.5] == pytest.approx(1 / 0.375)


def _knn_scores(p_base: list[float], p_knn: list[float]) -> dict:
    """A knn_lm_scores result as the cache gives it back (numpy scalars) for these target probabilities."""
    return {
        "base_logprobs": np.log(np.array(p_base)),
        "knn_logprobs": np.log(np.array(p_knn)),
        "k": np.array(8),
        "temperature": np.array(2.0),
        "datastore_positions": np.array(100),
        "tokens_scored": np.array(len(p_base)),
        "seconds": {"base": 1.0, "search": 2.0},
    }


def test_recipe_knn_row_takes_lambda_from_validation_and_perplexitys_keys():
    """The recipe's kNN-LM row: lambda where the validation mixture is best (here the kNN side is right on
    validation, so the largest lambda), scored on the test text under the keys `perplexity --knn` reports."""
    valid = _knn_scores([0.1, 0.1, 0.1], [0.9, 0.9, 0.9])
    test = _knn_scores([0.5, 0.25], [0.25, 0.5])
    row, sweep = knn_lm_rows(valid, test, (0.1, 0.5, 0.9))
    assert row["lambda"] == 0.9
    assert row["ppl"] == pytest.approx(1 / math.sqrt((0.1 * 0.5 + 0.9 * 0.25) * (0.1 * 0.25 + 0.9 * 0.5)))
    assert row["base_pytorch"]["ppl"] == pytest.approx(math.sqrt(8))
    assert row["best"]["lambda"] == 0.5 and row["best"]["ppl"] == pytest.approx(1 / 0.375)
    assert (row["k"], row["temperature"], row["datastore_positions"], row["tokens_scored"]) == (8, 2.0, 100, 2)
    assert row["valid_tokens_scored"] == 3  # says how much text lambda was chosen on
    assert [r["lambda"] for r in sweep] == [0.1, 0.5, 0.9] and sweep[1]["ppl"] == pytest.approx(1 / 0.375)
    assert json.loads(json.dumps(row)) == row  # JSON-ready: no numpy scalars left


def test_torch_search_equals_faiss_flat():
    """The GPU fallback search (matrix products + top-k, here on the CPU, keys and queries in several chunks)
    finds the same neighbours as faiss's exact index, at the same squared-L2 distances."""
    rng = np.random.default_rng(4)
    keys = rng.normal(size=(1000, 24)).astype(np.float32)
    queries = rng.normal(size=(50, 24)).astype(np.float32)
    exact_d, exact_i = build_index(keys, "flat").search(queries, 16)
    ours = build_index(keys, "torch", device="cpu")
    ours.key_chunk, ours.query_chunk = 300, 16
    d, i = ours.search(queries, 16)
    assert d.shape == (50, 16)
    np.testing.assert_array_equal(i, exact_i)
    np.testing.assert_allclose(d, exact_d, rtol=1e-4, atol=1e-3)


def test_sample_text_is_seeded_whole_documents_cut_to_the_token_budget(smollm2_gguf):
    """A split's scored text: the same seed gives the same documents, cut to at most the token budget."""
    from edge_memdec.corpus import general_documents
    from edge_memdec.train.base import load_tokenizer
    from edge_memdec.train.report import sample_text

    tokenizer, docs = load_tokenizer(smollm2_gguf), general_documents()
    text = sample_text(tokenizer, docs, 600)
    assert text == sample_text(tokenizer, docs, 600) != sample_text(tokenizer, docs, 600, seed=1)
    assert 500 < len(tokenizer.encode(text, add_special_tokens=False).ids) <= 600
    assert text.split("\n\n")[0] in {d.text.split("\n\n")[0] for d in docs}
