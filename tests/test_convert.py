"""The converter against the real things: PyTorch logits, llama.cpp loading and tokenization, quantization."""

from __future__ import annotations

import hashlib
import json
import shutil

import llama_cpp
import numpy as np
import pytest
from conftest import licence_folder, licence_text, save_checkpoint, train_tokenizer
from llama_cpp import Llama

from edge_memdec.convert import convert_checkpoint
from edge_memdec.errors import UserError
from edge_memdec.gguf_file import read_gguf

N_TOKENS = 256  # positions compared per model
# Largest |logit difference| allowed between an f32 GGUF in llama.cpp and PyTorch (logits spread ~1). Float32
# summation order differs with the CPU's kernels: 2e-5 on one machine, 2.6e-4 on another (llama, 256 positions);
# a wrong or misplaced tensor moves logits by O(0.1). GPT-2's is looser because ggml computes GELU from a table
# of f16 values (measured 2.5e-3 on tiny_gpt2; 1.4e-5 with the MLP's GELU input zeroed, see
# test_gpt2_matches_pytorch_to_f32_rounding_without_gelu).
F32_ROUNDING = 1e-3
F32_TOLERANCE = {"llama": F32_ROUNDING, "qwen2": F32_ROUNDING, "gpt2": 5e-3}
TRICKY_TEXT = (
    "Section 4(a)(ii): the Licensee's  rights   end on 2024-12-31 at 23:59, don't they? I'LL SEE.\n\n"
    "\tTabs,\r\nCRLF, café, naïve, Straße, 東京, emoji 🙂, numbers 1234567 and 3.14159, URLs https://x.org/a?b=c\n"
    "   trailing spaces   \n\n\n"
)


def llama_logits(path, tokens: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position of `tokens` in one batch: float32, shape [n_tokens, n_vocab].

    f32 KV cache and flash attention off, so an f32 model computes in f32 throughout.
    """
    n = len(tokens)
    llm = Llama(
        str(path),
        n_ctx=max(n, 64),
        n_batch=n,
        n_ubatch=n,
        logits_all=False,
        type_k=0,
        type_v=0,
        flash_attn=False,
        n_threads=2,
        verbose=False,
    )
    batch = llama_cpp.llama_batch_init(n, 0, 1)
    try:
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, 1
            batch.seq_id[i][0] = 0
        batch.n_tokens = n
        assert llama_cpp.llama_decode(llm.ctx, batch) == 0
        n_vocab = llm.n_vocab()
        rows = [
            np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, i), (n_vocab,)) for i in range(n)
        ]
        return np.stack(rows).copy()
    finally:
        llama_cpp.llama_batch_free(batch)
        llm.close()


def torch_logits(checkpoint, tokens: list[int]) -> np.ndarray:
    """PyTorch's float32 logits for every position: shape [n_tokens, n_vocab]."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def hf_tokenizer(checkpoint):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    tokenizer.encode_special_tokens = True
    return tokenizer


def perplexity(logits: np.ndarray, tokens: list[int]) -> float:
    """exp of the mean negative log-likelihood of tokens[1:] given the logits of the positions before them."""
    rows = logits[:-1].astype(np.float64)
    peak = rows.max(axis=1, keepdims=True)
    log_norm = peak[:, 0] + np.log(np.exp(rows - peak).sum(axis=1))
    return float(np.exp(np.mean(log_norm - rows[np.arange(len(rows)), tokens[1:]])))


@pytest.fixture(scope="module")
def llama_tokens(tiny_llama_ckpt, legal_text) -> list[int]:
    return hf_tokenizer(tiny_llama_ckpt).encode(legal_text).ids[:N_TOKENS]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_f32_export_matches_pytorch_logits(arch, request, legal_text):
    checkpoint = request.getfixturevalue(f"tiny_{arch}_ckpt")
    gguf = request.getfixturevalue(f"tiny_{arch}_gguf")
    tokens = hf_tokenizer(checkpoint).encode(legal_text).ids[:N_TOKENS]
    expected = torch_logits(checkpoint, tokens)
    got = llama_logits(gguf, tokens)
    assert expected.std() > 0.3  # logits spread enough for the bound to mean something
    assert np.abs(got - expected).max() <= F32_TOLERANCE[arch]


@pytest.mark.parametrize(
    ("outtype", "min_argmax", "min_correlation"),
    [
        ("f16", 0.99, 0.9999),
        ("bf16", 0.95, 0.999),
        ("q8_0", 0.9, 0.995),
        ("q5_1", 0.6, 0.9),
        ("q5_0", 0.6, 0.9),
        ("q4_1", 0.4, 0.8),
        ("q4_0", 0.4, 0.8),
        ("q4_k_m", 0.6, 0.9),
        ("iq4_nl", 0.4, 0.8),
    ],
)
def test_quantized_export_loads_and_stays_close(
    outtype, min_argmax, min_correlation, tiny_llama_ckpt, tmp_path, llama_tokens
):
    out = convert_checkpoint(tiny_llama_ckpt, tmp_path / f"tiny-{outtype}.gguf", outtype)
    assert read_gguf(out).file_type == outtype.upper()
    expected = torch_logits(tiny_llama_ckpt, llama_tokens)
    got = llama_logits(out, llama_tokens)
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).mean() >= min_argmax
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] >= min_correlation
    assert list(tmp_path.iterdir()) == [out]


def test_q8_0_perplexity_within_one_percent_of_f32(tiny_llama_ckpt, tiny_llama_gguf, tmp_path, legal_text):
    tokens = hf_tokenizer(tiny_llama_ckpt).encode(legal_text).ids[:1024]
    q8_0 = convert_checkpoint(tiny_llama_ckpt, tmp_path / "tiny-q8_0.gguf", "q8_0")
    f32_ppl = perplexity(llama_logits(tiny_llama_gguf, tokens), tokens)
    q8_0_ppl = perplexity(llama_logits(q8_0, tokens), tokens)
    assert abs(q8_0_ppl / f32_ppl - 1) < 0.01


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "memdec"])
def test_llama_cpp_tokenizes_like_hugging_face(arch, request, legal_text):
    checkpoint = request.getfixturevalue(f"tiny_{arch}_ckpt")
    gguf = request.getfixturevalue(f"tiny_{arch}_gguf")
    tokenizer = hf_tokenizer(checkpoint)
    llm = Llama(str(gguf), vocab_only=True, verbose=False)
    other_texts = [
        licence_text(licence_folder() / f"{key}.LICENSE") for key in ("gpl-2.0", "cc-by-4.0", "wtfpl-2.0")
    ]
    for text in [legal_text, TRICKY_TEXT, "<|im_start|>user\nhi<|im_end|>", *other_texts]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text).ids
    llm.close()


def test_tokenizer_from_copies_the_base_keys_verbatim(tiny_memdec_gguf, smollm2_gguf):
    memdec, base = read_gguf(tiny_memdec_gguf), read_gguf(smollm2_gguf)
    base_keys = {k: v for k, v in base.metadata.items() if k.startswith("tokenizer.")}
    assert {k: v for k, v in memdec.metadata.items() if k.startswith("tokenizer.")} == base_keys
    assert all(memdec.value_types[k] == base.value_types[k] for k in base_keys)
    assert memdec.memdec["vocab_fingerprint"] == hashlib.sha256("\n".join(base.tokens).encode()).hexdigest()
    assert memdec.memdec["lambda"] == pytest.approx(0.3)
    assert memdec.memdec["domain"] == "legal"


def test_tokenizer_json_of_smollm2_rebuilds_its_gguf_keys(tiny_memdec_ckpt, smollm2_gguf, tmp_path):
    out = convert_checkpoint(tiny_memdec_ckpt, tmp_path / "memdec.gguf", "f16")
    rebuilt, base = read_gguf(out), read_gguf(smollm2_gguf)
    for key in [
        k for k in base.metadata if k.startswith("tokenizer.") and k != "tokenizer.ggml.add_space_prefix"
    ]:
        assert rebuilt.get(key) == base.get(key), key
    assert rebuilt.get("tokenizer.ggml.pre") == "smollm"


def test_bf16_checkpoint_converts_exactly(tiny_llama_ckpt, tmp_path, llama_tokens):
    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_llama_ckpt, dtype=torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_ckpt / name, folder / name)
    out = convert_checkpoint(folder, tmp_path / "from-bf16.gguf", "f32")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        expected = model(torch.tensor([llama_tokens])).logits[0].numpy()
    assert np.abs(llama_logits(out, llama_tokens) - expected).max() <= F32_ROUNDING


def test_sharded_checkpoint_gives_the_same_model(tiny_llama_ckpt, tiny_llama_gguf, tmp_path, llama_tokens):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_llama_ckpt).save_pretrained(folder, max_shard_size="100KB")
    shutil.copy(tiny_llama_ckpt / "tokenizer.json", folder / "tokenizer.json")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 1
    out = convert_checkpoint(folder, tmp_path / "sharded.gguf", "f32")
    np.testing.assert_array_equal(
        llama_logits(out, llama_tokens), llama_logits(tiny_llama_gguf, llama_tokens)
    )


def test_llama3_rope_scaling_matches_pytorch(tmp_path, tokenizer_corpus, llama_tokens):
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    tokenizer = train_tokenizer("gpt2", tokenizer_corpus[:50])
    folder = save_checkpoint(
        tmp_path / "llama3", "llama", tokenizer, tokenizer.get_vocab_size(), {}, seed=4, rope_parameters=rope
    )
    tokens = [t % tokenizer.get_vocab_size() for t in llama_tokens]
    out = convert_checkpoint(folder, tmp_path / "llama3.gguf", "f32")
    assert read_gguf(out).get("llama.rope.freq_base") == 10000.0
    assert np.abs(llama_logits(out, tokens) - torch_logits(folder, tokens)).max() <= F32_ROUNDING


def test_tied_qwen2_matches_pytorch(tiny_qwen2_ckpt, tmp_path, legal_text):
    """Qwen2.5-0.5B, the paper's memory decoder, ties its output to the embedding: no output.weight is written."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_qwen2_ckpt / "tokenizer.json"))
    folder = save_checkpoint(
        tmp_path / "tied",
        "qwen2",
        tokenizer,
        tokenizer.get_vocab_size(),
        {},
        seed=5,
        tie_word_embeddings=True,
    )
    out = convert_checkpoint(folder, tmp_path / "tied.gguf", "f32")
    assert "output.weight" not in {t.name for t in read_gguf(out).tensors}
    tokens = tokenizer.encode(legal_text).ids[:N_TOKENS]
    assert np.abs(llama_logits(out, tokens) - torch_logits(folder, tokens)).max() <= F32_ROUNDING


def _resaved(model, tokenizer_folder, folder):
    """`model` saved at `folder` with the tokenizer files of `tokenizer_folder`."""
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_folder / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def gpt2_tokens(tiny_gpt2_ckpt, legal_text) -> list[int]:
    return hf_tokenizer(tiny_gpt2_ckpt).encode(legal_text).ids[:N_TOKENS]


def test_gpt2_matches_pytorch_to_f32_rounding_without_gelu(tiny_gpt2_ckpt, tmp_path, gpt2_tokens):
    """With the MLP's input projection zeroed, GELU sees only 0 (exact in ggml's f16 table): everything else
    the gpt2 graph computes (embeddings, LayerNorms, fused attention, biases, tied output) matches to float32
    rounding (F32_ROUNDING)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_ckpt, dtype=torch.float32)
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_fc.weight.zero_()
            block.mlp.c_fc.bias.zero_()
        expected = model(torch.tensor([gpt2_tokens])).logits[0].numpy()
    folder = _resaved(model, tiny_gpt2_ckpt, tmp_path / "no_gelu")
    out = convert_checkpoint(folder, tmp_path / "no-gelu.gguf", "f32")
    assert expected.std() > 0.3
    assert np.abs(llama_logits(out, gpt2_tokens) - expected).max() <= F32_ROUNDING


@pytest.mark.parametrize(
    ("outtype", "min_argmax", "min_correlation", "block_type"),
    [("f16", 0.99, 0.9999, "F16"), ("q8_0", 0.9, 0.995, "Q8_0"), ("q4_k_m", 0.6, 0.9, "Q4_K")],
)
def test_quantized_gpt2_loads_and_stays_close(
    outtype, min_argmax, min_correlation, block_type, tiny_gpt2_ckpt, tmp_path, gpt2_tokens
):
    """Hidden 256 fills whole K-quant blocks, so q4_k_m really stores Q4_K blocks (no fallback type)."""
    out = convert_checkpoint(tiny_gpt2_ckpt, tmp_path / f"gpt2-{outtype}.gguf", outtype)
    info = read_gguf(out)
    types = {t.name: t.dtype for t in info.tensors}
    assert info.file_type == outtype.upper()
    assert types["blk.0.attn_qkv.weight"] == types["blk.1.ffn_up.weight"] == block_type
    assert types["position_embd.weight"] == "F32"  # as llama.cpp's own quantizer leaves it
    expected = torch_logits(tiny_gpt2_ckpt, gpt2_tokens)
    got = llama_logits(out, gpt2_tokens)
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).mean() >= min_argmax
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] >= min_correlation


def test_gpt2_config_variants_match_pytorch(tmp_path, gpt2_tokenizer, gpt2_tokens):
    """An untied output, exact (erf) GELU, a narrower MLP and fp32-upcast attention all convert faithfully."""
    folder = save_checkpoint(
        tmp_path / "variant",
        "gpt2",
        gpt2_tokenizer,
        gpt2_tokenizer.get_vocab_size(),
        {},
        seed=8,
        tie_word_embeddings=False,
        activation_function="gelu",
        n_inner=512,
        reorder_and_upcast_attn=True,
    )
    out = convert_checkpoint(folder, tmp_path / "variant.gguf", "f32")
    tensors = {t.name: t.shape for t in read_gguf(out).tensors}
    assert tensors["output.weight"] == (256, 512) and tensors["blk.0.ffn_up.weight"] == (256, 512)
    import torch
    from transformers import AutoModelForCausalLM

    # eager attention: the only path where transformers applies reorder_and_upcast_attn
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        expected = model(torch.tensor([gpt2_tokens])).logits[0].numpy()
    assert np.abs(llama_logits(out, gpt2_tokens) - expected).max() <= F32_TOLERANCE["gpt2"]


def test_openai_layout_gpt2_gives_the_same_model(tiny_gpt2_ckpt, tiny_gpt2_gguf, tmp_path, gpt2_tokens):
    """OpenAI's original GPT-2 files name tensors without "transformer." and also hold each block's causal-mask
    buffers (attn.bias, attn.masked_bias): the same GGUF tensors come out, named as gguf-py's gpt2 lists them."""
    from gguf.constants import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES
    from safetensors.numpy import save_file

    from edge_memdec.convert.checkpoint import Checkpoint

    folder = _copy_checkpoint(tiny_gpt2_ckpt, tmp_path / "openai")
    source = Checkpoint(tiny_gpt2_ckpt)
    renamed = {name.removeprefix("transformer."): source.tensor(name) for name in source.names}
    for i in range(2):
        renamed[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 512, 512), dtype=np.uint8))
        renamed[f"h.{i}.attn.masked_bias"] = np.array(-1e4, dtype=np.float32)
    save_file(renamed, str(folder / "model.safetensors"))
    out = convert_checkpoint(folder, tmp_path / "openai.gguf", "f32")
    np.testing.assert_array_equal(llama_logits(out, gpt2_tokens), llama_logits(tiny_gpt2_gguf, gpt2_tokens))
    known = {
        TENSOR_NAMES[t].format(bid=i) + suffix
        for t in MODEL_TENSORS[MODEL_ARCH.GPT2]
        for i in range(2)
        for suffix in (".weight", ".bias")
    }
    assert {t.name for t in read_gguf(out).tensors} <= known


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"activation_function": "relu"}, "activation_function = 'relu', but llama.cpp's gpt2 computes GELU"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx = True, but llama.cpp"),
        (
            {"add_cross_attention": True},
            "add_cross_attention = True, but llama.cpp's gpt2 has no cross-attention",
        ),
        ({"scale_attn_weights": False}, "scale_attn_weights = False"),
        ({"n_head": 3}, "n_embd 256, not a multiple of n_head 3"),
        ({"n_positions": 1024}, r"wpe\.weight has shape \[512, 256\], but config.json implies \[1024, 256\]"),
        ({"n_layer": 3}, r"lacks the tensor for blk\.2\.attn_norm\.weight"),
        ({"layer_norm_epsilon": "1e-5"}, "layer_norm_epsilon = '1e-5'; it needs a positive number"),
    ],
)
def test_unsupported_gpt2_settings_are_one_sentence(edit, message, tiny_gpt2_ckpt, tmp_path):
    folder = _copy_checkpoint(tiny_gpt2_ckpt, tmp_path / "edited")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(UserError, match=message) as err:
        convert_checkpoint(folder, tmp_path / "out.gguf", "f32")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out.gguf").exists()


def _copy_checkpoint(source, target):
    shutil.copytree(source, target)
    return target


def test_conversion_errors_are_one_sentence_and_leave_nothing(tiny_llama_ckpt, smollm2_gguf, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "model.gguf"
    no_config = _copy_checkpoint(tiny_llama_ckpt, tmp_path / "no_config")
    (no_config / "config.json").unlink()
    mistral = _copy_checkpoint(tiny_llama_ckpt, tmp_path / "mistral")
    config = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    no_weights = _copy_checkpoint(tiny_llama_ckpt, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    whitespace = _copy_checkpoint(tiny_llama_ckpt, tmp_path / "whitespace")
    spec = json.loads((whitespace / "tokenizer.json").read_text())
    (whitespace / "tokenizer.json").write_text(json.dumps({**spec, "pre_tokenizer": {"type": "Whitespace"}}))
    cases = [
        (tmp_path / "missing", {}, "does not exist"),
        (no_config, {}, "no config.json"),
        (mistral, {}, "MistralForCausalLM model; only LlamaForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel"),
        (no_weights, {}, "no .safetensors"),
        (whitespace, {}, "pre-tokenizer"),
        (tiny_llama_ckpt, {"outtype": "q3_k"}, "unknown outtype"),
        (tiny_llama_ckpt, {"memdec": {"lambda": 1.5}}, "lambda"),
        (tiny_llama_ckpt, {"tokenizer_from": smollm2_gguf}, "49152 tokens"),
        (tiny_llama_ckpt, {"tokenizer_from": tiny_llama_ckpt / "tokenizer.json"}, "not a GGUF"),
    ]
    for checkpoint, options, message in cases:
        with pytest.raises(UserError, match=message) as err:
            convert_checkpoint(checkpoint, out, **options)
        assert "\n" not in str(err.value)
        assert list(out_dir.iterdir()) == []


def test_missing_tensor_is_named(tiny_llama_ckpt, tmp_path):
    from safetensors.numpy import save_file

    from edge_memdec.convert.checkpoint import Checkpoint

    folder = _copy_checkpoint(tiny_llama_ckpt, tmp_path / "incomplete")
    source = Checkpoint(tiny_llama_ckpt)
    kept = {n: source.tensor(n) for n in source.names if n != "model.layers.1.mlp.up_proj.weight"}
    save_file(kept, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match=r"blk\.1\.ffn_up\.weight"):
        convert_checkpoint(folder, tmp_path / "out.gguf", "f32")
    assert not (tmp_path / "out.gguf").exists()


def test_interrupted_conversion_leaves_no_file(tiny_llama_ckpt, tmp_path, monkeypatch):
    from edge_memdec.convert import export

    calls = []

    def interrupt(values, qtype):
        calls.append(qtype)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_encode(values, qtype)

    real_encode = export.encode
    monkeypatch.setattr(export, "encode", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(tiny_llama_ckpt, tmp_path / "model.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == []
