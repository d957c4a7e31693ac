"""Windows over a token stream, for every protocol that scores or keys text in pieces of n_ctx tokens.

A `Window` feeds tokens [begin, end) to a model and scores positions [first_new, stop): position t's logits
predict token t + 1, so stop <= end and stop <= n_tokens - 1. Three ways to cut a stream:
- `sliding_windows`: training, datastore keys, kNN-LM and validation. Windows of n_ctx moved by `stride`; each
  owns positions [first_new, end), the first all of its positions, later ones their last `stride`.
- `paper_windows`: `perplexity --protocol paper` (the Memory Decoder paper's and Hugging Face's guide): the
  same windows, but each scores the *targets* no earlier window scored, so every target lies inside its window.
- `llama_windows`: llama.cpp's `llama-perplexity`: non-overlapping chunks, the second half of each scored.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) are fed to the model; positions [first_new, stop) are scored (each predicting the
    next token); for `sliding_windows`, positions [first_new, end) are the ones this window owns."""

    begin: int
    end: int
    first_new: int
    stop: int


def sliding_windows(n_tokens: int, n_ctx: int, stride: int) -> list[Window]:
    """Windows of `n_ctx` tokens moving by `stride`; the first owns all its positions, later ones their last
    `stride` (the paper's 1024 / 512 protocol). Every position 0..n_tokens-1 is owned by exactly one window."""
    if n_ctx < 2 or not 0 < stride <= n_ctx:
        raise ValueError(f"need n_ctx >= 2 and 0 < stride <= n_ctx, got {n_ctx} and {stride}")
    windows, done, begin = [], 0, 0
    while done < n_tokens:
        end = min(begin + n_ctx, n_tokens)
        windows.append(Window(begin, end, done, min(end, n_tokens - 1)))
        done = end
        begin += stride
    return windows


def paper_windows(n_tokens: int, n_ctx: int, stride: int) -> list[Window]:
    """Sliding windows of n_ctx tokens moved by `stride`, each scoring the targets (tokens 1..n-1) not scored
    before; 1 + ceil((n_tokens - n_ctx) / stride) windows."""
    windows, scored_up_to, begin = [], 1, 0  # token 0 has no context and is never a target
    while True:
        end = min(begin + n_ctx, n_tokens)
        windows.append(Window(begin, end, max(scored_up_to, begin + 1) - 1, end - 1))
        scored_up_to = end
        if end == n_tokens:
            return windows
        begin += stride


def llama_windows(n_tokens: int, n_ctx: int) -> list[Window]:
    """llama-perplexity's chunks: n_tokens // n_ctx chunks of n_ctx tokens, positions [n_ctx // 2, n_ctx - 1)
    of each scored (the caller writes BOS over a chunk's first token when the model adds one)."""
    return [
        Window(start, start + n_ctx, start + n_ctx // 2, start + n_ctx - 1)
        for start in range(0, (n_tokens // n_ctx) * n_ctx, n_ctx)
    ]

