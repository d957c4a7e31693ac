"""The kNN-LM baseline of `perplexity --knn` and `compare --knn`: the runtime's one door to the training extra.

kNN-LM mixes the base (run in PyTorch for its retrieval keys) with the distribution of the datastore's nearest
neighbours. Its scores need torch and faiss (the `train` extra), so `edge_memdec.train` is imported only here,
and only when the baseline is asked for; checking the options and the datastore needs neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_memdec.defaults import DEFAULT_LAMBDA, KNN_K, KNN_TEMPERATURE, check_lambda
from edge_memdec.errors import UserError


@dataclass(frozen=True)
class KnnBaseline:
    """kNN-LM from the datastore folder `datastore`, mixed at weight `lam`, with `k` neighbours per position and
    softmax(-d / `temperature`) over their squared L2 distances d."""

    datastore: Path
    lam: float = DEFAULT_LAMBDA
    temperature: float = KNN_TEMPERATURE
    k: int = KNN_K

    def check(self) -> dict:
        """Refuse bad options or a missing or unfinished datastore before any scoring; returns its manifest."""
        check_lambda(self.lam)
        if self.k < 1 or self.temperature <= 0:
            raise UserError("-k must be at least 1 and --knn-temperature above 0")
        from edge_memdec.train.datastore import read_manifest  # numpy only: no torch needed to read it

        return read_manifest(self.datastore)

    def report(self, base: str | Path, text: str, n_ctx: int, stride: int, lambdas: Sequence[float]) -> dict:
        """The kNN-LM report (`scoring.knn_lm_report`: at `lam` and at the best of `lambdas`) on `text`, scored
        over windows of `n_ctx` tokens moving by `stride` (the first scoring all its positions, later ones their
        last `stride`), the base being the GGUF or Hugging Face folder `base`."""
        from edge_memdec.scoring import knn_lm_report

        try:
            from edge_memdec.train.knn_lm import knn_lm_scores
        except ImportError as err:
            raise UserError(f"the kNN-LM baseline needs the training extra (torch, faiss): {err}") from None
        scores = knn_lm_scores(Path(base), Path(self.datastore), text, n_ctx, stride, self.k, self.temperature)
        return knn_lm_report(scores, self.lam, lambdas)
