"""LoRA adapters (peft) on a causal LM: a low-rank update B @ A beside each adapted matrix, trained while every
other weight stays frozen, and the plain model the updates merge into.

Shared by `lora train` (an adapter of the base) and `train --lora-rank` (a memory decoder adapted in every block).
"""

from __future__ import annotations

import copy
import warnings

import torch


def with_lora(model: torch.nn.Module, rank: int, alpha: float, dropout: float, targets: tuple[str, ...]):
    """`model` wrapped in a fresh LoRA adapter on the modules named `targets` (B = 0: it starts as `model`);
    only the adapter's A and B train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for the user to do
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, config)


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside a peft model (with its LoRA layers), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """A plain copy of a LoRA-wrapped model with each update added into its matrix (W + alpha / rank * B @ A),
    leaving `model` and its adapter as they were; a model without an adapter is returned as is."""
    if not hasattr(model, "merge_and_unload"):
        return model
    return copy.deepcopy(model).merge_and_unload()


def adapter_params(model: torch.nn.Module) -> int:
    """How many of `model`'s parameters belong to LoRA adapters (0 without one)."""
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
