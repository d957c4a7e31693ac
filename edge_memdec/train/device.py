"""Where training work runs: `--device auto|cpu|cuda|mps` resolved once, with the matching autocast."""

from __future__ import annotations

import contextlib
import os

import torch

from edge_memdec.errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU; an asked-for device that is absent is one sentence."""
    if name not in DEVICES:
        raise UserError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise UserError(
            f"--device {name} was asked for but this machine's torch has no {name} device; use cpu"
        )
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per torchrun rank
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the forward's matmuls in bfloat16, reductions in float32); nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
