"""The options of `edge-memdec train`, `transfer` and `lora train` as typed configs, and the defaults the
training commands share (the CLI shows them; the trainers' configs start from them).

`RunOptions` holds the options `train` and `transfer` share; each command's own options extend it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# defaults of the training commands (`datastore build`, `train`, `transfer`, `lora train`); their windows are
# defaults.PAPER_N_CTX and PAPER_STRIDE
BATCH_WINDOWS = 4  # windows per optimizer step (over all ranks)
CHECKPOINT_EVERY = 50  # optimizer steps between checkpoints
VALID_TOKENS = 20_000  # validation tokens (whole documents, seeded sample)
TORCH_THREADS = 2  # torch threads per process
SHARD_WINDOWS = 32  # `datastore build`: windows (or stride-sized chunks) per shard file
MEMDEC_LR = 1e-3  # `train`: peak learning rate of a memory decoder
MEMDEC_BETA = 0.5  # `train`: weight of KL(p_kNN || p_mem); 1 - beta on cross-entropy
MEMDEC_OUTTYPE = "q8_0"  # `train`, `transfer`: GGUF weight type of an exported memory decoder
DOMAIN = "custom"  # `train`, `transfer`: domain name stored in the GGUF
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # a block's matrices
LORA_RANK = 16  # `lora train`: rank of the update B @ A
LORA_ALPHA = 32.0  # `lora train`: the update is scaled by alpha / rank
LORA_DROPOUT = 0.05  # `lora train`: dropout on the LoRA's input


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """What a training run reads and writes, shared by `train` and `transfer`."""

    datastore: Path  # datastore folder (with its kNN targets)
    out: Path  # run folder: checkpoints, hf/, train.json
    model: Path | None  # base GGUF or HF folder (None: the datastore's base)
    targets: Path | None  # kNN targets folder (None: DATASTORE/targets)
    checkpoint_every: int  # optimizer steps between checkpoints
    valid_corpus: Path | None  # split folder whose validation documents are scored
    valid_tokens: int  # validation tokens (whole documents, seeded sample)
    resume: bool  # continue the run in `out` from its checkpoint
    export: Path | None  # also write this GGUF
    outtype: str  # GGUF weight type for `export`
    split_max_size: str | None  # `export` above this size (e.g. "95M") as llama.cpp split parts
    tokenizer_from: Path | None  # GGUF whose tokenizer `export` copies (None: the base)
    domain: str  # domain name stored in the GGUF
    threads: int  # torch threads per process
    seed: int  # seed of the data order (and of init / new rows)


@dataclass(frozen=True, kw_only=True)
class TrainOptions(RunOptions):
    """`edge-memdec train`: the decoder's shape and init, and the optimisation."""

    init: str  # base, scratch, an HF checkpoint folder, or a decoder GGUF
    layers: int  # decoder blocks
    base_layers: str | None  # base blocks to copy, e.g. "0-2,23-29"
    hidden: int  # width (scratch only)
    ffn: int  # feed-forward width (scratch only)
    heads: int  # attention heads (scratch only)
    kv_heads: int  # key/value heads (scratch only)
    epochs: int  # passes over the datastore text
    max_steps: int | None  # stop after this many optimizer steps
    lr: float  # peak learning rate (linear decay to 0)
    warmup_steps: int  # steps of linear warmup to lr before the decay
    beta: float  # weight of KL(p_kNN || p_mem); 1 - beta on cross-entropy
    batch_windows: int  # windows per step (all ranks)
    n_ctx: int  # training window length, tokens
    stride: int  # training window stride, tokens
    frozen_blocks: int  # the base's first N blocks kept frozen (read from the datastore); 0 trains all
    head: str  # tied or untied
    lora_rank: int  # >0: train a LoRA of this rank on every block instead of the weights themselves
    device: str  # auto, cpu, cuda or mps
    lambda_gate: str  # the entropy gate `export` recommends: fit (chosen after training), off, or "SLOPE,OFFSET[,BASE_SLOPE]"
    precision: str  # auto, fp32 or bf16 (autocast)
    valid_every: int  # also validate every N steps (0: at epoch ends only)


@dataclass(frozen=True, kw_only=True)
class TransferOptions(RunOptions):
    """`edge-memdec transfer`: a trained decoder moved to a new base; None takes the source run's value."""

    memdec: Path  # the trained decoder's run folder
    source_base: Path | None  # the base it was trained with (None: from its train.json)
    new_rows: str  # compose, base or mean
    steps: int | None  # optimizer steps (None: budget_fraction of the source's)
    budget_fraction: float  # share of the source run's steps
    lr: float | None
    beta: float | None
    batch_windows: int | None
    n_ctx: int | None
    stride: int | None


@dataclass(frozen=True, kw_only=True)
class FinetuneOptions:
    """`edge-memdec lora train`: a LoRA adapter of the base (or, with `full`, every weight) on the domain text."""

    source: Path  # datastore folder (its tokens) or corpus split folder (its train documents)
    out: Path  # run folder: checkpoints, adapter/ or hf/, train.json
    model: Path | None  # base GGUF or HF folder (None: the datastore's base, else the built-in one)
    max_tokens: int | None  # cut the training tokens to this many
    full: bool  # fine-tune every weight (DAPT) instead of a LoRA adapter
    rank: int  # LoRA rank
    alpha: float  # LoRA alpha: the update B @ A is scaled by alpha / rank
    dropout: float  # dropout on the LoRA input
    targets: str  # comma-separated modules the LoRA adapts, e.g. q_proj,v_proj
    epochs: int  # passes over the training tokens
    max_steps: int | None  # stop after this many optimizer steps
    lr: float | None  # peak learning rate (None: the kind's default), linear decay to 0
    warmup_steps: int  # steps of linear warmup to lr before the decay
    batch_windows: int  # windows per step (all ranks)
    n_ctx: int  # training window length, tokens
    stride: int  # training window stride, tokens
    checkpoint_every: int  # optimizer steps between checkpoints
    valid_corpus: Path | None  # split folder whose validation documents are scored
    valid_tokens: int  # validation tokens (whole documents, seeded sample)
    valid_every: int  # also validate every N steps (0: at epoch ends only)
    resume: bool  # continue the run in `out` from its checkpoint
    export: Path | None  # also write this GGUF (the adapter, or the whole model with `full`)
    outtype: str  # GGUF weight type for `export`
    threads: int  # torch threads per process
    seed: int  # seed of the data order and the LoRA init
    device: str  # auto, cpu, cuda or mps
    precision: str  # auto, fp32 or bf16 (autocast)
