"""Cross-tokenizer transfer through the public CLI: a memory decoder trained for tiny base A (512-token GPT-2-style
BPE) moved to tiny base B (another BPE: 400 tokens, Qwen2-style pre-tokenizer, other width), then exported, paired
with base B by llama.cpp and scored; plus the one-sentence errors for bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("faiss")

from conftest import (  # noqa: E402
    _tiny_settings,
    licence_folder,
    licence_text,
    save_checkpoint,
    train_tokenizer,
)
from safetensors.numpy import load_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from edge_memdec.cli import app  # noqa: E402
from edge_memdec.convert import convert_checkpoint  # noqa: E402

SOURCE_STEPS = 20
VOCAB_B = 400
SMALL = ["--n-ctx", "64", "--stride", "32", "--shard-windows", "4", "--threads", "1"]
TRAIN = ["--n-ctx", "32", "--stride", "32", "--batch-windows", "2", "--threads", "1"]


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result.output


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_memdec.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def tokenizer_b():
    """A byte-level BPE unlike base A's: 400 tokens, Qwen2's split regex, trained on other licence files."""
    files = sorted(licence_folder().glob("*.LICENSE"))[5::10]
    texts = [t for t in (licence_text(f) for f in files) if t.strip()]
    return train_tokenizer("qwen2", texts, VOCAB_B)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_ckpt, tiny_llama_gguf, legal_text) -> dict[str, Path]:
    """Split; base A datastore + targets + a 20-step memory decoder; base B (checkpoint, GGUF, datastore, targets);
    the transfer to base B with validation, exported as an f32 GGUF."""
    work = tmp_path_factory.mktemp("transfer")
    text = work / "legal.txt"
    text.write_text(legal_text, encoding="utf-8")
    split, ds_a, ds_b = work / "split", work / "ds-a", work / "ds-b"
    invoke("corpus", "split", text, "--out", split)
    invoke("datastore", "build", "--corpus", split, "--out", ds_a, "-m", tiny_llama_ckpt, *SMALL)
    invoke("knn-targets", ds_a, "-k", "8", "--top", "4", "--chunk", "64", "--threads", "1")
    run_a = work / "run-a"
    invoke("train", ds_a, "--out", run_a, "-m", tiny_llama_ckpt, "--layers", "1", *TRAIN,
           "--epochs", "50", "--max-steps", SOURCE_STEPS)  # fmt: skip

    tok_b = tokenizer_b()
    base_b = save_checkpoint(
        work / "base-b", "llama", tok_b, tok_b.get_vocab_size(), _tiny_settings(), seed=5,
        hidden_size=48, tie_word_embeddings=True, rope_theta=10000.0, bos_token_id=0, eos_token_id=2,
    )  # fmt: skip
    gguf_b = convert_checkpoint(base_b, work / "base-b-f32.gguf", "f32")
    invoke("datastore", "build", "--corpus", split, "--out", ds_b, "-m", base_b, *SMALL)
    invoke("knn-targets", ds_b, "-k", "8", "--top", "4", "--chunk", "64", "--threads", "1")
    run_b, mem_b = work / "run-b", work / "memdec-b.gguf"
    output = invoke(
        "transfer", run_a, ds_b, "--out", run_b, "-m", base_b, "--threads", "1",
        "--valid-corpus", split, "--valid-tokens", "200",
        "--export", mem_b, "--outtype", "f32", "--tokenizer-from", gguf_b, "--domain", "legal",
    )  # fmt: skip
    return {"work": work, "split": split, "ds_a": ds_a, "ds_b": ds_b, "run_a": run_a, "base_b": base_b,
            "gguf_b": gguf_b, "run_b": run_b, "mem_b": mem_b, "text": text, "output": output}  # fmt: skip


def test_copied_rows_equal_the_source_and_blocks_are_kept(setup, tiny_llama_ckpt):
    vocab_a = json.loads((tiny_llama_ckpt / "tokenizer.json").read_text())["model"]["vocab"]
    vocab_b = json.loads((setup["base_b"] / "tokenizer.json").read_text())["model"]["vocab"]
    shared = sorted((vocab_b[t], vocab_a[t]) for t in vocab_b.keys() & vocab_a.keys())
    assert 0 < len(shared) < len(vocab_b), "the two tokenizers should overlap, but not entirely"
    source = load_file(str(setup["run_a"] / "hf" / "model.safetensors"))
    init = load_file(str(setup["run_b"] / "transfer-init" / "model.safetensors"))
    new_ids, old_ids = (np.array(ids) for ids in zip(*shared, strict=True))
    embed = "model.embed_tokens.weight"
    assert init[embed].shape == (VOCAB_B, source[embed].shape[1])
    np.testing.assert_array_equal(init[embed][new_ids], source[embed][old_ids])
    others = [i for i in range(VOCAB_B) if i not in set(new_ids.tolist())]
    assert np.isfinite(init[embed][others]).all() and np.abs(init[embed][others]).sum() > 0
    for name in source:
        if name != embed and name in init:
            np.testing.assert_array_equal(init[name], source[name], err_msg=name)
    facts = json.loads((setup["run_b"] / "transfer.json").read_text())
    assert facts["row_counts"]["copied"] == len(shared)
    assert facts["row_counts"]["rows"] == VOCAB_B
    assert f"{len(shared)} of {VOCAB_B} rows copied" in setup["output"]


def test_budget_is_ten_percent_and_recorded(setup):
    summary = json.loads((setup["run_b"] / "train.json").read_text())
    assert summary["transfer"]["source_steps"] == SOURCE_STEPS
    assert summary["steps"] == summary["transfer"]["steps"] == round(0.1 * SOURCE_STEPS)
    assert summary["transfer"]["budget_fraction"] == pytest.approx(0.1)
    before = json.loads((setup["run_b"] / "transfer.json").read_text())["validation_before"]
    assert math.isfinite(before["best_ppl"]) and math.isfinite(summary["validation"]["best_ppl"])
    assert "before ->" in setup["output"]


def test_exported_gguf_pairs_with_base_b_and_scores(setup):
    from edge_memdec.gguf_file import read_gguf

    facts = read_gguf(setup["mem_b"]).memdec
    assert facts["train.transfer.steps"] == 2 and facts["train.transfer.source_steps"] == SOURCE_STEPS
    assert facts["train.transfer.from_run"] == "run-a" and facts["train.transfer.rows"] == VOCAB_B
    assert "compatible with base-b-f32.gguf" in invoke("inspect", setup["mem_b"], "--base", setup["gguf_b"])
    report = setup["work"] / "ppl.json"
    invoke("perplexity", "-m", setup["gguf_b"], "--memdec", setup["mem_b"], "-f", setup["text"],
           "-c", "64", "--lambda-sweep", "0,0.3,1", "--json", report, "-t", "1")  # fmt: skip
    data = json.loads(report.read_text())
    assert math.isfinite(data["memdec"]["ppl"]) and all(math.isfinite(m["ppl"]) for m in data["mixed"])


def test_resume_of_a_finished_transfer_keeps_its_weights(setup):
    before = load_file(str(setup["run_b"] / "hf" / "model.safetensors"))
    invoke("transfer", setup["run_a"], setup["ds_b"], "--out", setup["run_b"], "-m", setup["base_b"],
           "--threads", "1", "--resume")  # fmt: skip
    after = load_file(str(setup["run_b"] / "hf" / "model.safetensors"))
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["{ds_a}", "{ds_b}", "-m", "{base_b}"], "is not a memory decoder run folder"),
        (["{run_a}", "{ds_a}", "-m", "{base_b}"], "tokenizer is not the new base's"),
        (["{run_a}", "{ds_b}", "-m", "{base_b}", "--new-rows", "base"], "equal widths"),
        (["{base_b}", "{ds_b}", "-m", "{base_b}"], "pass --steps"),
        (["{run_a}", "{ds_b}", "-m", "{base_b}", "--budget-fraction", "2"], "budget-fraction"),
    ],
)
def test_bad_input_is_one_sentence(setup, tmp_path, args, needle):
    paths = {k: str(v) for k, v in setup.items() if isinstance(v, Path)}
    proc = run_cli("transfer", *(a.format(**paths) for a in args), "--out", tmp_path / "out", "--threads", "1")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr


def test_token_texts_and_row_plan():
    """Byte-level and SentencePiece-style vocabularies meet on token bytes; unmatched tokens are composed."""
    from tokenizers import Tokenizer, decoders, models

    from edge_memdec.train.transfer import plan_rows, token_bytes

    old = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "Ġ": 2, "ab": 3, "Ġa": 4}, merges=[("a", "b"), ("Ġ", "a")]))
    old.decoder = decoders.ByteLevel()
    new = Tokenizer(models.BPE(vocab={"<0x20>": 0, "▁a": 1, "ab": 2, "abab": 3, "<0xFF>": 4}, merges=[]))
    new.decoder = decoders.Metaspace()
    assert token_bytes(old) == [b"a", b"b", b" ", b"ab", b" a"]
    assert token_bytes(new) == [b" ", b" a", b"ab", b"abab", b"\xff"]
    plan = plan_rows(old, new, n_old_rows=5, n_new_rows=6, compose=True)
    assert plan.copy_new.tolist() == [0, 1, 2] and plan.copy_old.tolist() == [2, 4, 3]
    assert plan.composed == {3: [3, 3]}  # "abab" = "ab" + "ab"; \xff has no old piece, row 5 no token
    assert plan.rest == [4, 5]


def test_reinit_vocab_new_rows_modes():
    """compose: mean of the pieces' rows; base: the new base's rows rescaled; rest: copied mean + small noise."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edge_memdec.train.transfer import RowPlan, reinit_vocab

    def tiny(vocab: int, seed: int) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)  # fmt: skip
        return LlamaForCausalLM(config)

    old, base = tiny(5, 0), tiny(6, 1)
    plan = RowPlan(6, np.array([0, 1]), np.array([3, 4]), {2: [0, 1]}, [3, 4, 5])
    emb = old.get_input_embeddings().weight.detach()
    special = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}
    model, counts = reinit_vocab(old, plan, special)
    new = model.get_input_embeddings().weight.detach()
    assert counts == {"rows": 6, "copied": 2, "composed": 1, "from_base": 0, "fallback": 3}
    torch.testing.assert_close(new[:2], emb[3:5], rtol=0, atol=0)
    torch.testing.assert_close(new[2], emb[:2].mean(0))
    assert ((new[3:] - emb[3:5].mean(0)).abs().max() < 1.0) and model.config.eos_token_id == 2
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    model, counts = reinit_vocab(old, plan, special, base_model=base)
    assert counts["from_base"] == 3 and counts["fallback"] == 0
    rows = model.get_input_embeddings().weight.detach()[3:]
    base_rows = base.get_input_embeddings().weight.detach()[3:]
    torch.testing.assert_close(rows / rows.norm(dim=1, keepdim=True), base_rows / base_rows.norm(dim=1, keepdim=True))
