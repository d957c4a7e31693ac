"""The memory decoder's loss: beta * KL(p_kNN || p_mem) + (1 - beta) * CE(next token), from sparse kNN targets."""

from __future__ import annotations

import torch


def memdec_loss_sum(
    logits: torch.Tensor, targets: torch.Tensor, knn_ids: torch.Tensor, knn_probs: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed (not averaged) loss over positions, and its KL and CE parts (natural log).

    logits [n, vocab] of the memory decoder; targets int64 [n] next tokens; knn_ids int64 [n, top] and
    knn_probs float32 [n, top] the sparse kNN distribution (zero-probability padding contributes nothing).
    KL sums p * (log p - log p_mem) over the stored tokens, the exact KL of the stored (renormalised) distribution.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    ce = -logp.gather(1, targets[:, None]).sum()
    present = knn_probs > 0
    log_knn = torch.where(present, knn_probs, torch.ones_like(knn_probs)).log()
    kl = (knn_probs * (log_knn - logp.gather(1, knn_ids))).sum()
    return beta * kl + (1.0 - beta) * ce, kl, ce
