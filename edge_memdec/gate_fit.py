"""Choosing a decoder's entropy gate (lambda_gate.py) from text: one pass of the pair per text keeps, per scored
position, both models' NLL of the target and the entropies of their next-token distributions (float64 [n, 4]);
every fixed or gated mixture is then arithmetic on those rows.

The rule `fit_gate` applies (the recipe's, and how the shipped gate was chosen with bench/lambda_gate.py): at
the decoder's lambda, the gate with the lowest PPL on domain validation text among those that keep general text
within GENERAL_BUDGET of the base's PPL; none (a fixed lambda) when a fixed lambda does better within it.
"""

from __future__ import annotations

import itertools

import numpy as np

from edge_memdec.defaults import PAPER_N_CTX, PAPER_STRIDE
from edge_memdec.lambda_gate import LambdaGate
from edge_memdec.pair import ModelPair
from edge_memdec.perplexity import window_rows
from edge_memdec.windows import paper_windows

GENERAL_BUDGET = 1.20  # general-text PPL / the base's, at most, for a recommended gate
SLOPES = (0.5, 1.0, 1.5, 2.0, 3.0)  # on the decoder's entropy, 1/nats
BASE_SLOPES = (0.0, 0.25, 0.5, 1.0, 2.0)  # on the base's entropy, 1/nats (equal to SLOPES: the entropy-gap gate)
OFFSETS = (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0)
GATES = tuple(
    LambdaGate(slope, offset, base) for slope, offset, base in itertools.product(SLOPES, OFFSETS, BASE_SLOPES)
)


def position_scores(pair: ModelPair, text: str) -> np.ndarray:
    """float64 [scored positions, 4] over the paper's 1024/512 windows of `text`: NLL under the base, NLL under
    the (single) memory decoder, entropy of the base's and of the decoder's next-token distribution (nats)."""
    from edge_memdec.kernels import row_entropies, score_rows

    tokens = pair.base.tokenize(text, add_bos=None, special=False)
    n_ctx = min(PAPER_N_CTX, pair.n_ctx)
    out = []
    with pair.lock:
        for window in paper_windows(len(tokens), n_ctx, min(PAPER_STRIDE, n_ctx // 2)):
            for base, (mem,), targets in window_rows(pair, tokens, window, None):
                nll_base, nll_mem, _ = score_rows(base, mem, targets, np.zeros(0), pair.n_shared)
                entropies = [row_entropies(rows, pair.n_shared) for rows in (base, mem)]
                out.append(np.column_stack([nll_base, nll_mem, *entropies]))
        pair.rewind(0)
    return np.concatenate(out) if out else np.zeros((0, 4))


def general_halves(text: str) -> tuple[str, str]:
    """`text` cut at the paragraph break nearest its middle: the half a gate is chosen on, the half held out."""
    cut = text.rfind("\n\n", 0, len(text) // 2)
    cut = cut if cut > 0 else len(text) // 2
    return text[:cut], text[cut:]


def gated_lambdas(scores: np.ndarray, lam: float, gate: LambdaGate | None) -> np.ndarray:
    """float64 [positions]: each position's lambda over position_scores rows, lam times the gate's factor (or
    lam everywhere without a gate)."""
    if gate is None:
        return np.full(len(scores), float(lam))
    return lam / (1.0 + np.exp(-(gate.base_weight * scores[:, 2] - gate.slope * scores[:, 3] + gate.offset)))


def mixed_logprobs(lam: np.ndarray | float, mem: np.ndarray, base: np.ndarray) -> np.ndarray:
    """log(lam p_mem + (1 - lam) p_base) per position, from the two models' log-probs of the target (nats)."""
    with np.errstate(divide="ignore"):
        return np.logaddexp(np.log(lam) + mem, np.log1p(-lam) + base)


def gated_ppl(scores: np.ndarray, lam: float, gate: LambdaGate | None) -> float:
    """PPL of the mixture at `lam` (each position's lam times the gate's factor, or fixed) over position_scores
    rows; lam 0 is the base's PPL."""
    mixed = mixed_logprobs(gated_lambdas(scores, lam, gate), -scores[:, 1], -scores[:, 0])
    return float(np.exp(-mixed.mean()))


def fit_gate(
    valid: np.ndarray, general: np.ndarray, lam: float, budget: float = GENERAL_BUDGET
) -> tuple[LambdaGate | None, list[dict]]:
    """The gate for lambda `lam` by the module's rule, from position_scores of domain validation text and of
    general text; and every candidate's {"gate", "valid", "general"} PPL ratios to the base (None: fixed)."""
    base_valid, base_general = gated_ppl(valid, 0.0, None), gated_ppl(general, 0.0, None)
    table = [
        {"gate": gate.text() if gate else None, "valid": gated_ppl(valid, lam, gate) / base_valid,
         "general": gated_ppl(general, lam, gate) / base_general, "_gate": gate}
        for gate in (None, *GATES)
    ]  # fmt: skip
    within = [row for row in table if row["general"] <= budget]
    best = min(within, key=lambda row: row["valid"]) if within else min(table, key=lambda row: row["general"])
    return best["_gate"], [{k: v for k, v in row.items() if k != "_gate"} for row in table]
