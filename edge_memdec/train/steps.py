"""The optimisation loop every training command shares: the memory decoder, a LoRA adapter, full fine-tuning.

A run steps through the sliding windows of one token stream, a (seed, epoch)-seeded permutation cut into
batches. One process or several under torchrun: each rank runs its share of every batch's windows, gradients
are summed across ranks with one all-reduce per step (gloo on CPU, nccl on GPU), and the loss is normalised by
the batch's global position count, so any number of ranks computes the same update as one. Checkpoints
(trainable weights, optimizer, schedule, RNG, step) are written atomically, so `--resume` continues exactly
where a killed run stopped.
"""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from edge_memdec.errors import UserError
from edge_memdec.files import write_atomic, write_json_atomic
from edge_memdec.windows import Window, sliding_windows

CHECKPOINT = "checkpoint.pt"
SUMMARY = "train.json"  # what a finished run did: its settings, steps, time, validation and history
HF_DIR = "hf"  # the trained model in a run folder (a Hugging Face checkpoint): the best validation's, or the last

# (window, first position, end position, the step's position count) -> the window's summed loss parts, float
# [n_parts] on the CPU, after backpropagating part 0 / count.
WindowLoss = Callable[[Window, int, int, int], torch.Tensor]


class Validator(Protocol):
    """Scores the model being trained on validation text (in eval mode, leaving it in train mode); `key` names
    the record's figure to minimise."""

    key: str

    def __call__(self, model: torch.nn.Module) -> dict: ...

    def describe(self, record: dict) -> str: ...


class RunSettings(Protocol):
    """What the loop reads from a run's config (`TrainConfig`, `FinetuneConfig`)."""

    n_ctx: int  # window length, tokens
    stride: int  # window step, tokens
    batch_windows: int  # windows per optimizer step (over all ranks)
    epochs: int
    max_steps: int | None  # stop (and end the linear schedule) after this many steps
    seed: int  # seed of the data order
    lr: float  # peak learning rate
    warmup_steps: int  # steps of linear warmup to `lr` before the linear decay
    checkpoint_every: int  # steps between checkpoints
    valid_every: int  # steps between validations besides each epoch's end (0: epoch ends only)


@dataclass(frozen=True)
class StepPlan:
    """Which windows each optimizer step trains on, and how many steps a run takes."""

    windows: list[Window]
    n_positions: int  # positions with a next token: len(tokens) - 1
    batch_windows: int  # windows per optimizer step (over all ranks)
    epochs: int
    max_steps: int | None  # stop (and end the linear schedule) after this many steps
    seed: int  # seed of the data order

    @property
    def per_epoch(self) -> int:
        return math.ceil(len(self.windows) / self.batch_windows)

    @property
    def total(self) -> int:
        full = self.per_epoch * self.epochs
        return full if self.max_steps is None else min(self.max_steps, full)

    def batch(self, step: int) -> list[Window]:
        """The windows of a global step."""
        return [self.windows[i] for i in batch_of(step, len(self.windows), self.batch_windows, self.seed)]

    @classmethod
    def sliding(cls, n_tokens: int, settings: RunSettings) -> StepPlan:
        """The plan over the sliding windows of a stream of `n_tokens` tokens, every position but the last
        trained (it has no next token), with a run's window, batch and schedule settings."""
        windows = sliding_windows(n_tokens, settings.n_ctx, settings.stride)
        return cls(
            windows,
            n_tokens - 1,
            settings.batch_windows,
            settings.epochs,
            settings.max_steps,
            settings.seed,
        )

    def owned(self, w: Window) -> tuple[int, int]:
        """Positions [a, b) a window trains on: those it owns that have a next token."""
        return w.first_new, min(w.end, self.n_positions)


@dataclass
class Progress:
    """What a run has done so far; all of it is checkpointed."""

    step: int = 0
    history: list[dict] = field(default_factory=list)  # one record per step (loss parts, lr, validation)
    seconds: float = 0.0  # step time over every process that ran this run
    positions: int = 0  # positions trained (all ranks)

    def summary(self, plan: StepPlan, ranks: list[dict], best: dict | None) -> dict:
        """The train.json fields every training command writes: steps, epochs, positions, time, per-rank
        figures, the best validation (the kept model's) and the whole history."""
        return {
            "steps": self.step,
            "epochs": self.step / plan.per_epoch,
            "positions_trained": self.positions,
            "seconds": self.seconds,
            "positions_per_second": self.positions / max(self.seconds, 1e-9),
            "ranks": ranks,
            "validation": best["validation"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "history": self.history,
        }


def distributed() -> tuple[int, int]:
    """(rank, world size); joins the torchrun process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def batch_of(step: int, n_windows: int, batch: int, seed: int) -> list[int]:
    """Window indices of a global step: a (seed, epoch)-seeded permutation cut into batches."""
    per_epoch = math.ceil(n_windows / batch)
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng(seed + epoch).permutation(n_windows)
    return order[i * batch : (i + 1) * batch].tolist()


def best_validation(history: list[dict], key: str) -> dict | None:
    """The history record with the lowest validation `key`, or None before any validation."""
    valid = [r for r in history if "validation" in r]
    return min(valid, key=lambda r: r["validation"][key]) if valid else None


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters training changes (the rest is rebuilt from the base on resume)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum every gradient over ranks in one flat all-reduce."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def peak_memory_mib(device: torch.device) -> dict[str, float]:
    """This process's peak resident memory (Linux reports KiB), and the GPU's peak allocation on CUDA, MiB."""
    peak = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def rank_rates(timing: dict) -> dict:
    """One rank's throughput (its own positions per second of step time) and the share of each part of a step."""
    total = timing["compute_s"] + timing["wait_s"] + timing["all_reduce_s"]
    return {
        **timing,
        "positions_per_second": timing["positions"] / max(total, 1e-9),
        "all_reduce_share": timing["all_reduce_s"] / max(total, 1e-9),
        "wait_share": timing["wait_s"] / max(total, 1e-9),
    }


def load_checkpoint(path: Path, fingerprint: dict, model, optimizer, schedule) -> Progress:
    """Restore the trainable weights, optimizer, schedule and torch RNG from `path`."""
    state = torch.load(path, weights_only=False)
    if state["config"] != fingerprint:
        raise UserError(f"{path} was written with other settings; resume with the same options")
    result = model.load_state_dict(state["model"], strict=False)
    trainable = set(trainable_state(model))
    if result.unexpected_keys or trainable & set(result.missing_keys):
        raise UserError(f"{path} holds another model's weights; resume with the same options")
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["rng"])
    return Progress(state["step"], state["history"], state["seconds"], state["positions"])


def save_checkpoint(path: Path, fingerprint: dict, model, optimizer, schedule, done: Progress) -> None:
    """Write the trainable weights, optimizer, schedule, torch RNG and progress to `path`, atomically."""
    state = {
        "model": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "rng": torch.get_rng_state(),
        "step": done.step,
        "history": done.history,
        "seconds": done.seconds,
        "positions": done.positions,
        "config": fingerprint,
    }
    write_atomic(path, lambda temp: torch.save(state, temp))


def step_sums(
    plan: StepPlan, window_loss: WindowLoss, n_parts: int, params: list, step: int, timing: dict
) -> tuple[torch.Tensor, int]:
    """One step's gradients (accumulated into `params`, all-reduced over the ranks) and loss-part sums
    (float [n_parts], summed over every rank's windows), and the positions the step trains; adds this rank's
    positions and compute / wait / all-reduce seconds to `timing`."""
    rank, world = distributed()
    t0 = time.perf_counter()
    batch = plan.batch(step)
    count = sum(b - a for a, b in map(plan.owned, batch))
    sums = torch.zeros(n_parts)
    for w in batch[rank::world]:
        a, b = plan.owned(w)
        sums += window_loss(w, a, b, count)
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
    return sums, count


def validate_and_keep(
    validator: Validator, model: torch.nn.Module, history: list, step: int, keep: Callable[[torch.nn.Module], None]
) -> dict:
    """Validate the current model, print the line, and `keep` it when its score is the best so far (the
    validation with the best score is the model a run leaves); returns the validation record."""
    earlier = best_validation(history, validator.key)
    v = validator(model)
    tqdm.write(f"validation step {step}: {validator.describe(v)}")
    if earlier is None or v[validator.key] < earlier["validation"][validator.key]:
        keep(model)
    return v


def lr_factor(step: int, total: int, warmup: int = 0) -> float:
    """The share of the peak learning rate at optimizer step `step` (0-based) of `total`: rising linearly over the
    first `warmup` steps (1/warmup, 2/warmup, ..., 1), then falling linearly to 0 at `total` (without warmup:
    1 - step/total)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / (total - warmup)) if total > warmup else 1.0


def start_optimizer(
    params: list, lr: float, total: int, warmup: int = 0
) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """AdamW without weight decay, its learning rate `lr * lr_factor(step, total, warmup)`."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return optimizer, LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))


def every_rank_timing(timing: dict, device: torch.device) -> list[dict]:
    """This rank's `timing` with its peak memory, gathered from every rank (in rank order) as `rank_rates`."""
    _, world = distributed()
    timing.update(peak_memory_mib(device))
    ranks = [timing]
    if world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, timing)
    return [rank_rates(r) for r in ranks]


def optimise(
    model: torch.nn.Module,
    plan: StepPlan,
    window_loss: WindowLoss,
    settings: RunSettings,
    *,
    parts: tuple[str, ...],
    out: Path,
    fingerprint: dict,
    validator: Validator | None = None,
    keep: Callable[[torch.nn.Module], None] | None = None,
    resume: bool = False,
    device: torch.device | None = None,
) -> tuple[Progress, list[dict]]:
    """AdamW (`start_optimizer`) over the plan's steps, checkpointed to `out/checkpoint.pt` every
    `settings.checkpoint_every` steps; validation (rank 0) at every epoch's end, at the last step and every
    `settings.valid_every` steps, with `keep` called on the best model. `parts` names the loss parts
    `window_loss` sums. Returns the run's progress and each rank's timing (throughput, all-reduce share, peak
    memory)."""
    rank, _ = distributed()
    params = [p for p in model.parameters() if p.requires_grad]
    total, per_epoch = plan.total, plan.per_epoch
    checkpoint_every, valid_every = settings.checkpoint_every, settings.valid_every
    optimizer, schedule = start_optimizer(params, settings.lr, total, settings.warmup_steps)
    ckpt_path = Path(out) / CHECKPOINT
    done = Progress()
    # This process's own time split (not checkpointed: it describes the run since this process started).
    timing = {"steps": 0, "positions": 0, "compute_s": 0.0, "wait_s": 0.0, "all_reduce_s": 0.0}
    if resume and ckpt_path.is_file():
        done = load_checkpoint(ckpt_path, fingerprint, model, optimizer, schedule)
    elif resume:
        raise UserError(f"there is no checkpoint to resume in {out}; run without --resume")

    model.train()
    bar = tqdm(total=total, initial=done.step, unit="step", desc=f"train rank {rank}", disable=rank != 0)
    while done.step < total:
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        sums, count = step_sums(plan, window_loss, len(parts), params, done.step, timing)
        timing["steps"] += 1
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        done.step += 1
        done.positions += count
        done.seconds += time.perf_counter() - t0
        means = dict(zip(parts, (sums / count).tolist(), strict=True))
        bar.set_postfix({name: f"{value:.3f}" for name, value in means.items()}, refresh=False)
        bar.update(1)
        record = {"step": done.step, **means, "lr": schedule.get_last_lr()[0]}
        step = done.step
        if step % per_epoch == 0 or step == total or (valid_every and step % valid_every == 0):
            record["epoch"] = round(step / per_epoch, 4)
            if validator is not None and rank == 0:
                record["validation"] = validate_and_keep(validator, model, done.history, step, keep)
        done.history.append(record)
        if rank == 0 and (step % checkpoint_every == 0 or step == total or "epoch" in record):
            save_checkpoint(ckpt_path, fingerprint, model, optimizer, schedule, done)
    bar.close()
    return done, every_rank_timing(timing, device or torch.device("cpu"))


def finish_run(
    model: torch.nn.Module,
    done: Progress,
    plan: StepPlan,
    ranks: list[dict],
    *,
    key: str,
    out: Path,
    keep: Callable[[torch.nn.Module], None],
    facts: dict,
) -> dict:
    """After `optimise`: rank 0 keeps the last model when no validation chose one, and writes `out/train.json`:
    the command's own `facts`, then the loop's figures (`Progress.summary`, the best validation by `key`).
    Returns that summary on rank 0 and {} on the others, once every rank is here."""
    rank, world = distributed()
    summary = {}
    if rank == 0:
        best = best_validation(done.history, key)
        if best is None:
            keep(model)
        summary = {**facts, **done.summary(plan, ranks, best)}
        write_json_atomic(Path(out) / SUMMARY, summary)
    if world > 1:
        dist.barrier()
    return summary
