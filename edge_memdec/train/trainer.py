"""Training the memory decoder to imitate the kNN distribution (and the next token).

One process or several under torchrun: each rank runs its share of every batch's windows, gradients are summed
across ranks with one all-reduce per step (gloo on CPU, nccl on GPU), and the loss is normalised by the batch's
global position count, so any number of ranks computes the same update as one. Checkpoints (model, optimizer,
schedule, RNG, step) are written atomically; the data order is a function of (seed, epoch), so `--resume`
continues exactly where a killed run stopped.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from edge_memdec.defaults import VALIDATION_LAMBDAS
from edge_memdec.errors import UserError
from edge_memdec.files import atomic_dir, write_atomic, write_json_atomic, write_npz_atomic
from edge_memdec.scoring import mixed_ppl
from edge_memdec.train.base import Base, load_base
from edge_memdec.train.carry import run_blocks
from edge_memdec.train.datastore import load_hidden, read_manifest
from edge_memdec.train.device import autocast, resolve_device
from edge_memdec.train.knn_targets import load_targets
from edge_memdec.train.logprobs import target_logprobs
from edge_memdec.train.loss import memdec_loss_sum
from edge_memdec.train.memdec_model import MemdecShape, make_memdec, n_params
from edge_memdec.windows import Window, sliding_windows

CHECKPOINT = "checkpoint.pt"


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
    lr: float = 1e-3
    beta: float = 0.5  # weight of KL(p_kNN || p_mem); 1 - beta on cross-entropy
    batch_windows: int = 4  # windows per optimizer step (over all ranks)
    n_ctx: int = 1024
    stride: int = 512
    checkpoint_every: int = 50  # steps
    valid_tokens: np.ndarray | None = None  # validation token stream (None: no validation)
    eval_ctx: int = 1024
    eval_stride: int = 512
    lambdas: tuple[float, ...] = VALIDATION_LAMBDAS
    seed: int = 0
    threads: int = 2
    frozen_blocks: int = 0  # lower blocks kept at the base's weights; their output is read from the datastore
    head: str = "tied"  # tied: LM head = embeddings (frozen when frozen_blocks > 0); untied: a trained copy
    device: str = "cpu"
    valid_every: int = 0  # steps between validations besides each epoch's end (0: epoch ends only)

    def fingerprint(self) -> dict:
        """The settings that must not change across a resume."""
        skip = {"valid_tokens", "checkpoint_every", "threads", "out", "device", "valid_every"}
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k not in skip}


def prepare_frozen(model: torch.nn.Module, base: Base, cfg: TrainConfig, ds_dir: Path) -> np.ndarray | None:
    """Freeze what `cfg` keeps at the base's weights and untie the head if asked; returns the stored residual
    stream entering the first trained block (float16 [n_positions, dim]) when lower blocks are frozen."""
    if cfg.head not in ("tied", "untied"):
        raise UserError(f"--head must be tied or untied, got {cfg.head!r}")
    if cfg.head == "untied":
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
        model.config.tie_word_embeddings = False
    if cfg.frozen_blocks <= 0:
        return None
    n_layers = len(model.model.layers)
    if cfg.init != "base" or n_layers != base.model.config.num_hidden_layers or (
        cfg.shape.base_layers not in (None, tuple(range(n_layers)))
    ):
        raise UserError(
            "--frozen-blocks needs the whole base as the starting decoder (--init base and every base layer)"
        )
    if not 0 < cfg.frozen_blocks < n_layers:
        raise UserError(f"--frozen-blocks must be between 1 and {n_layers - 1}, got {cfg.frozen_blocks}")
    model.model.embed_tokens.requires_grad_(False)  # it feeds the frozen blocks (and is the head when tied)
    for layer in model.model.layers[: cfg.frozen_blocks]:
        layer.requires_grad_(False)
    return load_hidden(ds_dir, cfg.frozen_blocks)


def window_states(model, tokens: np.ndarray, hidden: np.ndarray | None, w: Window, frozen: int, device):
    """The decoder's final hidden states over window `w`, [w.end - w.begin, dim]: a full forward from token ids,
    or, with `frozen` lower blocks, the stored residual stream entering block `frozen` through the upper ones."""
    if hidden is None:
        ids = torch.from_numpy(tokens[w.begin : w.end].astype(np.int64)).to(device)[None]
        return model.model(input_ids=ids, use_cache=False).last_hidden_state[0]
    x = torch.from_numpy(hidden[w.begin : w.end].astype(np.float32)).to(device)[None]
    return run_blocks(model, x, frozen)


def distributed() -> tuple[int, int]:
    """(rank, world size); joins the torchrun process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def owned_range(w: Window, n_positions: int) -> tuple[int, int]:
    """Positions [a, b) a window trains on: those it owns that have a next token."""
    return w.first_new, min(w.end, n_positions)


def batch_of(step: int, n_windows: int, batch: int, seed: int) -> list[int]:
    """Window indices of a global step: a (seed, epoch)-seeded permutation cut into batches."""
    per_epoch = math.ceil(n_windows / batch)
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng(seed + epoch).permutation(n_windows)
    return order[i * batch : (i + 1) * batch].tolist()


def best_validation(history: list[dict]) -> dict | None:
    """The history record (an epoch's end) with the lowest validation mixed PPL, or None before any."""
    valid = [r for r in history if "validation" in r]
    return min(valid, key=lambda r: r["validation"]["best_ppl"]) if valid else None


def save_model(model: torch.nn.Module, hf_dir: Path) -> None:
    """save_pretrained into a temporary sibling folder, then swap it in: a kill never leaves half a model."""
    with atomic_dir(hf_dir) as temp:
        model.save_pretrained(temp, safe_serialization=True)


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save, atomically."""
    write_atomic(path, lambda temp: torch.save(state, temp))


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum every gradient over ranks in one flat all-reduce."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def rank_rates(timing: dict) -> dict:
    """One rank's throughput (its own positions per second of step time) and the share of each part of a step."""
    total = timing["compute_s"] + timing["wait_s"] + timing["all_reduce_s"]
    return {
        **timing,
        "positions_per_second": timing["positions"] / max(total, 1e-9),
        "all_reduce_share": timing["all_reduce_s"] / max(total, 1e-9),
        "wait_share": timing["wait_s"] / max(total, 1e-9),
    }


class Validator:
    """Mixed PPL on validation text: base target log-probs cached once in the run folder."""

    def __init__(self, base: Base, tokens: np.ndarray, out: Path, n_ctx: int, stride: int, lambdas):
        self.tokens, self.n_ctx, self.stride, self.lambdas = tokens, n_ctx, stride, list(lambdas)
        cache = out / "valid-base-logprobs.npz"
        if cache.is_file():
            data = np.load(cache)
            if (
                np.array_equal(data["tokens"], tokens)
                and int(data["n_ctx"]) == n_ctx
                and int(data["stride"]) == stride
            ):
                self.base_lp = data["logprobs"]
                return
        self.base_lp = target_logprobs(base.model, tokens, n_ctx, stride)
        write_npz_atomic(cache, tokens=tokens, n_ctx=n_ctx, stride=stride, logprobs=self.base_lp)

    def __call__(self, model: torch.nn.Module) -> dict:
        """{"base_ppl", "memdec_ppl", "mixed": {lambda: ppl}, "best_lambda", "best_ppl"} of the current model."""
        model.eval()
        mem_lp = target_logprobs(model, self.tokens, self.n_ctx, self.stride)
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


def load_checkpoint(path: Path, cfg: TrainConfig, model, optimizer, schedule) -> tuple[int, list, float, int]:
    """Restore model, optimizer, schedule and torch RNG from `path`; returns (step, history, seconds, positions)."""
    state = torch.load(path, weights_only=False)
    if state["config"] != cfg.fingerprint():
        raise UserError(f"{path} was written with other settings; resume with the same options")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["rng"])
    return state["step"], state["history"], state["seconds"], state["positions"]


def window_backward(
    model: torch.nn.Module,
    tokens: np.ndarray,
    hidden: np.ndarray | None,
    targets: tuple[np.ndarray, np.ndarray],
    w: Window,
    a: int,
    b: int,
    count: int,
    cfg: TrainConfig,
    device,
) -> torch.Tensor:
    """Forward window `w`, backpropagate its positions [a, b)'s loss sum / `count` (the step's positions);
    returns the summed (loss, kl, ce) on the CPU, float [3]. `targets`: the sparse kNN (ids, probs)."""
    knn_ids, knn_probs = targets
    with autocast(device):
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


def validate_and_keep(validator: Validator, model: torch.nn.Module, history: list, step: int, hf_dir: Path) -> dict:
    """Validate the current model, print the line, and save it to `hf_dir` when its mixed PPL is the best so far
    (the epoch with the best validation mixture is the one kept); returns the validation record."""
    earlier = best_validation(history)
    v = validator(model)
    tqdm.write(
        f"validation step {step}: base {v['base_ppl']:.3f} memdec {v['memdec_ppl']:.3f} "
        f"mixed {v['best_ppl']:.3f} at lambda {v['best_lambda']}"
    )
    if earlier is None or v["best_ppl"] < earlier["validation"]["best_ppl"]:
        save_model(model, hf_dir)
    return v


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train (or resume) a memory decoder; rank 0 writes `out/hf` (HF checkpoint) and `out/train.json`."""
    rank, world = distributed()
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = read_manifest(cfg.datastore)
    tokens = np.load(Path(cfg.datastore) / "tokens.npy")
    knn_ids, knn_probs, tmeta = load_targets(cfg.targets or Path(cfg.datastore) / "targets")
    n_positions = len(tokens) - 1
    if len(knn_ids) != n_positions:
        raise UserError("the kNN targets were made from another datastore; rerun `edge-memdec knn-targets`")
    base = load_base(Path(cfg.base or ds["base"]))
    torch.manual_seed(cfg.seed)
    model = make_memdec(cfg.init, base.model, cfg.shape, cfg.seed)
    hidden = prepare_frozen(model, base, cfg, Path(cfg.datastore))
    device = resolve_device(cfg.device)
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    windows = sliding_windows(len(tokens), cfg.n_ctx, cfg.stride)
    per_epoch = math.ceil(len(windows) / cfg.batch_windows)
    total = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / total))
    ckpt_path = out / CHECKPOINT
    step, history, seconds, positions_seen = 0, [], 0.0, 0
    # This process's own time split (not checkpointed: it describes the run since this process started).
    timing = {"steps": 0, "positions": 0, "compute_s": 0.0, "wait_s": 0.0, "all_reduce_s": 0.0}
    if resume and ckpt_path.is_file():
        step, history, seconds, positions_seen = load_checkpoint(ckpt_path, cfg, model, optimizer, schedule)
    elif resume:
        raise UserError(f"there is no checkpoint to resume in {out}; run without --resume")
    validator = None
    if cfg.valid_tokens is not None and rank == 0:
        validator = Validator(base, cfg.valid_tokens, out, cfg.eval_ctx, cfg.eval_stride, cfg.lambdas)
    del base

    def checkpoint() -> None:
        if rank == 0:
            save_checkpoint(
                ckpt_path,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "rng": torch.get_rng_state(),
                    "step": step,
                    "history": history,
                    "seconds": seconds,
                    "positions": positions_seen,
                    "config": cfg.fingerprint(),
                },
            )

    bar = tqdm(total=total, initial=step, unit="step", desc=f"train rank {rank}", disable=rank != 0)
    while step < total:
        t0 = time.perf_counter()
        batch = [windows[i] for i in batch_of(step, len(windows), cfg.batch_windows, cfg.seed)]
        count = sum(b - a for a, b in (owned_range(w, n_positions) for w in batch))
        optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(3)
        for w in batch[rank::world]:
            a, b = owned_range(w, n_positions)
            sums += window_backward(model, tokens, hidden, (knn_ids, knn_probs), w, a, b, count, cfg, device)
            timing["positions"] += b - a
        t1 = time.perf_counter()
        timing["compute_s"] += t1 - t0
        if world > 1:
            dist.barrier()  # separates waiting for the slowest rank from the all-reduce itself
            t2 = time.perf_counter()
            all_reduce_grads(params)
            dist.all_reduce(sums)
            timing["wait_s"] += t2 - t1
            timing["all_reduce_s"] += time.perf_counter() - t2
        timing["steps"] += 1
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        positions_seen += count
        seconds += time.perf_counter() - t0
        loss, kl, ce = (sums / count).tolist()
        bar.set_postfix(loss=f"{loss:.3f}", kl=f"{kl:.3f}", ce=f"{ce:.3f}", refresh=False)
        bar.update(1)
        record = {"step": step, "loss": loss, "kl": kl, "ce": ce, "lr": schedule.get_last_lr()[0]}
        if step % per_epoch == 0 or step == total or (cfg.valid_every and step % cfg.valid_every == 0):
            record["epoch"] = round(step / per_epoch, 4)
            if validator is not None:
                record["validation"] = validate_and_keep(validator, model, history, step, out / "hf")
        history.append(record)
        if step % cfg.checkpoint_every == 0 or step == total or "epoch" in record:
            checkpoint()
    bar.close()
    ranks = [timing]
    if world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, timing)
    summary = {}
    if rank == 0:
        best = best_validation(history)
        if best is None:
            save_model(model, out / "hf")
        summary = {
            "params": n_params(model),
            "steps": step,
            "epochs": step / per_epoch,
            "positions_trained": positions_seen,
            "datastore_positions": n_positions,
            "seconds": seconds,
            "positions_per_second": positions_seen / max(seconds, 1e-9),
            "ranks": [rank_rates(r) for r in ranks],
            "knn": tmeta["params"],
            "config": cfg.fingerprint(),
            "validation": best["validation"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "history": history,
        }
        write_json_atomic(out / "train.json", summary)
    if world > 1:
        dist.barrier()
    return summary
