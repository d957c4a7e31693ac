"""One pass over a token stream: chunks of `stride` new tokens, each attending to the previous `carry` tokens.

The paper's 1024 / 512 windows compute every position twice (once as context, once as new). Here every
position is computed once: each chunk's keys and values are kept (keys before the rotary embedding) and the
next chunk attends to the last `carry` of them, re-rotated to positions 0..carry-1, so every chunk runs at
positions [carry, carry + stride) as the second half of a window does. With carry = n_ctx - stride, position
p sees exactly the context the windows give it: all earlier tokens for p < n_ctx, else the previous
carry + (p mod stride) tokens.

The forward reuses the base's own modules (norms, projections, MLPs, rotary embedding) and stops after the
last block's FFN norm: the datastore key. It also hands out the residual stream entering any chosen blocks:
the input a memory decoder's upper blocks see when its lower blocks are the base's own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel


@dataclass
class ChunkStates:
    """What one chunk of `n` new positions yields: keys float32 [n, dim] and the residual stream at the input
    of each requested block, {block: float32 [n, dim]} (block == n_layers: after the final norm's input)."""

    start: int
    keys: torch.Tensor
    hidden: dict[int, torch.Tensor]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def run_blocks(model: PreTrainedModel, x: torch.Tensor, first: int) -> torch.Tensor:
    """The residual stream `x` [1, n, dim] entering block `first`, run through blocks first..n_layers-1 and
    the final norm with causal attention over its own n positions (0..n-1): the upper part of a memory decoder
    whose lower blocks are the base's. Differentiable; returns [n, dim]."""
    forward = CarriedForward(model, 0, x.shape[1])
    cos, sin = forward._rope(x.shape[1], x.device)
    for i in range(first, len(forward.layers)):
        layer = forward.layers[i]
        x = x + forward._attention(layer, layer.input_layernorm(x), {}, i, cos, sin)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.model.norm(x)[0]


class CarriedForward:
    """A llama/qwen2 base run chunk by chunk with a carried, re-rotated key/value cache (see module doc)."""

    def __init__(
        self,
        model: PreTrainedModel,
        carry: int,
        stride: int,
        hidden_blocks: Sequence[int] = (),
        sink: int = 0,
    ):
        cfg = model.config
        self.model, self.carry, self.stride = model, carry, stride
        self.sink = sink  # the run's first `sink` tokens stay in the cache (an attention sink) beside the last `carry`
        self.layers = model.model.layers
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden_blocks = tuple(sorted(set(hidden_blocks)))
        if any(not 0 <= b < len(self.layers) for b in self.hidden_blocks):
            raise ValueError(f"hidden blocks must be in 0..{len(self.layers) - 1}, got {hidden_blocks}")

    def _rope(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [1, 1, n, head_dim] for positions 0..n-1 (the base's own rotary module)."""
        pos = torch.arange(n, device=device)[None]
        probe = torch.zeros(1, n, self.head_dim, device=device)
        cos, sin = self.model.model.rotary_emb(probe, pos)
        return cos[:, None].float(), sin[:, None].float()

    def _attention(self, layer, x: torch.Tensor, cache: dict, index: int, cos, sin) -> torch.Tensor:
        attn = layer.self_attn
        n = x.shape[1]
        q = attn.q_proj(x).view(1, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, n, self.n_kv, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(1, n, self.n_kv, self.head_dim).transpose(1, 2)
        old_k, old_v = cache.get(index, (k[:, :, :0], v[:, :, :0]))
        k_all, v_all = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
        m = k_all.shape[2]
        if m <= self.carry + self.sink:
            cache[index] = (k_all, v_all)
        else:
            recent = m - self.carry
            cache[index] = tuple(
                torch.cat([t[:, :, : self.sink], t[:, :, recent:]], dim=2) for t in (k_all, v_all)
            )
        q = q * cos[:, :, m - n : m] + rotate_half(q) * sin[:, :, m - n : m]
        k_rot = k_all * cos[:, :, :m] + rotate_half(k_all) * sin[:, :, :m]
        mask = torch.ones(n, m, dtype=torch.bool, device=x.device).tril(m - n)
        out = F.scaled_dot_product_attention(
            q, k_rot, v_all, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads
        )
        return attn.o_proj(out.transpose(1, 2).reshape(1, n, -1))

    @torch.no_grad()
    def chunks(self, tokens: np.ndarray, start: int, stop: int, device="cpu") -> Iterator[ChunkStates]:
        """States of positions [start, stop) in chunks of `stride`. A run starts afresh: the `carry` tokens
        before `start` go first as one chunk of context (not yielded), as a window's first half does, so a
        shard computed alone (a resumed build) equals the same shard computed in an unbroken build."""
        cos, sin = self._rope(self.sink + self.carry + self.stride, device)
        cache: dict = {}
        warm = max(0, start - self.carry)
        bounds = ([(warm, start)] if warm < start else []) + [
            (b, min(b + self.stride, stop)) for b in range(start, stop, self.stride)
        ]
        for begin, end in bounds:
            ids = torch.from_numpy(tokens[begin:end].astype(np.int64)).to(device)[None]
            x = self.model.model.embed_tokens(ids)
            hidden, keys = {}, None
            last = len(self.layers) - 1
            for i, layer in enumerate(self.layers):
                if i in self.hidden_blocks:
                    hidden[i] = x[0].float()
                x = x + self._attention(layer, layer.input_layernorm(x), cache, i, cos, sin)
                normed = layer.post_attention_layernorm(x)
                if i == last:
                    keys = normed[0].float()
                    break
                x = x + layer.mlp(normed)
            if begin >= start:
                yield ChunkStates(begin, keys, hidden)
