"""The numba kernels against float64 numpy references written from the formulas."""

from __future__ import annotations

import numpy as np
import pytest

from edge_memdec.kernels import (
    base_only_bias,
    make_logit_bias,
    make_scratch,
    mix_decoders,
    mix_logprobs,
    sample_token,
    score_rows,
    trace_token,
)
from edge_memdec.kernels.fastmath import exp_f32, exp_f64, log1p_f32
from edge_memdec.scoring import mixture_nll

LAMBDAS = (0.0, 0.3, 1.0)


def logits(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    """A float32 logit row: normal noise times scale plus a few peaked tokens, like a language model's."""
    row = rng.standard_normal(n) * scale
    row[rng.integers(0, n, 5)] += 3.0 * scale
    return row.astype(np.float32)


def ref_mixture(base: np.ndarray, mem: np.ndarray, lam: float) -> np.ndarray:
    """log(lam softmax(mem) + (1 - lam) softmax(base)) over the shared ids, float64."""
    n = min(len(base), len(mem))
    lb = base[:n].astype(np.float64)
    lm = mem[:n].astype(np.float64)
    lb = lb - np.logaddexp.reduce(lb)
    lm = lm - np.logaddexp.reduce(lm)
    if lam == 0.0:
        return lb
    if lam == 1.0:
        return lm
    return np.logaddexp(np.log1p(-lam) + lb, np.log(lam) + lm)


def ref_distribution(
    logp: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float
) -> np.ndarray:
    """Probabilities after top-k, top-p (renormalised over the kept), min-p, then temperature; float64 [n]."""
    n = len(logp)
    keep = np.lexsort((np.arange(n), -logp))
    if 0 < top_k < n:
        keep = keep[:top_k]
    if top_p < 1.0:
        p = np.exp(logp[keep] - logp[keep[0]])
        cum = np.cumsum(p / p.sum())
        reached = np.flatnonzero(cum >= top_p)
        keep = keep[: reached[0] + 1 if len(reached) else len(keep)]
    if min_p > 0.0:
        keep = keep[logp[keep] >= logp[keep[0]] + np.log(min_p)]
    w = np.exp((logp[keep] - logp[keep[0]]) / temperature)
    probs = np.zeros(n)
    probs[keep] = w / w.sum()
    return probs


def ref_draw(probs: np.ndarray, u: float) -> int:
    """Inverse CDF at u over the kept ids in increasing order."""
    ids = np.flatnonzero(probs > 0)
    cum = np.cumsum(probs[ids])
    return int(ids[min(np.searchsorted(cum, u * cum[-1], side="right"), len(ids) - 1)])


def test_fast_exp_and_log1p_accuracy():
    x32 = np.linspace(-87.0, 0.0, 4001).astype(np.float32)
    got = np.array([exp_f32(v) for v in x32], np.float64)
    assert np.max(np.abs(got / np.exp(x32.astype(np.float64)) - 1.0)) < 4e-7
    e32 = np.linspace(0.0, 1.0, 4001).astype(np.float32)[1:]
    got = np.array([log1p_f32(v) for v in e32], np.float64)
    assert np.max(np.abs(got / np.log1p(e32.astype(np.float64)) - 1.0)) < 4e-7
    x64 = np.linspace(-708.0, 0.0, 4001)
    got = np.array([exp_f64(v) for v in x64])
    assert np.max(np.abs(got / np.exp(x64) - 1.0)) < 3e-16


@pytest.mark.parametrize("scale", [1.0, 30.0, 1000.0])
@pytest.mark.parametrize("lam", LAMBDAS)
def test_mix_logprobs_matches_reference(lam, scale):
    rng = np.random.default_rng(int(scale) + int(10 * lam))
    base, mem = logits(rng, 3000, scale), logits(rng, 3077, scale)
    before = base.copy(), mem.copy()
    got = mix_logprobs(base, mem, lam)
    want = ref_mixture(base, mem, lam)
    assert got.dtype == np.float32 and got.shape == (3000,)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(base, before[0])
    np.testing.assert_array_equal(mem, before[1])


def test_mix_logprobs_lambda_ends_are_exact_models_and_out_is_used():
    rng = np.random.default_rng(3)
    base, mem = logits(rng, 2000, 3.0), logits(rng, 1900, 3.0)
    mem[7] = -np.inf
    out = np.full(2500, 99.0, np.float32)
    got = mix_logprobs(base, mem, 1.0, out=out)
    assert np.shares_memory(got, out) and got.shape == (1900,)
    assert got[7] == -np.inf
    np.testing.assert_allclose(got[:7], ref_mixture(base, mem, 1.0)[:7], atol=1e-5)
    alone = mix_logprobs(base, None, 0.7)
    np.testing.assert_allclose(alone, ref_mixture(base, base, 0.0), atol=1e-5)
    mixed = mix_logprobs(base, mem, 0.5)
    assert np.isfinite(mixed).all()


def ref_lse(row: np.ndarray) -> float:
    return float(np.logaddexp.reduce(row.astype(np.float64)))


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_decoders_premixed_then_mixed_with_the_base_are_the_mixture_of_all(scale):
    """Three decoders at (0.3, 0.15, 0.05) with the base at 0.5: float64 reference of four distributions; the
    premixed row's log-normaliser is the lambda-weighted mean of the decoders' (their logits' scale)."""
    rng = np.random.default_rng(int(scale))
    base = logits(rng, 3000, scale)
    mems = [logits(rng, n, scale) for n in (3010, 3000, 3050)]
    lams = np.array([0.3, 0.15, 0.05])
    out = np.full(3100, np.nan, np.float32)
    premixed = mix_decoders(mems, lams, out)
    assert np.shares_memory(premixed, out) and premixed.shape == (3000,)
    got = mix_logprobs(base, premixed, lams.sum())
    logps = [ref_mixture(row[:3000], row[:3000], 0.0) for row in (base, *mems)]
    want = np.log(0.5 * np.exp(logps[0]) + sum(w * np.exp(lp) for w, lp in zip(lams, logps[1:], strict=True)))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=2e-5)
    mean_lse = sum(w * ref_lse(row[:3000]) for w, row in zip(lams / lams.sum(), mems, strict=True))
    assert ref_lse(premixed) == pytest.approx(mean_lse, abs=1e-5 * max(scale, 1.0) * 10)


def test_one_decoder_premixed_with_itself_is_its_own_row():
    rng = np.random.default_rng(5)
    mem = logits(rng, 2000, 4.0)
    mem[9] = -np.inf
    got = mix_decoders([mem, mem, mem], [0.1, 0.2, 0.1], np.empty(2000, np.float32))
    assert got[9] == -np.inf
    np.testing.assert_allclose(np.delete(got, 9), np.delete(mem, 9), rtol=0, atol=3e-5)
    with pytest.raises(ValueError, match="two or more rows"):
        mix_decoders([mem, mem], [0.3, 0.0], np.empty(2000, np.float32))
    with pytest.raises(ValueError, match="out must be"):
        mix_decoders([mem, mem], [0.3, 0.1], np.empty(100, np.float32))


def test_mixture_nll_of_several_decoders_is_the_float64_mixture():
    rng = np.random.default_rng(11)
    nll_base, nll_mems = rng.uniform(0.1, 9.0, 50), rng.uniform(0.1, 12.0, (3, 50))
    weights = np.array([[0.0, 0.0, 0.0], [0.3, 0.2, 0.1], [0.7, 0.0, 0.3], [0.2, 0.2, 0.2]])
    got = mixture_nll(nll_base, nll_mems, weights)
    for c, w in enumerate(weights):
        p = (1 - w.sum()) * np.exp(-nll_base) + (w[:, None] * np.exp(-nll_mems)).sum(axis=0)
        np.testing.assert_allclose(got[:, c], -np.log(p), rtol=1e-12)
    assert (got[:, 0] == nll_base).all()  # weight 0 drops a model exactly
    two = mixture_nll(nll_base, nll_mems[:1], np.array([[0.55]]))[:, 0]
    np.testing.assert_allclose(two, ref_mixture_rows(nll_base, nll_mems[0], 0.55), rtol=1e-13)


@pytest.mark.parametrize("lam", LAMBDAS)
def test_greedy_is_argmax_of_the_mixture(lam):
    rng = np.random.default_rng(11)
    scratch = make_scratch(5000)
    for trial in range(20):
        scale = (0.5, 3.0, 100.0)[trial % 3]
        base, mem = logits(rng, 5000, scale), logits(rng, 4990, scale)
        want = int(np.argmax(ref_mixture(base, mem, lam)))
        assert sample_token(base, mem, lam, 0.0, 40, 0.95, 0.05, 0.5, scratch) == want
        assert sample_token(base, mem, lam, 0.8, 1, 1.0, 0.0, 0.99, scratch) == want
        assert sample_token(base, mem, lam, 1e-30, 0, 1.0, 0.0, 0.99, scratch) == want
        assert sample_token(base, mem, lam, 1e-300, 40, 0.9, 0.0, 0.99, scratch) == want


SETTINGS = [
    (0.8, 40, 0.95, 0.05),  # llama.cpp's defaults
    (1.0, 0, 1.0, 0.0),  # plain sampling over the whole vocabulary
    (0.6, 0, 1.0, 0.1),  # min-p only
    (1.5, 0, 0.9, 0.0),  # top-p without top-k
    (0.5, 7, 1.0, 0.0),
    (1.0, 5000, 0.5, 0.02),  # top-k at least the vocabulary: off
]


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("lam", LAMBDAS)
def test_draw_equals_reference_inverse_cdf(lam, setting):
    temperature, top_k, top_p, min_p = setting
    rng = np.random.default_rng(17)
    scratch = make_scratch(3000)
    for scale in (0.3, 2.0, 50.0):
        base, mem = logits(rng, 3000, scale), logits(rng, 3050, scale)
        probs = ref_distribution(ref_mixture(base, mem, lam), temperature, top_k, top_p, min_p)
        for u in rng.random(40):
            got = sample_token(base, mem, lam, temperature, top_k, top_p, min_p, u, scratch)
            assert got == ref_draw(probs, u), (scale, u)


def test_top_p_head_grows_on_a_flat_distribution():
    rng = np.random.default_rng(5)
    base, mem = logits(rng, 20000, 0.05), logits(rng, 20000, 0.05)
    probs = ref_distribution(ref_mixture(base, mem, 0.4), 1.0, 0, 0.9, 0.0)
    assert (probs > 0).sum() > 10000
    scratch = make_scratch(20000)
    for u in rng.random(10):
        assert sample_token(base, mem, 0.4, 1.0, 0, 0.9, 0.0, u, scratch) == ref_draw(probs, u)


def test_ties_go_to_the_lowest_id():
    row = np.zeros(300, np.float32)
    scratch = make_scratch(300)
    assert sample_token(row, row, 0.5, 0.0, 0, 1.0, 0.0, 0.0, scratch) == 0
    draws = {sample_token(row, row, 0.5, 1.0, 3, 1.0, 0.0, u, scratch) for u in (0.1, 0.5, 0.9)}
    assert draws == {0, 1, 2}


@pytest.mark.parametrize("lam", [0.0, 0.45])
def test_draw_frequencies_match_reference_probabilities(lam):
    rng = np.random.default_rng(23)
    base, mem = logits(rng, 1000, 1.5), logits(rng, 1000, 1.5)
    probs = ref_distribution(ref_mixture(base, mem, lam), 0.9, 30, 0.9, 0.0)
    scratch = make_scratch(1000)
    draws = 20000
    counts = np.bincount(
        [sample_token(base, mem, lam, 0.9, 30, 0.9, 0.0, u, scratch) for u in rng.random(draws)],
        minlength=1000,
    )
    kept = probs > 0
    assert counts[~kept].sum() == 0
    expected = probs[kept] * draws
    chi2 = float(np.sum((counts[kept] - expected) ** 2 / expected))
    dof = kept.sum() - 1
    assert chi2 < dof + 6.0 * np.sqrt(2.0 * dof)


def test_sample_token_base_only_and_bad_arguments():
    rng = np.random.default_rng(2)
    base = logits(rng, 500, 2.0)
    scratch = make_scratch(500)
    probs = ref_distribution(ref_mixture(base, base, 0.0), 0.7, 0, 1.0, 0.0)
    assert sample_token(base, None, 0.9, 0.7, 0, 1.0, 0.0, 0.3, scratch) == ref_draw(probs, 0.3)
    with pytest.raises(ValueError, match="lambda"):
        sample_token(base, base, 1.5, 0.7, 0, 1.0, 0.0, 0.3, scratch)
    with pytest.raises(ValueError, match="scratch"):
        sample_token(base, base, 0.5, 0.7, 0, 1.0, 0.0, 0.3, make_scratch(100))
    with pytest.raises(ValueError, match="u must"):
        sample_token(base, base, 0.5, 0.7, 0, 1.0, 0.0, 1.0, scratch)


@pytest.mark.parametrize("n_vocab", [49152, 151936])
def test_full_size_vocabularies(n_vocab):
    rng = np.random.default_rng(n_vocab)
    base, mem = logits(rng, n_vocab, 2.5), logits(rng, n_vocab + 128, 2.5)
    want = ref_mixture(base, mem, 0.3)
    np.testing.assert_allclose(mix_logprobs(base, mem, 0.3), want, rtol=1e-6, atol=1e-5)
    probs = ref_distribution(want, 0.8, 40, 0.95, 0.05)
    scratch = make_scratch(n_vocab)
    for u in rng.random(20):
        assert sample_token(base, mem, 0.3, 0.8, 40, 0.95, 0.05, u, scratch) == ref_draw(probs, u)


def ref_adjusted(base, mem, lam, recent, repeat, frequency, presence, bias) -> np.ndarray:
    """The mixture's logits (log-probs + lam-weighted log-normalisers, kernels/adjust.py) after the logit bias,
    then llama.cpp's penalties for the tokens of `recent`; float64 [n]."""
    n = min(len(base), len(mem))
    z = ref_mixture(base, mem, lam)
    z += (1.0 - lam) * np.logaddexp.reduce(base[:n].astype(np.float64))
    z += lam * np.logaddexp.reduce(mem[:n].astype(np.float64))
    for token, value in bias.items():
        z[token] += value
    for token, count in zip(*np.unique(recent, return_counts=True), strict=True):
        if token < n:
            z[token] = z[token] / repeat if z[token] > 0 else z[token] * repeat
            z[token] -= count * frequency + presence
    return z


def llama_cpp_adjusted(row, recent, repeat, frequency, presence, bias) -> np.ndarray:
    """llama.cpp's own logit-bias then penalties samplers applied to one model's logits."""
    import ctypes

    import llama_cpp

    n = len(row)
    data = (llama_cpp.llama_token_data * n)(*(llama_cpp.llama_token_data(i, float(x), 0.0) for i, x in enumerate(row)))
    array = llama_cpp.llama_token_data_array(data, n, -1, False)
    entries = (llama_cpp.llama_logit_bias * len(bias))(*(llama_cpp.llama_logit_bias(t, b) for t, b in bias.items()))
    samplers = [
        llama_cpp.llama_sampler_init_logit_bias(n, len(bias), entries),
        llama_cpp.llama_sampler_init_penalties(n, len(recent), repeat, frequency, presence),
    ]
    for token in recent:
        llama_cpp.llama_sampler_accept(samplers[1], int(token))
    for sampler in samplers:
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
        llama_cpp.llama_sampler_free(sampler)
    out = np.empty(n)
    for i in range(array.size):
        out[data[i].id] = data[i].logit
    return out


PENALTIES = [(1.3, 0.0, 0.0), (1.0, 0.4, 0.6), (0.8, -0.3, -0.5), (1.1, 0.1, 0.2)]  # repeat, frequency, presence


def adjustment_case(rng, base, mem, lam):
    """Recent tokens (the mixture's 6 best, some twice, noise, one id past the shared vocabulary) and a bias
    that bans the best token, lifts a poor one and lowers another."""
    order = np.argsort(-ref_mixture(base, mem, lam))
    recent = np.concatenate([order[:6], order[:3], rng.integers(0, len(order), 20), [len(order) + 3]])
    bias = {int(order[0]): -100.0, int(order[500]): 9.0, int(order[2]): -1.5}
    return rng.permutation(recent), bias


@pytest.mark.parametrize("penalty", PENALTIES)
def test_reference_penalties_and_bias_are_llama_cpps_at_either_lambda_end(penalty):
    rng = np.random.default_rng(41)
    base, mem = logits(rng, 3000, 4.0), logits(rng, 3000, 4.0)
    for lam, row in ((0.0, base), (1.0, mem)):
        recent, bias = adjustment_case(rng, base, mem, lam)
        recent = recent[recent < 3000]
        want = llama_cpp_adjusted(row, recent, *penalty, bias)
        np.testing.assert_allclose(ref_adjusted(base, mem, lam, recent, *penalty, bias), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("penalty", PENALTIES)
@pytest.mark.parametrize("lam", LAMBDAS)
def test_draws_with_penalties_and_bias_equal_the_reference(lam, penalty):
    rng = np.random.default_rng(43)
    scratch = make_scratch(3000)
    for scale in (0.3, 2.0, 20.0):
        base, mem = logits(rng, 3000, scale), logits(rng, 3050, scale)
        recent, bias = adjustment_case(rng, base, mem, lam)
        z = ref_adjusted(base, mem, lam, recent, *penalty, bias)
        adjust = dict(recent=recent, repeat_penalty=penalty[0], frequency_penalty=penalty[1],
                      presence_penalty=penalty[2], logit_bias=make_logit_bias(bias))  # fmt: skip
        assert sample_token(base, mem, lam, 0.0, 40, 0.95, 0.05, 0.5, scratch, **adjust) == int(np.argmax(z))
        for temperature, top_k, top_p, min_p in SETTINGS:
            probs = ref_distribution(z, temperature, top_k, top_p, min_p)
            for u in rng.random(12):
                got = sample_token(base, mem, lam, temperature, top_k, top_p, min_p, u, scratch, **adjust)
                assert got == ref_draw(probs, u), (scale, temperature, top_k, top_p, min_p, u)


def test_top_p_after_banning_an_almost_certain_token():
    """With 99.99% of the mass banned, top-p cannot lean on the normalised total: it sorts one head of all ids."""
    rng = np.random.default_rng(47)
    base = logits(rng, 2000, 1.0)
    base[77] = 25.0
    bias = make_logit_bias({77: -100.0})
    scratch = make_scratch(2000)
    z = ref_adjusted(base, base, 0.0, [], 1.0, 0.0, 0.0, {77: -100.0})
    probs = ref_distribution(z, 1.0, 0, 0.5, 0.0)
    assert probs[77] == 0.0
    for u in rng.random(20):
        assert sample_token(base, None, 0.0, 1.0, 0, 0.5, 0.0, u, scratch, logit_bias=bias) == ref_draw(probs, u)


def test_neutral_adjustments_change_nothing_and_bad_ones_are_refused():
    rng = np.random.default_rng(53)
    base, mem = logits(rng, 1500, 2.0), logits(rng, 1500, 2.0)
    scratch = make_scratch(1500)
    recent = np.argsort(-base)[:10]
    for u in rng.random(10):
        plain = sample_token(base, mem, 0.3, 0.9, 0, 0.9, 0.0, u, scratch)
        assert sample_token(base, mem, 0.3, 0.9, 0, 0.9, 0.0, u, scratch, recent=recent) == plain
        assert sample_token(base, mem, 0.3, 0.9, 0, 0.9, 0.0, u, scratch, logit_bias=make_logit_bias({})) == plain
    with pytest.raises(ValueError, match="repeat_penalty"):
        sample_token(base, mem, 0.3, 0.9, 0, 0.9, 0.0, 0.5, scratch, recent=recent, repeat_penalty=0.0)
    with pytest.raises(ValueError, match="finite"):
        make_logit_bias({3: float("inf")})


def ref_nll(rows: np.ndarray, n: int, targets: np.ndarray) -> np.ndarray:
    x = rows[:, :n].astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(x - top).sum(axis=1))
    return lse - x[np.arange(len(x)), targets]


def test_score_rows_matches_reference():
    rng = np.random.default_rng(29)
    base = np.stack([logits(rng, 4000, s) for s in (0.5, 3.0, 30.0, 300.0, 2.0, 1.0)])
    mem = np.stack([logits(rng, 4100, s) for s in (1.0, 2.0, 20.0, 500.0, 0.1, 5.0)])
    targets = rng.integers(0, 4000, len(base))
    lambdas = np.array([0.0, 0.1, 0.3, 0.55, 0.9, 1.0])
    nll_base, nll_mem, nll_mix = score_rows(base, mem, targets, lambdas)
    want_base, want_mem = ref_nll(base, 4000, targets), ref_nll(mem, 4000, targets)
    np.testing.assert_allclose(nll_base, want_base, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(nll_mem, want_mem, rtol=1e-9, atol=1e-12)
    for j, lam in enumerate(lambdas):
        mixture = ref_mixture_rows(want_base, want_mem, lam)
        np.testing.assert_allclose(nll_mix[:, j], mixture, rtol=1e-9, atol=1e-12)
    assert (nll_mix[:, 0] == nll_base).all() and (nll_mix[:, -1] == nll_mem).all()


def ref_mixture_rows(nll_base: np.ndarray, nll_mem: np.ndarray, lam: float) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return -np.logaddexp(np.log(lam) - nll_mem, np.log1p(-lam) - nll_base)


def test_score_rows_base_only_and_bad_arguments():
    rng = np.random.default_rng(31)
    base = np.stack([logits(rng, 700, 2.0) for _ in range(4)])
    targets = np.array([0, 5, 699, 300])
    nll_base, nll_mem, nll_mix = score_rows(base, None, targets, np.array([0.2, 0.8]))
    np.testing.assert_allclose(nll_base, ref_nll(base, 700, targets), rtol=1e-9)
    assert np.isnan(nll_mem).all() and (nll_mix == nll_base[:, None]).all()
    assert score_rows(base, None, targets, np.array([]))[2].shape == (4, 0)
    with pytest.raises(ValueError, match="targets"):
        score_rows(base, base[:, :600], targets, np.array([0.5]))
    with pytest.raises(ValueError, match="lambda must be between 0 and 1"):
        score_rows(base, base, targets, np.array([1.2]))
    with pytest.raises(ValueError, match="rows"):
        score_rows(base, base[:3], targets, np.array([0.5]))
    ones = np.ones(4, np.int64)
    fewer = score_rows(base, base[:, ::-1].copy(), ones, np.array([0.5]), n_ids=650)  # softmax over ids < 650
    np.testing.assert_allclose(fewer[0], ref_nll(base, 650, ones), rtol=1e-9)


@pytest.mark.parametrize("lam", LAMBDAS)
@pytest.mark.parametrize("scale", [0.01, 3.0, 300.0])
def test_trace_token_matches_reference_ranks_tops_and_logprobs(lam, scale):
    rng = np.random.default_rng(int(scale * 10) + int(lam * 10))
    base, mem = logits(rng, 3000, scale), logits(rng, 2990, scale)
    base[7] = base[8]  # a tie: the lower id ranks first
    reference = {0: ref_mixture(base, mem, 0.0), 1: ref_mixture(base, mem, 1.0), 2: ref_mixture(base, mem, lam)}
    for token in (8, int(np.argmax(reference[2])), 2989):
        top_ids, top_logp, chosen_logp, chosen_rank = trace_token(base, mem, lam, token, 5)
        for row, logp in reference.items():
            order = np.lexsort((np.arange(len(logp)), -logp))
            np.testing.assert_array_equal(top_ids[row], order[:5])
            np.testing.assert_allclose(top_logp[row], logp[order[:5]], rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(chosen_logp[row], logp[token], rtol=1e-9, atol=1e-9)
            assert chosen_rank[row] == 1 + int(np.flatnonzero(order == token)[0])


def test_trace_token_without_a_memory_decoder_and_its_checks():
    rng = np.random.default_rng(5)
    base = logits(rng, 500, 2.0)
    top_ids, top_logp, chosen_logp, chosen_rank = trace_token(base, None, 0.0, 3, 0)
    want = ref_mixture(base, base, 0.0)
    assert top_ids.shape == (3, 1) and top_ids[0, 0] == top_ids[2, 0] == np.argmax(want)
    assert np.isnan(chosen_logp[1]) and chosen_rank[1] == -1 and top_ids[1, 0] == -1
    np.testing.assert_allclose(chosen_logp[[0, 2]], want[3], rtol=1e-9)
    with pytest.raises(ValueError, match="token must be an id"):
        trace_token(base, None, 0.0, 500, 3)
    with pytest.raises(ValueError, match="lambda"):
        trace_token(base, base, 1.5, 3, 3)


@pytest.mark.parametrize("lam", [0.3, 1.0])
def test_base_only_bias_gives_the_tokens_the_base_probability(lam):
    rng = np.random.default_rng(11)
    base, mem = logits(rng, 2000, 3.0), logits(rng, 2000, 3.0)
    ids = np.array([3, 7, 1500])
    base[ids[:2]] += 9.0  # the base puts real mass on them, the decoder none in particular
    z = ref_mixture(base, mem, lam)
    z[ids] += base_only_bias(base, mem, lam, ids)
    p = np.exp(z - np.logaddexp.reduce(z))
    np.testing.assert_allclose(p[ids], np.exp(ref_mixture(base, mem, 0.0)[ids]), rtol=1e-6)
    rest = np.setdiff1d(np.arange(2000), ids)
    mixed = np.exp(ref_mixture(base, mem, lam)[rest])
    np.testing.assert_allclose(p[rest] / p[rest].sum(), mixed / mixed.sum(), rtol=1e-6)
    with pytest.raises(ValueError, match="above 0"):
        base_only_bias(base, mem, 0.0, ids)
