"""The recipe's report on the test split: base, memory decoder alone, kNN-LM, and base + memory decoder; and the
same models (kNN-LM aside) on general text, where a decoder should cost little.

Both lambdas are chosen on validation: the memory decoder's is the one the trainer stored in the GGUF, the
kNN-LM's is tuned here on the same validation documents. Base, memory decoder and their mixture are scored by
the edge runtime (llama.cpp, the shipped q8_0 GGUF); kNN-LM needs the base's keys, so it runs the base in PyTorch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge_memdec.corpus import Document, general_sample, join_documents, split_documents_of
from edge_memdec.defaults import DEFAULT_LAMBDA, PAPER_N_CTX, PAPER_STRIDE
from edge_memdec.files import write_npz_atomic
from edge_memdec.gguf_file import read_gguf
from edge_memdec.plot import lambda_plot
from edge_memdec.scoring import knn_lm_report, mixed_ppl
from edge_memdec.train.base import load_tokenizer
from edge_memdec.train.knn_lm import knn_lm_scores
from edge_memdec.train.stream import VALIDATION_SEED, choose_documents


def split_text(tokenizer, split_dir: Path, split: str, max_tokens: int, seed: int = VALIDATION_SEED) -> str:
    """A seeded sample of whole documents of `split`, cut to about `max_tokens` tokens (the same documents the
    trainer validates on, for the validation split)."""
    return sample_text(tokenizer, split_documents_of(split_dir, split), max_tokens, seed)


def sample_text(tokenizer, docs: list[Document], max_tokens: int, seed: int = 0) -> str:
    """A seeded sample of whole documents of `docs`, joined and cut to at most `max_tokens` tokens."""
    chosen = choose_documents(tokenizer, docs, max_tokens, seed)
    ids = tokenizer.encode(join_documents(chosen), add_special_tokens=False).ids[:max_tokens]
    return tokenizer.decode(ids, skip_special_tokens=False)


def cached_knn_scores(base: Path, datastore: Path, text: str, k: int, temperature: float) -> dict:
    """knn_lm_scores over 1024/512 windows, cached in the datastore folder by a hash of (text, base, k, T)."""
    key = hashlib.sha256(f"{base}|{k}|{temperature}|{text}".encode()).hexdigest()[:16]
    path = Path(datastore) / f"knn-lm-{key}.npz"
    if path.is_file():
        data = np.load(path)
        return {name: data[name] for name in data.files} | {"seconds": json.loads(str(data["seconds_json"]))}
    scores = knn_lm_scores(Path(base), Path(datastore), text, PAPER_N_CTX, PAPER_STRIDE, k, temperature)
    arrays = {name: v for name, v in scores.items() if name != "seconds"}
    write_npz_atomic(path, **arrays, seconds_json=json.dumps(scores["seconds"]))
    return scores


def knn_lm_rows(valid: dict, test: dict, lambdas: Sequence[float]) -> tuple[dict, list[dict]]:
    """kNN-LM's row of the report, at the lambda whose mixture is best on the validation scores (the same keys as
    `perplexity --knn`'s, from `scoring.knn_lm_report` on the test scores), and its test PPL at each of `lambdas`.

    `valid` and `test` are `knn_lm_scores` results (target log-probs, natural log, float [n_scored])."""
    valid_table = mixed_ppl(valid["base_logprobs"], valid["knn_logprobs"], lambdas)
    knn_lam = min(valid_table, key=valid_table.get)
    test_table = mixed_ppl(test["base_logprobs"], test["knn_logprobs"], lambdas)
    row = knn_lm_report(test, knn_lam, lambdas) | {"valid_tokens_scored": int(valid["tokens_scored"])}
    return row, [{"lambda": lam, "ppl": ppl} for lam, ppl in test_table.items()]


def report(base: Path, memdec: Path, datastore: Path, split_dir: Path, budget, threads: int = 2) -> dict:
    """The test-split table (dict, JSON-ready); also writes NAME-lambda.png beside the memory decoder GGUF."""
    from edge_memdec.api import MemoryDecoderLM

    tokenizer = load_tokenizer(base)
    valid_text = split_text(tokenizer, split_dir, "validation", budget.valid_tokens)
    test_text = split_text(tokenizer, split_dir, "test", budget.test_tokens)
    general_text = general_sample()
    lam = round(float(read_gguf(memdec).memdec.get("lambda", DEFAULT_LAMBDA)), 6)
    lambdas = sorted({*budget.lambdas, lam})
    with MemoryDecoderLM(base, memdec, n_ctx=PAPER_N_CTX, n_batch=PAPER_N_CTX, n_threads=threads) as lm:
        gate = lm.pair.gate  # the GGUF's own entropy gate, if it recommends one: every mixed row below is gated
        ours = lm.perplexity(test_text, n_ctx=PAPER_N_CTX, stride=PAPER_STRIDE, lambdas=lambdas)
        general = lm.perplexity(general_text, n_ctx=PAPER_N_CTX, stride=PAPER_STRIDE, lambdas=lambdas)
    mixed_at = {round(r["lambda"], 6): r for r in ours["mixed"]}
    general_at = {round(r["lambda"], 6): r for r in general["mixed"]}

    # kNN-LM at the (k, T) the targets were built with: chosen where kNN-LM is best on validation
    params = json.loads((Path(datastore) / "targets" / "targets.json").read_text())["params"]
    k, temperature = int(params["k"]), float(params["temperature"])
    valid = cached_knn_scores(base, datastore, valid_text, k, temperature)
    test = cached_knn_scores(base, datastore, test_text, k, temperature)
    knn_lm, knn_mixed = knn_lm_rows(valid, test, budget.lambdas)

    table = {
        "test_tokens_scored": ours["tokens_scored"],
        "base": ours["base"],
        "memdec_alone": ours["memdec"],
        "memdec_lambda": lam,
        "lambda_gate": gate.text() if gate else None,
        "base_plus_memdec": {
            "lambda": lam,
            **{k: v for k, v in mixed_at[round(lam, 6)].items() if k != "lambda"},
        },
        "memdec_mixed": [{"lambda": r["lambda"], "ppl": r["ppl"]} for r in ours["mixed"]],
        "memdec_seconds": ours["seconds"],
        "knn_lm": knn_lm,
        "knn_mixed": knn_mixed,
        # the same models on general text (corpus.general_sample, as `compare --general news`): what the decoder
        # costs outside its domain
        "general": {
            "tokens_scored": general["tokens_scored"],
            "base": general["base"],
            "memdec_alone": general["memdec"],
            "base_plus_memdec": {
                "lambda": lam,
                **{k: v for k, v in general_at[round(lam, 6)].items() if k != "lambda"},
            },
            "memdec_mixed": [{"lambda": r["lambda"], "ppl": r["ppl"]} for r in general["mixed"]],
        },
    }
    table["ratio_mixed_to_base"] = table["base_plus_memdec"]["ppl"] / table["base"]["ppl"]
    table["ratio_knn_to_base"] = knn_lm["ppl"] / knn_lm["base_pytorch"]["ppl"]
    lambda_plot(
        Path(memdec).with_name(f"{Path(memdec).stem}-lambda.png"),
        [("base + memory decoder", table["memdec_mixed"]), ("base + kNN-LM", table["knn_mixed"])],
        [("base", table["base"]["ppl"], "tab:gray", "--")],
        "perplexity (test split)",
    )
    return table
