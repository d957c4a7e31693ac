"""The full-depth memory decoder: one-pass datastore with stored hidden states, frozen lower blocks, T chosen on
validation from one cached search, and the best epoch kept. A tiny 4-block llama base and real licence text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("faiss")

from conftest import _tiny_settings, save_checkpoint, train_tokenizer  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from edge_memdec.cli import app  # noqa: E402
from edge_memdec.errors import UserError  # noqa: E402
from edge_memdec.train.carry import CarriedForward, run_blocks  # noqa: E402
from edge_memdec.train.datastore import datastore_hidden  # noqa: E402
from edge_memdec.windows import sliding_windows  # noqa: E402

N_CTX, STRIDE, FROZEN = 64, 32, 2


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def deep_base(tmp_path_factory, tokenizer_corpus) -> Path:
    """A random tied-embedding llama with 4 blocks (so that 2 can be frozen and 2 trained)."""
    tokenizer = train_tokenizer("gpt2", tokenizer_corpus)
    return save_checkpoint(
        tmp_path_factory.mktemp("deep"),
        "llama",
        tokenizer,
        tokenizer.get_vocab_size(),
        _tiny_settings(),
        seed=3,
        num_hidden_layers=4,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=0,
        eos_token_id=2,
    )


@pytest.fixture(scope="module")
def model(deep_base):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(deep_base), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def store(tmp_path_factory, deep_base, legal_text) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("deepstore")
    (work / "legal.txt").write_text(legal_text, encoding="utf-8")
    split, ds = work / "split", work / "ds"
    invoke("corpus", "split", str(work / "legal.txt"), "--out", str(split))
    invoke(
        "datastore", "build", "--corpus", str(split), "--out", str(ds), "-m", str(deep_base),
        "--n-ctx", str(N_CTX), "--stride", str(STRIDE), "--shard-windows", "8", "--threads", "1",
        "--hidden-blocks", str(FROZEN), "--device", "cpu", "--precision", "fp32",
    )  # fmt: skip
    return {"split": split, "ds": ds, "work": work}


def reference_states(model, ids: np.ndarray):
    """Keys (last block's FFN-norm output), every block's input and the final hidden states [n, dim] from
    transformers' own forward."""
    captured = []
    hook = model.model.layers[-1].post_attention_layernorm.register_forward_hook(
        lambda _m, _i, out: captured.append(out)
    )
    with torch.no_grad():
        out = model.model(input_ids=torch.from_numpy(ids.astype(np.int64))[None], output_hidden_states=True)
    hook.remove()
    return captured[0][0], out.hidden_states, out.last_hidden_state[0]


def test_one_pass_equals_a_fresh_forward_within_a_window(model):
    """Up to n_ctx tokens the carried pass sees everything before each position: keys and the residual stream
    entering each block equal transformers' forward over the same tokens."""
    ids = np.random.default_rng(0).integers(3, 400, size=N_CTX).astype(np.int32)
    keys, hidden, _ = reference_states(model, ids)
    chunks = list(CarriedForward(model, N_CTX - STRIDE, STRIDE, (1, 2, 3)).chunks(ids, 0, N_CTX))
    assert [c.start for c in chunks] == [0, STRIDE]
    torch.testing.assert_close(torch.cat([c.keys for c in chunks]), keys, atol=1e-5, rtol=1e-5)
    for block in (1, 2, 3):
        got = torch.cat([c.hidden[block] for c in chunks])
        torch.testing.assert_close(got, hidden[block][0], atol=1e-5, rtol=1e-5)


def test_one_pass_gives_every_position_at_least_the_windowed_context(model):
    """For each position, the farthest token its 64/32 window lets it see still changes its key in the one
    pass; a later token never does."""
    rng = np.random.default_rng(1)
    n = 5 * STRIDE + 7
    ids = rng.integers(3, 400, size=n).astype(np.int32)
    forward = CarriedForward(model, N_CTX - STRIDE, STRIDE)

    def keys_of(tokens):
        return torch.cat([c.keys for c in forward.chunks(tokens, 0, n)])

    base = keys_of(ids)
    owner = {p: w for w in sliding_windows(n, N_CTX, STRIDE) for p in range(w.first_new, w.end)}
    for p in (5, N_CTX - 1, N_CTX, N_CTX + 13, n - 2):
        farthest = owner[p].begin
        changed = ids.copy()
        changed[farthest] = (changed[farthest] + 1) % 400
        assert not torch.allclose(keys_of(changed)[p], base[p]), p
        if p + 1 < n:
            later = ids.copy()
            later[p + 1] = (later[p + 1] + 1) % 400
            torch.testing.assert_close(keys_of(later)[p], base[p])


def test_stored_hidden_states_and_upper_blocks_equal_the_base(store, model):
    """The datastore's hidden states entering block 2 equal a fresh forward (first window: full context), and
    blocks 2-3 run on them give the base's final hidden states."""
    ds = store["ds"]
    manifest = json.loads((ds / "datastore.json").read_text())
    assert manifest["pass"] == "carry" and manifest["hidden_blocks"] == [FROZEN]
    assert manifest["precision"] == "fp32"
    tokens = np.load(ds / "tokens.npy")
    stored = np.load(ds / f"hidden-{FROZEN:03d}-00000.npy")
    keys = np.load(ds / "keys-00000.npy")
    ref_keys, ref_hidden, final = reference_states(model, tokens[:N_CTX])
    np.testing.assert_allclose(stored[:N_CTX], ref_hidden[FROZEN][0].numpy(), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(keys[:N_CTX], ref_keys.numpy(), atol=2e-3, rtol=2e-3)
    with torch.no_grad():
        top = run_blocks(model, ref_hidden[FROZEN], FROZEN)
    torch.testing.assert_close(top, final, atol=1e-5, rtol=1e-5)
    # training reads windows of them from the shards: any window, across shard ends, as the files hold them
    whole = np.concatenate([np.load(ds / f"hidden-{FROZEN:03d}-{s['index']:05d}.npy") for s in manifest["shards"]])
    rows = datastore_hidden(ds, FROZEN)
    assert rows.shape == whole.shape and len(manifest["shards"]) > 2
    for start in (0, manifest["shards"][1]["start"] - 5, len(whole) - N_CTX):
        np.testing.assert_array_equal(rows[start : start + N_CTX], whole[start : start + N_CTX].astype(np.float32))
    with pytest.raises(UserError, match="stores no hidden states entering block 1"):
        datastore_hidden(ds, 1)


def test_bf16_datastore_is_recorded_close_to_fp32_and_resumes_only_as_bf16(store, deep_base):
    """`--precision bf16` (autocast, emulated where the CPU has no bf16) gives keys and hidden states within
    bf16's rounding of the fp32 build's, says so in the manifest, and refuses to be resumed in fp32."""
    fp32, bf16 = store["ds"], store["work"] / "ds-bf16"
    args = [
        "datastore", "build", "--corpus", str(store["split"]), "--out", str(bf16), "-m", str(deep_base),
        "--n-ctx", str(N_CTX), "--stride", str(STRIDE), "--shard-windows", "8", "--threads", "1",
        "--hidden-blocks", str(FROZEN), "--device", "cpu",
    ]  # fmt: skip
    invoke(*args, "--precision", "bf16")
    assert json.loads((bf16 / "datastore.json").read_text())["precision"] == "bf16"
    for name in ("keys-00000.npy", f"hidden-{FROZEN:03d}-00000.npy"):
        a, b = np.load(fp32 / name).astype(np.float32), np.load(bf16 / name).astype(np.float32)
        assert not np.array_equal(a, b), name  # the products really ran in bf16
        scale = np.abs(a).mean()
        assert np.abs(a - b).mean() < 0.03 * scale, name
    res = CliRunner().invoke(app, [*args, "--precision", "fp32"])
    assert "built with --precision bf16; resume it with the same" in str(res.exception)


def test_temperature_chosen_on_validation_from_one_search(store):
    ds, out = store["ds"], store["work"] / "targets-auto"
    args = (
        "knn-targets", str(ds), "--out", str(out), "--temperature", "auto", "--temperatures", "0.5,2,8",
        "--ks", "4,8", "--top", "4", "--valid-tokens", "400", "--threads", "1", "--index", "ivfflat",
        "--ivf-lists", "4", "--nprobe", "2",
    )  # fmt: skip
    output = invoke(*args)
    manifest = json.loads((out / "targets.json").read_text())
    rows = manifest["sweep"]["rows"]
    assert sorted((r["temperature"], r["k"]) for r in rows) == [
        (t, k) for t in (0.5, 2.0, 8.0) for k in (4, 8)
    ]
    chosen = min(rows, key=lambda r: r["ppl"])
    assert (
        manifest["params"]["temperature"] == chosen["temperature"] and manifest["params"]["k"] == chosen["k"]
    )
    assert f"best T {chosen['temperature']:g}" in output
    agreement = manifest["exact_agreement"]
    assert 0 <= agreement["nearest_same"] <= 1 and 0 < agreement["recall_at_k"] <= 1
    assert "vs exact search" in output
    # a rerun takes the recorded choice instead of searching again
    again = invoke(*args)
    assert "kNN-LM on validation" not in again


@pytest.fixture(scope="module")
def frozen_run(store, deep_base, tmp_path_factory) -> Path:
    """A 3-epoch run with blocks 0-1 frozen (read from the datastore) and blocks 2-3 trained."""
    ds = store["ds"]
    invoke("knn-targets", str(ds), "-k", "8", "--top", "4", "--temperature", "1", "--threads", "1")
    run = tmp_path_factory.mktemp("frozen") / "run"
    invoke(
        "train", str(ds), "--out", str(run), "-m", str(deep_base), "--frozen-blocks", str(FROZEN),
        "--epochs", "3", "--lr", "3e-2", "--n-ctx", "32", "--stride", "32", "--batch-windows", "8",
        "--valid-corpus", str(store["split"]), "--valid-tokens", "300", "--threads", "1", "--device", "cpu",
    )  # fmt: skip
    return run


def test_frozen_blocks_train_only_the_top_and_the_best_epoch_is_kept(frozen_run, deep_base):
    run = frozen_run
    trained = load_file(str(run / "hf" / "model.safetensors"))
    base = load_file(str(deep_base / "model.safetensors"))
    for name in base:
        frozen = name.startswith(("model.embed_tokens", "model.layers.0.", "model.layers.1."))
        same = np.array_equal(trained[name], base[name])
        assert same == frozen, f"{name}: {'changed' if frozen else 'unchanged'}"
    summary = json.loads((run / "train.json").read_text())
    epochs = [r for r in summary["history"] if "validation" in r]
    assert len(epochs) == 3
    best = min(epochs, key=lambda r: r["validation"]["best_ppl"])
    assert summary["best_epoch"] == best["epoch"] and summary["validation"] == best["validation"]
    # the saved model is that epoch's: its validation PPL, recomputed, is the one recorded then
    from transformers import AutoModelForCausalLM

    from edge_memdec.train.logprobs import target_logprobs

    saved = AutoModelForCausalLM.from_pretrained(str(run / "hf"), dtype=torch.float32).eval()
    tokens = np.load(run / "valid-base-logprobs.npz")["tokens"]
    ppl = float(np.exp(-target_logprobs(saved, tokens, 1024, 512).mean()))  # the trainer's validation windows
    assert ppl == pytest.approx(best["validation"]["memdec_ppl"], rel=1e-4)


def continue_run(store, deep_base: Path, init: Path, out: Path, lr: str, *more: str) -> Path:
    """One more epoch of a frozen-blocks run from `init` (a checkpoint folder or a decoder GGUF) into `out`;
    `more`: further `train` options."""
    invoke(
        "train", str(store["ds"]), "--out", str(out), "-m", str(deep_base), "--init", str(init),
        "--frozen-blocks", str(FROZEN), "--epochs", "1", "--lr", lr, "--n-ctx", "32", "--stride", "32",
        "--batch-windows", "8", "--threads", "1", "--device", "cpu", *more,
    )  # fmt: skip
    return out


def test_more_epochs_continue_a_frozen_run_from_its_checkpoint(frozen_run, store, deep_base, tmp_path):
    """`train --init RUN/hf --frozen-blocks N` continues a run whose lower blocks are the base's; a checkpoint
    whose block N-1 was trained is refused in one sentence."""
    from edge_memdec.errors import UserError

    more = continue_run(store, deep_base, frozen_run / "hf", tmp_path / "more", "3e-2")
    before = load_file(str(frozen_run / "hf" / "model.safetensors"))
    after = load_file(str(more / "hf" / "model.safetensors"))
    base = load_file(str(deep_base / "model.safetensors"))
    for name in base:
        frozen = name.startswith(("model.embed_tokens", "model.layers.0.", "model.layers.1."))
        assert np.array_equal(after[name], base[name]) == frozen, name
        assert np.array_equal(after[name], before[name]) == frozen, name
    assert "quantization_config" not in json.loads((more / "hf" / "config.json").read_text())
    refused = CliRunner().invoke(app, [
        "train", str(store["ds"]), "--out", str(tmp_path / "refused"), "-m", str(deep_base),
        "--init", str(frozen_run / "hf"), "--frozen-blocks", str(FROZEN + 1), "--threads", "1",
    ])  # fmt: skip
    assert isinstance(refused.exception, UserError), refused.output
    assert "frozen blocks are the base's" in str(refused.exception)


def test_training_continues_from_a_split_decoder_gguf(frozen_run, store, deep_base, tmp_path):
    """`train --init DECODER.gguf`: a published decoder (q8_0, base bytes kept, split in parts) is read back
    dequantized, its frozen blocks equal to the base's (so `--frozen-blocks` accepts it) and its trained blocks
    within q8_0's rounding of the run it was exported from; a file that is not a GGUF is one sentence."""
    from edge_memdec.convert import convert_checkpoint
    from edge_memdec.errors import UserError
    from edge_memdec.gguf_file import read_gguf

    base_gguf = convert_checkpoint(deep_base, tmp_path / "base-f32.gguf", "f32")
    out = tmp_path / "memdec.gguf"
    invoke(
        "convert", str(frozen_run / "hf"), "-o", str(out), "--outtype", "q8_0", "--tokenizer-from",
        str(base_gguf), "--keep-base-tensors", str(base_gguf), "--split-max-size", "200K",
    )  # fmt: skip
    (first,) = tmp_path.glob("memdec-00001-of-*.gguf")
    assert len(read_gguf(first).files) >= 2
    more = continue_run(store, deep_base, first, tmp_path / "more", "0")
    exported = load_file(str(frozen_run / "hf" / "model.safetensors"))
    after = load_file(str(more / "hf" / "model.safetensors"))
    base = load_file(str(deep_base / "model.safetensors"))
    for name in base:
        if name.startswith(("model.embed_tokens", "model.layers.0.", "model.layers.1.")):
            assert np.array_equal(after[name], base[name]), name
        else:  # lr 0: the trained blocks are what the GGUF held; q8_0 keeps 8 bits a weight, scale per 32
            scale = np.abs(exported[name]).max()
            np.testing.assert_allclose(after[name], exported[name], atol=scale / 100, err_msg=name)
    assert "quantization_config" not in json.loads((more / "hf" / "config.json").read_text())
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"plain text, no GGUF here")
    refused = CliRunner().invoke(app, [
        "train", str(store["ds"]), "--out", str(tmp_path / "refused"), "-m", str(deep_base), "--init", str(bad),
        "--frozen-blocks", str(FROZEN), "--threads", "1",
    ])  # fmt: skip
    assert isinstance(refused.exception, UserError), refused.output
    assert "\n" not in str(refused.exception)


def test_export_keeps_the_base_bytes_of_frozen_tensors(frozen_run, deep_base, tmp_path):
    """`--keep-base-tensors`: the frozen blocks and tied embedding are the base GGUF's own bytes and type; the
    trained blocks get --outtype."""
    from edge_memdec.convert import convert_checkpoint
    from edge_memdec.gguf_file import read_gguf

    base_gguf = convert_checkpoint(deep_base, tmp_path / "base-f32.gguf", "f32")
    out = tmp_path / "memdec.gguf"
    invoke(
        "convert", str(frozen_run / "hf"), "-o", str(out), "--outtype", "q8_0", "--tokenizer-from",
        str(base_gguf), "--keep-base-tensors", str(base_gguf),
    )  # fmt: skip
    base, memdec = read_gguf(base_gguf), read_gguf(out)
    theirs = {t.name: t for t in base.tensors}
    for tensor in memdec.tensors:
        if len(tensor.shape) == 1:
            continue
        frozen = tensor.name.startswith(("token_embd", "blk.0.", "blk.1."))
        assert tensor.dtype == ("F32" if frozen else "Q8_0"), tensor.name
        same = np.array_equal(memdec.tensor_bytes(tensor), base.tensor_bytes(theirs[tensor.name]))
        assert same == frozen, tensor.name


def test_carried_pass_keeps_its_sink_tokens(model):
    """With `sink`, the run's first tokens stay visible to every later chunk (the attention sink a window's first
    tokens give); without it, the first block of a position 4 chunks on does not attend to token 0 (the output of
    block 0 is the residual stream entering block 1)."""
    ids = np.random.default_rng(2).integers(3, 400, size=5 * STRIDE).astype(np.int32)
    changed = ids.copy()
    changed[0] = (changed[0] + 1) % 400
    p = 5 * STRIDE - 1
    for sink, sees in ((0, False), (4, True)):
        forward = CarriedForward(model, N_CTX - STRIDE, STRIDE, (1,), sink=sink)
        a = torch.cat([c.hidden[1] for c in forward.chunks(ids, 0, len(ids))])[p]
        b = torch.cat([c.hidden[1] for c in forward.chunks(changed, 0, len(ids))])[p]
        assert (not torch.allclose(a, b)) == sees, sink


def test_untied_head_continues_a_frozen_run_and_exports_to_a_shared_trunk_pair(
    frozen_run, store, deep_base, legal_text, tmp_path
):
    """`--head untied` from a tied frozen-blocks run: the head starts as a copy of the embeddings and trains
    while the embeddings and lower blocks stay the base's; the GGUF carries it as `output.weight`, and llama.cpp
    scores the decoder as PyTorch does, whole or on the base's shared trunk."""
    from transformers import AutoModelForCausalLM

    from edge_memdec.api import MemoryDecoderLM
    from edge_memdec.convert import convert_checkpoint
    from edge_memdec.gguf_file import read_gguf
    from edge_memdec.train.logprobs import target_logprobs

    run = continue_run(store, deep_base, frozen_run / "hf", tmp_path / "untied", "3e-2", "--head", "untied")
    after = load_file(str(run / "hf" / "model.safetensors"))
    base = load_file(str(deep_base / "model.safetensors"))
    assert np.array_equal(after["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not np.allclose(after["lm_head.weight"], base["model.embed_tokens.weight"])
    assert json.loads((run / "hf" / "config.json").read_text())["tie_word_embeddings"] is False
    # continuing the untied run keeps its trained head (lr 0: nothing moves)
    again = continue_run(store, deep_base, run / "hf", tmp_path / "again", "0", "--head", "untied")
    kept = load_file(str(again / "hf" / "model.safetensors"))["lm_head.weight"]
    assert np.array_equal(kept, after["lm_head.weight"])

    base_gguf = convert_checkpoint(deep_base, tmp_path / "base-f32.gguf", "f32")
    out = tmp_path / "memdec.gguf"
    invoke(
        "convert", str(run / "hf"), "-o", str(out), "--outtype", "f32", "--tokenizer-from", str(base_gguf),
        "--keep-base-tensors", str(base_gguf),
    )  # fmt: skip
    assert "output.weight" in {t.name for t in read_gguf(out).tensors}
    text = legal_text[:4000]
    reports = {}
    for shared in (True, False):
        with MemoryDecoderLM(base_gguf, out, lam=0.5, n_ctx=128, n_threads=1, shared_trunk=shared) as lm:
            assert lm.pair.shared == (FROZEN if shared else 0)
            tokens = np.asarray(lm.pair.base.tokenize(text, special=False))  # as the paper protocol reads it
            reports[shared] = lm.perplexity(text, n_ctx=64, stride=32, lambdas=[0.5])
    assert reports[True]["memdec"]["ppl"] == pytest.approx(reports[False]["memdec"]["ppl"], rel=1e-5)
    model = AutoModelForCausalLM.from_pretrained(str(run / "hf"), dtype=torch.float32).eval()
    ppl = float(np.exp(-target_logprobs(model, tokens, 64, 32).mean()))
    assert reports[False]["memdec"]["ppl"] == pytest.approx(ppl, rel=1e-3)


@pytest.mark.usefixtures("frozen_run")  # it builds the datastore's kNN targets
def test_lora_decoder_adapts_every_block_and_saves_the_merged_model(store, deep_base, tmp_path):
    """`--lora-rank R`: the decoder is the whole base, a LoRA on every block's matrices trains while every weight
    stays frozen; the saved decoder is the plain model with the updates merged in, and it scores what validation
    recorded for the adapted one; combined with --frozen-blocks it is one sentence."""
    from transformers import AutoModelForCausalLM

    from edge_memdec.errors import UserError
    from edge_memdec.train.logprobs import target_logprobs

    rank, run = 4, tmp_path / "lora"
    invoke(
        "train", str(store["ds"]), "--out", str(run), "-m", str(deep_base), "--lora-rank", str(rank),
        "--epochs", "1", "--lr", "3e-2", "--n-ctx", "32", "--stride", "32", "--batch-windows", "8",
        "--valid-corpus", str(store["split"]), "--valid-tokens", "300", "--threads", "1", "--device", "cpu",
    )  # fmt: skip
    before = load_file(str(deep_base / "model.safetensors"))
    after = load_file(str(run / "hf" / "model.safetensors"))
    assert set(after) == set(before)  # every block of the base, no adapter tensors: an ordinary checkpoint
    matrices = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    adapted = 0
    for name, weight in before.items():
        changed = name.endswith(tuple(f"{m}.weight" for m in matrices))
        assert (not np.array_equal(after[name], weight)) == changed, name
        if changed:
            adapted += rank * sum(weight.shape)
    summary = json.loads((run / "train.json").read_text())
    assert summary["params_trained"] == adapted
    assert summary["params"] == sum(w.size for w in before.values())
    saved = AutoModelForCausalLM.from_pretrained(str(run / "hf"), dtype=torch.float32).eval()
    tokens = np.load(run / "valid-base-logprobs.npz")["tokens"]
    ppl = float(np.exp(-target_logprobs(saved, tokens, 1024, 512).mean()))
    assert ppl == pytest.approx(summary["validation"]["memdec_ppl"], rel=1e-4)
    refused = CliRunner().invoke(app, [
        "train", str(store["ds"]), "--out", str(tmp_path / "refused"), "-m", str(deep_base),
        "--lora-rank", "4", "--frozen-blocks", str(FROZEN), "--threads", "1",
    ])  # fmt: skip
    assert isinstance(refused.exception, UserError), refused.output
    assert "--lora-rank" in str(refused.exception) and "\n" not in str(refused.exception)
