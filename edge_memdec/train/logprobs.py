"""The PyTorch side of scoring: target log-probabilities of a Hugging Face causal LM over sliding windows.

A mixture's probability of the target only needs both models' probabilities of that target, so the base's
target log-probs are computed once and cached; each validation then runs only the memory decoder, and the
mixing itself is `edge_memdec.scoring`'s.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from edge_memdec.files import write_npz_atomic
from edge_memdec.windows import Window, sliding_windows


@torch.no_grad()
def window_logprobs(
    model: torch.nn.Module, tokens: np.ndarray, n_ctx: int, stride: int, progress: str | None = None
) -> Iterator[tuple[Window, np.ndarray]]:
    """Per sliding window that scores any position: the window and log p(token[t+1] | window) for its positions
    t in [first_new, stop), float64 [stop - first_new]. Forward hooks on `model` see each window's pass before
    it is yielded. `progress` names a tqdm bar over the windows."""
    device = next(model.parameters()).device
    windows = sliding_windows(len(tokens), n_ctx, stride)
    if progress is not None:
        from tqdm import tqdm

        windows = tqdm(windows, desc=progress, unit="window")
    for w in windows:
        ids = torch.from_numpy(tokens[w.begin : w.end].astype(np.int64)).to(device)[None]
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0]
        if w.stop <= w.first_new:
            continue
        logits = model.lm_head(hidden[w.first_new - w.begin : w.stop - w.begin]).float()
        logp = torch.log_softmax(logits, dim=-1)
        nxt = torch.from_numpy(tokens[w.first_new + 1 : w.stop + 1].astype(np.int64)).to(device)
        yield w, logp.gather(1, nxt[:, None])[:, 0].double().cpu().numpy()


def target_logprobs(model: torch.nn.Module, tokens: np.ndarray, n_ctx: int, stride: int) -> np.ndarray:
    """log p(token[t+1] | window) for every position t owned by a sliding window, float64 [n_tokens - 1]."""
    out = np.empty(len(tokens) - 1, dtype=np.float64)
    for w, logprobs in window_logprobs(model, tokens, n_ctx, stride):
        out[w.first_new : w.stop] = logprobs
    return out


def cached_target_logprobs(
    model: torch.nn.Module, tokens: np.ndarray, n_ctx: int, stride: int, cache: Path
) -> np.ndarray:
    """`target_logprobs`, kept in the npz `cache` and read back while the tokens and windows are the same (a
    resumed run does not score its base again)."""
    if cache.is_file():
        data = np.load(cache)
        if np.array_equal(data["tokens"], tokens) and int(data["n_ctx"]) == n_ctx and int(data["stride"]) == stride:
            return data["logprobs"]
    logprobs = target_logprobs(model, tokens, n_ctx, stride)
    write_npz_atomic(cache, tokens=tokens, n_ctx=n_ctx, stride=stride, logprobs=logprobs)
    return logprobs
