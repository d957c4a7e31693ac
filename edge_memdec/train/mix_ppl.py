"""Validation: perplexity of base + memory decoder mixtures from per-position target log-probabilities.

A mixture's probability of the target only needs both models' probabilities of that target, so the base's
target log-probs are computed once and cached; each validation then runs only the memory decoder.
"""

from __future__ import annotations

import numpy as np
import torch

from edge_memdec.train.windows import sliding_windows


@torch.no_grad()
def target_logprobs(model: torch.nn.Module, tokens: np.ndarray, n_ctx: int, stride: int) -> np.ndarray:
    """log p(token[t+1] | window) for every position t owned by a sliding window, float64 [n_tokens - 1]."""
    out = np.empty(len(tokens) - 1, dtype=np.float64)
    device = next(model.parameters()).device
    for w in sliding_windows(len(tokens), n_ctx, stride):
        ids = torch.from_numpy(tokens[w.begin : w.end].astype(np.int64)).to(device)[None]
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0]
        last = min(w.end, len(tokens) - 1)
        if last <= w.first_new:
            continue
        logits = model.lm_head(hidden[w.first_new - w.begin : last - w.begin]).float()
        logp = torch.log_softmax(logits, dim=-1)
        nxt = torch.from_numpy(tokens[w.first_new + 1 : last + 1].astype(np.int64))
        out[w.first_new : last] = logp.gather(1, nxt.to(device)[:, None])[:, 0].double().cpu().numpy()
    return out


def mixed_ppl(base_lp: np.ndarray, mem_lp: np.ndarray, lambdas: list[float]) -> dict[float, float]:
    """PPL of lambda * p_mem + (1 - lambda) * p_base for each lambda (0 is the base alone, 1 the memory decoder)."""
    result = {}
    for lam in lambdas:
        if lam <= 0:
            mix = base_lp
        elif lam >= 1:
            mix = mem_lp
        else:
            mix = np.logaddexp(np.log1p(-lam) + base_lp, np.log(lam) + mem_lp)
        result[float(lam)] = float(np.exp(-mix.mean()))
    return result
