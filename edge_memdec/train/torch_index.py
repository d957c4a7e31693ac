"""Exact nearest-neighbour search as chunked matrix products on a torch device: the GPU search when faiss has
no GPU build. Same answers as faiss's IndexFlatL2 (squared-L2 distances, nearest first), same `search` call."""

from __future__ import annotations

import numpy as np
import torch


class TorchFlatIndex:
    """Keys held on `device` (float32, or bfloat16 on CUDA for the products); ||q - x||^2 = |q|^2 - 2 q.x + |x|^2
    per chunk of keys, a running top-k merged across chunks."""

    def __init__(
        self, keys: np.ndarray, device: torch.device, key_chunk: int = 1 << 20, query_chunk: int = 2048
    ):
        self.device, self.key_chunk, self.query_chunk = device, key_chunk, query_chunk
        self.ntotal, self.d = keys.shape
        self.keys = torch.from_numpy(np.ascontiguousarray(keys, dtype=np.float32)).to(device)
        self.norms = (self.keys.double() ** 2).sum(dim=1).float()
        self.nprobe = 0

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Distances float32 [n, k] and ids int64 [n, k] of the k nearest keys of each query, `query_chunk`
        queries at a time (each holds a [query_chunk, key_chunk] distance block on the device)."""
        parts = [
            self._search(queries[i : i + self.query_chunk], k)
            for i in range(0, len(queries), self.query_chunk)
        ]
        if not parts:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.concatenate([d for d, _ in parts]), np.concatenate([i for _, i in parts])

    @torch.no_grad()
    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
        q_norms = (q.double() ** 2).sum(dim=1, keepdim=True).float()
        best_d = torch.full((len(q), 0), float("inf"), device=self.device)
        best_i = torch.zeros((len(q), 0), dtype=torch.int64, device=self.device)
        for start in range(0, self.ntotal, self.key_chunk):
            block = self.keys[start : start + self.key_chunk]
            d = (q_norms - 2.0 * (q @ block.T) + self.norms[start : start + len(block)]).clamp_min_(0)
            top = min(k, d.shape[1])
            d, i = torch.topk(d, top, dim=1, largest=False)
            best_d, order = torch.topk(
                torch.cat([best_d, d], dim=1), min(k, best_d.shape[1] + top), largest=False
            )
            best_i = torch.gather(torch.cat([best_i, i + start], dim=1), 1, order)
        return best_d.cpu().numpy(), best_i.cpu().numpy()
