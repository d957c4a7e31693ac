"""Training the memory decoder to imitate the kNN distribution (and the next token).

The steps, checkpoints, `--resume` and torchrun ranks are the shared loop's (`steps.py`); this file builds the
decoder, its frozen part and its loss, and validates the mixture base + decoder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from edge_memdec.defaults import PAPER_N_CTX, PAPER_STRIDE, VALIDATION_LAMBDAS
from edge_memdec.errors import UserError
from edge_memdec.files import atomic_dir
from edge_memdec.scoring import mixed_ppl
from edge_memdec.train.base import Base, load_base
from edge_memdec.train.carry import run_blocks
from edge_memdec.train.datastore import ShardRows, datastore_hidden, read_manifest
from edge_memdec.train.device import autocast, resolve_device, resolve_precision
from edge_memdec.train.knn_targets import load_targets
from edge_memdec.train.logprobs import cached_target_logprobs, target_logprobs
from edge_memdec.train.lora import adapter_params, causal_lm, merged, with_lora
from edge_memdec.train.loss import memdec_loss_sum
from edge_memdec.train.memdec_model import MemdecShape, make_memdec, n_params
from edge_memdec.train.options import (
    BATCH_WINDOWS,
    CHECKPOINT_EVERY,
    LORA_TARGETS,
    MEMDEC_BETA,
    MEMDEC_LR,
    TORCH_THREADS,
)
from edge_memdec.train.steps import HF_DIR, StepPlan, distributed, finish_run, optimise
from edge_memdec.windows import Window

VALID_BASE_CACHE = "valid-base-logprobs.npz"  # the base's target log-probs on the validation text


@dataclass
class TrainConfig:
    """Everything a training run depends on; stored in the checkpoint so a resume uses the same settings."""

    datastore: Path  # datastore folder (tokens and keys)
    out: Path  # run folder: checkpoint.pt, hf/, train.json, validation cache
    targets: Path | None = None  # kNN targets folder (default DATASTORE/targets)
    base: Path | None = None  # base GGUF or HF folder (default: the datastore's base)
    init: str = "base"  # base | scratch | HF checkpoint folder
    shape: MemdecShape = field(default_factory=MemdecShape)
    epochs: int = 1
    max_steps: int | None = None  # stop (and end the linear schedule) after this many optimizer steps
    lr: float = MEMDEC_LR
    warmup_steps: int = 0  # steps of linear warmup to lr before the linear decay
    beta: float = MEMDEC_BETA  # weight of KL(p_kNN || p_mem); 1 - beta on cross-entropy
    batch_windows: int = BATCH_WINDOWS  # windows per optimizer step (over all ranks)
    n_ctx: int = PAPER_N_CTX
    stride: int = PAPER_STRIDE
    checkpoint_every: int = CHECKPOINT_EVERY  # steps
    valid_tokens: np.ndarray | None = None  # validation token stream (None: no validation)
    eval_ctx: int = PAPER_N_CTX
    eval_stride: int = PAPER_STRIDE
    lambdas: tuple[float, ...] = VALIDATION_LAMBDAS
    seed: int = 0
    threads: int = TORCH_THREADS
    frozen_blocks: int = 0  # lower blocks kept at the base's weights; their output is read from the datastore
    head: str = "tied"  # tied: LM head = embeddings (frozen when frozen_blocks > 0); untied: a trained copy
    lora_rank: int = 0  # >0: a LoRA of this rank on every block's matrices trains, every other weight frozen
    device: str = "cpu"
    precision: str = "fp32"  # auto, fp32 or bf16 (autocast of the forward's matrix products)
    valid_every: int = 0  # steps between validations besides each epoch's end (0: epoch ends only)

    def fingerprint(self) -> dict:
        """The settings that must not change across a resume."""
        skip = {"valid_tokens", "checkpoint_every", "threads", "out", "device", "precision", "valid_every"}
        if not self.warmup_steps:
            skip.add("warmup_steps")  # runs from before warmup existed resume as they were
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k not in skip}


def holds_base_below(model: torch.nn.Module, base: Base, cfg: TrainConfig) -> bool:
    """Whether a checkpoint's embeddings and first `cfg.frozen_blocks` blocks equal the base's exactly (a decoder
    trained with those blocks frozen, continued with `--init RUN/hf`)."""
    theirs = base.model.state_dict()
    prefixes = ["model.embed_tokens."] + [f"model.layers.{i}." for i in range(cfg.frozen_blocks)]
    for name, weight in model.state_dict().items():
        if any(name.startswith(p) for p in prefixes):
            if name not in theirs or not torch.equal(weight, theirs[name].float()):
                return False
    return True


def prepare_frozen(model: torch.nn.Module, base: Base, cfg: TrainConfig, ds_dir: Path) -> ShardRows | None:
    """Freeze what `cfg` keeps at the base's weights and untie the head if asked; returns the stored residual
    stream entering the first trained block ([n_positions, dim], read from the datastore's shards a window at a
    time) when lower blocks are frozen."""
    if cfg.head not in ("tied", "untied"):
        raise UserError(f"--head must be tied or untied, got {cfg.head!r}")
    if cfg.head == "untied" and model.config.tie_word_embeddings:  # an untied checkpoint keeps its trained head
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
        model.config.tie_word_embeddings = False
    if cfg.frozen_blocks <= 0:
        return None
    n_layers = len(model.model.layers)
    same_depth = n_layers == base.model.config.num_hidden_layers
    if cfg.init == "base":
        whole_base = same_depth and cfg.shape.base_layers in (None, tuple(range(n_layers)))
    else:  # scratch never holds the base; a checkpoint does when it was trained with these blocks frozen
        whole_base = cfg.init != "scratch" and same_depth and holds_base_below(model, base, cfg)
    if not whole_base:
        raise UserError(
            "--frozen-blocks needs the whole base as the starting decoder (--init base and every base layer, or"
            " a checkpoint whose embeddings and frozen blocks are the base's)"
        )
    if not 0 < cfg.frozen_blocks < n_layers:
        raise UserError(f"--frozen-blocks must be between 1 and {n_layers - 1}, got {cfg.frozen_blocks}")
    model.model.embed_tokens.requires_grad_(False)  # it feeds the frozen blocks (and is the head when tied)
    for layer in model.model.layers[: cfg.frozen_blocks]:
        layer.requires_grad_(False)
    return datastore_hidden(ds_dir, cfg.frozen_blocks)


def adapt_every_block(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """`model` with a LoRA of rank `cfg.lora_rank` on each block's matrices (scaled by 2, no dropout: the decoder is
    to memorise its corpus), or `model` itself when `cfg.lora_rank` is 0."""
    if cfg.lora_rank == 0:
        return model
    if cfg.lora_rank < 0:
        raise UserError(f"--lora-rank must be 0 (off) or a rank of at least 1, got {cfg.lora_rank}")
    if cfg.frozen_blocks or cfg.head != "tied":
        raise UserError("--lora-rank adapts every block with the head tied; leave out --frozen-blocks and --head untied")
    return with_lora(model, cfg.lora_rank, 2.0 * cfg.lora_rank, 0.0, LORA_TARGETS)


def window_states(model, tokens: np.ndarray, hidden: ShardRows | None, w: Window, frozen: int, device):
    """The decoder's final hidden states over window `w`, [w.end - w.begin, dim]: a full forward from token ids,
    or, with `frozen` lower blocks, the stored residual stream entering block `frozen` through the upper ones."""
    if hidden is None:
        ids = torch.from_numpy(tokens[w.begin : w.end].astype(np.int64)).to(device)[None]
        return model.model(input_ids=ids, use_cache=False).last_hidden_state[0]
    x = torch.from_numpy(hidden[w.begin : w.end]).to(device)[None]  # float32, read from the shards
    return run_blocks(model, x, frozen)


def save_model(model: torch.nn.Module, hf_dir: Path) -> None:
    """save_pretrained into a temporary sibling folder, then swap it in: a kill never leaves half a model. A LoRA
    decoder saves as the plain model its adapter merges into."""
    with atomic_dir(hf_dir) as temp:
        merged(model).save_pretrained(temp, safe_serialization=True)


class Validator:
    """Mixed PPL on validation text: base target log-probs cached once in the run folder."""

    key = "best_ppl"  # the mixture's PPL at its best lambda: the figure the kept model minimises

    def __init__(self, base: Base, tokens: np.ndarray, out: Path, n_ctx: int, stride: int, lambdas):
        self.tokens, self.n_ctx, self.stride, self.lambdas = tokens, n_ctx, stride, list(lambdas)
        self.base_lp = cached_target_logprobs(base.model, tokens, n_ctx, stride, out / VALID_BASE_CACHE)

    def __call__(self, model: torch.nn.Module) -> dict:
        """{"base_ppl", "memdec_ppl", "mixed": {lambda: ppl}, "best_lambda", "best_ppl"} of the current model."""
        model.eval()
        mem_lp = target_logprobs(causal_lm(model), self.tokens, self.n_ctx, self.stride)
        model.train()
        table = mixed_ppl(self.base_lp, mem_lp, [0.0, *self.lambdas, 1.0])
        best = min(self.lambdas, key=lambda lam: table[lam])
        return {
            "tokens": len(self.base_lp),
            "base_ppl": table[0.0],
            "memdec_ppl": table[1.0],
            "mixed": {str(lam): table[lam] for lam in self.lambdas},
            "best_lambda": best,
            "best_ppl": table[best],
        }

    def describe(self, v: dict) -> str:
        return (
            f"base {v['base_ppl']:.3f} memdec {v['memdec_ppl']:.3f} "
            f"mixed {v['best_ppl']:.3f} at lambda {v['best_lambda']}"
        )


def window_backward(
    model: torch.nn.Module,
    tokens: np.ndarray,
    hidden: ShardRows | None,
    targets: tuple[np.ndarray, np.ndarray],
    w: Window,
    a: int,
    b: int,
    count: int,
    cfg: TrainConfig,
    device,
    precision: str = "fp32",
) -> torch.Tensor:
    """Forward window `w`, backpropagate its positions [a, b)'s loss sum / `count` (the step's positions);
    returns the summed (loss, kl, ce) on the CPU, float [3]. `targets`: the sparse kNN (ids, probs)."""
    knn_ids, knn_probs = targets
    with autocast(device, precision):
        states = window_states(model, tokens, hidden, w, cfg.frozen_blocks, device)
        logits = model.lm_head(states[a - w.begin : b - w.begin])
    loss, kl, ce = memdec_loss_sum(
        logits,
        torch.from_numpy(tokens[a + 1 : b + 1].astype(np.int64)).to(device),
        torch.from_numpy(knn_ids[a:b].astype(np.int64)).to(device),
        torch.from_numpy(knn_probs[a:b].astype(np.float32)).to(device),
        cfg.beta,
    )
    (loss / count).backward()
    return torch.stack([loss.detach(), kl.detach(), ce.detach()]).cpu()


def load_training_data(cfg: TrainConfig) -> tuple[dict, np.ndarray, tuple[np.ndarray, np.ndarray], dict]:
    """The datastore's manifest, its token stream (int32 [n_tokens]), its sparse kNN targets (ids int32 and
    probs float16, [n_tokens - 1, top], memory-mapped) and the targets' manifest."""
    ds = read_manifest(cfg.datastore)
    tokens = np.load(Path(cfg.datastore) / "tokens.npy")
    knn_ids, knn_probs, tmeta = load_targets(cfg.targets or Path(cfg.datastore) / "targets")
    if len(knn_ids) != len(tokens) - 1:
        raise UserError("the kNN targets were made from another datastore; rerun `edge-memdec knn-targets`")
    return ds, tokens, (knn_ids, knn_probs), tmeta


def build_decoder(cfg: TrainConfig, base: Base) -> tuple[torch.nn.Module, ShardRows | None]:
    """The decoder to train, made from `base` as `cfg` says (seeded), with its frozen part; and the stored
    residual stream its first trained block reads (float16 [n_positions, dim]) when lower blocks are frozen."""
    torch.manual_seed(cfg.seed)
    model = make_memdec(cfg.init, base.model, cfg.shape, cfg.seed)
    hidden = prepare_frozen(model, base, cfg, Path(cfg.datastore))
    return adapt_every_block(model, cfg), hidden


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train (or resume) a memory decoder; rank 0 writes `out/hf` (HF checkpoint) and `out/train.json`."""
    rank, _ = distributed()
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ds, tokens, targets, tmeta = load_training_data(cfg)
    base = load_base(Path(cfg.base or ds["base"]))
    model, hidden = build_decoder(cfg, base)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    model.to(device)
    plan = StepPlan.sliding(len(tokens), cfg)
    validator = None
    if cfg.valid_tokens is not None and rank == 0:
        validator = Validator(base, cfg.valid_tokens, out, cfg.eval_ctx, cfg.eval_stride, cfg.lambdas)
    del base
    inner = causal_lm(model)  # the causal LM inside a LoRA wrapper, whose blocks carry the adapter

    def window_loss(w: Window, a: int, b: int, count: int) -> torch.Tensor:
        return window_backward(inner, tokens, hidden, targets, w, a, b, count, cfg, device, precision)

    def keep(m: torch.nn.Module) -> None:
        save_model(m, out / HF_DIR)

    done, ranks = optimise(
        model,
        plan,
        window_loss,
        cfg,
        parts=("loss", "kl", "ce"),
        out=out,
        fingerprint=cfg.fingerprint(),
        validator=validator,
        keep=keep,
        resume=resume,
        device=device,
    )
    facts = {
        "params": n_params(model) - adapter_params(model),
        "params_trained": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "datastore_positions": plan.n_positions,
        "knn": tmeta["params"],
        "config": cfg.fingerprint(),
        "precision": precision,
    }
    return finish_run(model, done, plan, ranks, key=Validator.key, out=out, keep=keep, facts=facts)
