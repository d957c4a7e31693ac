"""Fine-tuning the base itself on the domain text: a LoRA adapter (peft), or every weight (`full`: DAPT).

The baselines a memory decoder is weighed against, trained on the same tokens (a datastore's, or a split's train
documents) cut into the same sliding windows, with next-token cross-entropy and the loop every training command
shares (`steps.py`: checkpoints, `--resume`, torchrun ranks). A LoRA run leaves `adapter/` (peft's folder), a
full one `hf/` (a checkpoint `convert` reads), and both `train.json`.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from edge_memdec.defaults import PAPER_N_CTX, PAPER_STRIDE
from edge_memdec.errors import UserError
from edge_memdec.files import atomic_dir
from edge_memdec.scoring import ppl_of
from edge_memdec.train.base import load_base
from edge_memdec.train.device import autocast, resolve_device, resolve_precision
from edge_memdec.train.logprobs import cached_target_logprobs, target_logprobs
from edge_memdec.train.lora import causal_lm, with_lora
from edge_memdec.train.options import (
    BATCH_WINDOWS,
    CHECKPOINT_EVERY,
    LORA_ALPHA,
    LORA_DROPOUT,
    LORA_RANK,
    LORA_TARGETS,
    TORCH_THREADS,
)
from edge_memdec.train.steps import HF_DIR, StepPlan, distributed, finish_run, optimise
from edge_memdec.train.trainer import VALID_BASE_CACHE, save_model, window_states
from edge_memdec.windows import Window

ADAPTER_DIR = "adapter"  # what a LoRA run leaves in the run folder (a full run: steps.HF_DIR)
DEFAULT_LR = {"lora": 2e-4, "full": 2e-5}  # the usual starting points for each kind


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run depends on; its fingerprint is checkpointed so a resume uses the same."""

    base: Path  # base GGUF or HF folder
    out: Path  # run folder
    full: bool = False  # every weight (DAPT) instead of a LoRA adapter
    rank: int = LORA_RANK
    alpha: float = LORA_ALPHA  # the LoRA update is scaled by alpha / rank
    dropout: float = LORA_DROPOUT  # dropout on the LoRA's input
    targets: tuple[str, ...] = LORA_TARGETS
    epochs: int = 1
    max_steps: int | None = None
    lr: float = DEFAULT_LR["lora"]
    warmup_steps: int = 0  # steps of linear warmup to lr before the linear decay
    batch_windows: int = BATCH_WINDOWS  # windows per optimizer step (over all ranks)
    n_ctx: int = PAPER_N_CTX
    stride: int = PAPER_STRIDE
    checkpoint_every: int = CHECKPOINT_EVERY  # steps
    eval_ctx: int = PAPER_N_CTX
    eval_stride: int = PAPER_STRIDE
    seed: int = 0
    threads: int = TORCH_THREADS
    device: str = "cpu"
    precision: str = "fp32"  # auto, fp32 or bf16 (autocast of the forward's matrix products)
    valid_every: int = 0  # steps between validations besides each epoch's end (0: epoch ends only)

    @property
    def kind(self) -> str:
        return "full" if self.full else "lora"

    def check(self) -> None:
        """One sentence for the first option out of range."""
        if not self.full:
            unknown = [t for t in self.targets if t not in LORA_TARGETS]
            if unknown or not self.targets:
                raise UserError(
                    f"--targets takes some of {','.join(LORA_TARGETS)}, got {','.join(self.targets) or 'none'}"
                )
            if self.rank < 1 or not self.alpha > 0 or not 0 <= self.dropout < 1:
                raise UserError("--rank must be at least 1, --alpha above 0 and --dropout in [0, 1)")
        if not (self.n_ctx >= 2 and 0 < self.stride <= self.n_ctx):
            raise UserError(f"need --n-ctx >= 2 and 0 < --stride <= --n-ctx, got {self.n_ctx} and {self.stride}")
        if self.batch_windows < 1 or self.epochs < 1 or not self.lr > 0 or self.checkpoint_every < 1:
            raise UserError("--batch-windows, --epochs and --checkpoint-every must be at least 1 and --lr above 0")

    def fingerprint(self, tokens: np.ndarray) -> dict:
        """The settings and training tokens that must not change across a resume."""
        skip = {"out", "threads", "device", "precision", "checkpoint_every", "valid_every"}
        if not self.warmup_steps:
            skip.add("warmup_steps")  # runs from before warmup existed resume as they were
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k not in skip}
        settings["targets"] = list(self.targets)
        return {**settings, "tokens_sha256": hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()}


class OwnPpl:
    """The adapted model's own PPL on validation text, beside the base's (computed once, cached in the run)."""

    key = "ppl"

    def __init__(self, base: torch.nn.Module, tokens: np.ndarray, out: Path, n_ctx: int, stride: int):
        self.tokens, self.n_ctx, self.stride = tokens, n_ctx, stride
        self.base_lp = cached_target_logprobs(base, tokens, n_ctx, stride, out / VALID_BASE_CACHE)

    def __call__(self, model: torch.nn.Module) -> dict:
        """{"tokens", "base_ppl", "ppl"} of the current model."""
        model.eval()
        lp = target_logprobs(causal_lm(model), self.tokens, self.n_ctx, self.stride)
        model.train()
        return {"tokens": len(lp), "base_ppl": ppl_of(self.base_lp), "ppl": ppl_of(lp)}

    def describe(self, v: dict) -> str:
        return f"base {v['base_ppl']:.3f} fine-tuned {v['ppl']:.3f}"


def adaptable(model: torch.nn.Module, cfg: FinetuneConfig) -> torch.nn.Module:
    """The base wrapped in a fresh LoRA adapter (B = 0: it starts as the base), or the base with every weight
    trainable."""
    if cfg.full:
        return plain_copy(model, f"{Path(cfg.base).stem}-dapt").requires_grad_(True)
    return with_lora(model, cfg.rank, cfg.alpha, cfg.dropout, cfg.targets)


def plain_copy(model: PreTrainedModel, name: str) -> PreTrainedModel:
    """The same model named `name`, without the record of a GGUF it was read from (transformers refuses to save
    a model it believes quantized), so a full fine-tune saves as an ordinary checkpoint."""
    settings = model.config.to_dict()
    settings.pop("quantization_config", None)
    settings["_name_or_path"] = name
    copy = type(model)(type(model.config)(**settings))
    copy.load_state_dict(model.state_dict())
    return copy.to(model.device)


def window_ce(
    model, tokens: np.ndarray, w: Window, a: int, b: int, count: int, device, precision: str = "fp32"
) -> torch.Tensor:
    """Forward window `w`, backpropagate the next-token cross-entropy of its positions [a, b) / `count`;
    returns the summed cross-entropy (nats) on the CPU, float [1]."""
    with autocast(device, precision):
        states = window_states(model, tokens, None, w, 0, device)
        logits = model.lm_head(states[a - w.begin : b - w.begin])
    targets = torch.from_numpy(tokens[a + 1 : b + 1].astype(np.int64)).to(device)
    ce = F.cross_entropy(logits.float(), targets, reduction="sum")
    (ce / count).backward()
    return ce.detach().cpu()[None]


def save_trained(model: torch.nn.Module, out: Path, full: bool) -> None:
    """The fine-tuned model as `out/hf` (full) or the adapter alone as `out/adapter`, atomically."""
    if full:
        save_model(model, out / HF_DIR)
        return
    with atomic_dir(out / ADAPTER_DIR) as temp:
        model.save_pretrained(temp, save_embedding_layers=False)


def check_tokens(tokens: np.ndarray, n_vocab: int) -> None:
    """One sentence when the training tokens (int32 ids) hold an id the base's `n_vocab` tokens lack."""
    if int(tokens.max()) >= n_vocab:
        raise UserError(
            f"the training tokens hold id {int(tokens.max())} but the base has {n_vocab} tokens; "
            "make them with this base's tokenizer"
        )


def finetune(
    cfg: FinetuneConfig,
    tokens: np.ndarray,
    valid_tokens: np.ndarray | None = None,
    resume: bool = False,
    source: dict | None = None,
) -> dict:
    """Train (or resume) a LoRA adapter or a full fine-tune of `cfg.base` on `tokens` (int32 ids of the base's
    tokenizer); rank 0 writes the model and `out/train.json` and returns its summary."""
    cfg.check()
    rank, _ = distributed()
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if len(tokens) < 2:
        raise UserError("the training text has fewer than 2 tokens; give it more text")
    base = load_base(Path(cfg.base))
    check_tokens(tokens, base.model.config.vocab_size)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    base.model.to(device)
    validator = None
    if valid_tokens is not None and rank == 0:
        validator = OwnPpl(base.model, valid_tokens, out, cfg.eval_ctx, cfg.eval_stride)
    torch.manual_seed(cfg.seed)
    model = adaptable(base.model, cfg).to(device)
    inner = causal_lm(model)
    plan = StepPlan.sliding(len(tokens), cfg)
    fingerprint = cfg.fingerprint(tokens)

    def window_loss(w: Window, a: int, b: int, count: int) -> torch.Tensor:
        return window_ce(inner, tokens, w, a, b, count, device, precision)

    def keep(m: torch.nn.Module) -> None:
        save_trained(m, out, cfg.full)

    done, ranks = optimise(
        model,
        plan,
        window_loss,
        cfg,
        parts=("ce",),
        out=out,
        fingerprint=fingerprint,
        validator=validator,
        keep=keep,
        resume=resume,
        device=device,
    )
    facts = {
        "kind": cfg.kind,
        "base": str(cfg.base),
        "params_trained": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "params_total": sum(p.numel() for p in model.parameters()),
        "source_positions": plan.n_positions,
        "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks),
        "source": source or {},
        "config": fingerprint,
    }
    return finish_run(model, done, plan, ranks, key=OwnPpl.key, out=out, keep=keep, facts=facts)
