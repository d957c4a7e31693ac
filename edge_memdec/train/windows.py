"""Sliding windows over a token stream: each position is 'new' (scored, keyed) in exactly one window."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) are fed to the model; positions [first_new, end) are the ones this window owns."""

    begin: int
    end: int
    first_new: int


def sliding_windows(n_tokens: int, n_ctx: int, stride: int) -> list[Window]:
    """Windows of `n_ctx` tokens moving by `stride`; the first owns all its positions, later ones their last
    `stride` (the paper's 1024 / 512 protocol). Every position 0..n_tokens-1 is owned by exactly one window."""
    if n_ctx < 2 or not 0 < stride <= n_ctx:
        raise ValueError(f"need n_ctx >= 2 and 0 < stride <= n_ctx, got {n_ctx} and {stride}")
    windows, done, begin = [], 0, 0
    while done < n_tokens:
        end = min(begin + n_ctx, n_tokens)
        windows.append(Window(begin, end, done))
        done = end
        begin += stride
    return windows
