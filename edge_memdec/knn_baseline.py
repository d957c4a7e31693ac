"""kNN-LM baseline scores for `edge-memdec perplexity --knn`: a thin entry point over the training extra.

The computation needs torch and faiss (the `train` extra), so it is imported only when the baseline is asked for.
"""

from __future__ import annotations

from pathlib import Path

from edge_memdec.errors import UserError


def knn_lm_scores(
    base_gguf_or_dir: str | Path,
    datastore_dir: str | Path,
    text: str,
    n_ctx: int = 1024,
    stride: int = 512,
    k: int = 1024,
    temperature: float = 1.0,
) -> dict:
    """Per scored position: the base's and the kNN distribution's log-probability of the target.

    Returns {"tokens_scored", "base_logprobs" (float64 [n]), "knn_logprobs" (float64 [n], -inf where no
    neighbour holds the target), "k", "temperature", "datastore_positions", "seconds": {"base", "search"}}.
    Windows: `n_ctx` tokens moving by `stride`, the first window scoring all its positions, later ones their last
    `stride`. Mix as logaddexp(log(1 - lambda) + base, log(lambda) + knn).
    """
    try:
        from edge_memdec.train.knn_lm import knn_lm_scores as scores
    except ImportError as err:
        raise UserError(f"the kNN-LM baseline needs the training extra (torch, faiss): {err}") from None
    return scores(Path(base_gguf_or_dir), Path(datastore_dir), text, n_ctx, stride, k, temperature)
