"""Greedy decode speed: the authors' style of inference (transformers) against edge-memdec, measured in one run.

    python bench/reference.py [-m BASE.gguf] [--memdec MEM.gguf] [-n 128] [--threads 2] [--prompt TEXT]
                              [--repeats 3] [--no-f32-check]

The reference is how the Memory Decoder authors run inference: both models in Hugging Face transformers
(PyTorch, fp32, here dequantized from the same two GGUFs), one `past_key_values` cache per model, and per token
p = lambda * softmax(mem) + (1 - lambda) * softmax(base), then argmax. Ours is edge-memdec's decode loop
(`MemoryDecoderLM.start(..., temperature=0)`) on the GGUFs in llama.cpp. Both get the same prompt token ids
(llama.cpp's tokenization), the same lambda (the memory decoder's `memdec.lambda` unless --lambda) and the
same thread count; end-of-generation tokens are masked on both sides so every run makes exactly -n tokens.

Prints tokens/s of the four settings (median of --repeats, prompt excluded), the ratios ours / theirs
(issue target: >= 8x for the pair) and greedy-token agreement:
- quantized: ours on the GGUFs as shipped vs transformers on their dequantized weights (these differ: the
  first position where the two token streams part and how many of the -n tokens are identical);
- f32 (unless --no-f32-check): the dequantized PyTorch weights are saved as a checkpoint folder, converted with
  edge-memdec's converter to f32 GGUFs (tokenizer copied from the base GGUF), and run by ours with an f32 KV
  cache; these are the same weights transformers runs, so the tokens should agree exactly.
Needs the training extras (torch, transformers, accelerate). Loading a GGUF into transformers takes a minute.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

from edge_memdec.api import MemoryDecoderLM
from edge_memdec.convert import convert_checkpoint
from edge_memdec.pair import recommended_lambda
from edge_memdec.paths import default_base_gguf, default_memdec_gguf

PROMPT = "Permission is hereby granted, free of charge, to any person obtaining a copy of this software"


def load_hf(gguf: Path) -> PreTrainedModel:
    """A GGUF dequantized into a transformers model (fp32, eval mode)."""
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return model.eval()


def _cache_names(model: PreTrainedModel) -> tuple[str, str]:
    """(forward keyword, output field) of the KV cache: `past_key_values` before transformers 5.2x, then `cache`."""
    params = inspect.signature(model.forward).parameters
    return ("cache", "cache") if "cache" in params else ("past_key_values", "past_key_values")


class HFModel:
    """One transformers model stepped with its own KV cache, as the authors' generation loop does."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.arg, self.field = _cache_names(model)
        self.cache: Any = None

    def step(self, ids: torch.Tensor, reset: bool = False) -> torch.Tensor:
        """Feed `ids` [1, n] after the cached tokens (or from scratch); the last position's logits [1, vocab]."""
        kwargs = {} if reset else {self.arg: self.cache}
        out = self.model(input_ids=ids, use_cache=True, **kwargs)
        self.cache = getattr(out, self.field)
        return out.logits[:, -1, :]


@torch.inference_mode()
def hf_greedy(
    base: HFModel,
    mem: HFModel | None,
    lam: float,
    prompt: Sequence[int],
    n_tokens: int,
    eog_ids: Sequence[int],
) -> tuple[list[int], float]:
    """The authors' loop: two models, two KV caches, mix in probability space, argmax.

    Returns the generated tokens and the seconds from the end of the prompt to the last token (the same span
    edge-memdec's `decode_seconds` covers: n argmaxes and n - 1 single-token forward passes per model).
    """
    ids = torch.tensor([list(prompt)], dtype=torch.long)
    eog = torch.tensor(list(eog_ids), dtype=torch.long)
    logits_b = base.step(ids, reset=True)
    logits_m = mem.step(ids, reset=True) if mem is not None else None
    t0 = time.perf_counter()
    tokens: list[int] = []
    while True:
        logits_b[:, eog] = float("-inf")
        if logits_m is None:
            next_id = int(torch.argmax(logits_b, dim=-1))
        else:
            n = min(logits_b.shape[-1], logits_m.shape[-1])
            logits_m[:, eog] = float("-inf")
            p_base = torch.softmax(logits_b[:, :n], dim=-1)
            p_mem = torch.softmax(logits_m[:, :n], dim=-1)
            next_id = int(torch.argmax((1.0 - lam) * p_base + lam * p_mem, dim=-1))
        tokens.append(next_id)
        if len(tokens) >= n_tokens:
            break
        step = torch.tensor([[next_id]], dtype=torch.long)
        logits_b = base.step(step)
        if mem is not None:
            logits_m = mem.step(step)
    return tokens, time.perf_counter() - t0


def ours_greedy(lm: MemoryDecoderLM, prompt: Sequence[int], n_tokens: int) -> tuple[list[int], float]:
    """edge-memdec's decode loop, greedy, from an empty cache; returns the tokens and the decode seconds."""
    lm.pair.rewind(0)
    generation = lm.start(prompt, max_tokens=n_tokens, temperature=0.0, ignore_eos=True)
    generation.run()
    return generation.tokens, generation.decode_seconds


def agreement(a: Sequence[int], b: Sequence[int]) -> tuple[int, int | None]:
    """(identical positions, first position where the streams differ or None)."""
    same = sum(x == y for x, y in zip(a, b, strict=False))
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if first is None and len(a) != len(b):
        first = min(len(a), len(b))
    return same, first


def export_f32(
    model: PreTrainedModel, folder: Path, out: Path, tokenizer_from: Path, lam: float | None
) -> Path:
    """Save the (dequantized) PyTorch weights as a checkpoint folder, then convert it to an f32 GGUF with ours.

    transformers refuses save_pretrained on a model loaded from a GGUF (it counts as quantized), so the folder is
    written directly: config.json without the quantization entry, and model.safetensors (tied head left out).
    """
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    (folder / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    tied = bool(config.get("tie_word_embeddings"))
    state = {
        name: tensor.detach().float().contiguous()
        for name, tensor in model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    }
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    memdec = {"lambda": lam} if lam is not None else None
    return convert_checkpoint(folder, out, "f32", tokenizer_from, memdec)


def median_run(run, repeats: int) -> tuple[list[int], float]:
    """Tokens of the first run and the median seconds per token over `repeats` runs."""
    results = [run() for _ in range(repeats)]
    tokens = results[0][0]
    return tokens, statistics.median(sec / max(1, len(tok)) for tok, sec in results)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-m", "--model", type=Path, default=None, help="base GGUF (default: SmolLM2-135M)")
    parser.add_argument(
        "--memdec", type=Path, default=None, help="memory decoder GGUF (default: the shipped one)"
    )
    parser.add_argument("-n", type=int, default=128, help="tokens generated per run")
    parser.add_argument("--threads", type=int, default=2, help="threads for both PyTorch and llama.cpp")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument(
        "--lambda", dest="lam", type=float, default=None, help="default: the GGUF's memdec.lambda"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median)")
    parser.add_argument(
        "--no-f32-check", action="store_true", help="skip the f32 export and exact-token check"
    )
    args = parser.parse_args()
    base_path = args.model or default_base_gguf()
    mem_path = args.memdec or default_memdec_gguf()
    if mem_path is None:
        parser.error("no shipped memory decoder in this checkout; pass --memdec MEM.gguf")
    lam = recommended_lambda(mem_path) if args.lam is None else args.lam
    torch.set_num_threads(args.threads)
    n_ctx = 2048
    opts = dict(n_ctx=n_ctx, n_threads=args.threads)

    with MemoryDecoderLM(base_path, n_ctx=n_ctx, n_threads=args.threads) as lm:
        prompt = lm.tokenize(args.prompt)
        eog = lm.pair.base.eog_ids.tolist()
    if len(prompt) + args.n >= n_ctx:
        parser.error(f"prompt ({len(prompt)} tokens) + -n must stay under {n_ctx}")

    t = time.perf_counter()
    torch_base, torch_mem = load_hf(base_path), load_hf(mem_path)
    hf_base, hf_mem = HFModel(torch_base), HFModel(torch_mem)
    print(f"loaded both GGUFs into transformers in {time.perf_counter() - t:.0f} s")

    rows: dict[str, float] = {}
    streams: dict[str, list[int]] = {}
    hf_greedy(hf_base, hf_mem, lam, prompt, 4, eog)  # warm-up
    streams["hf base"], rows["hf base"] = median_run(
        lambda: hf_greedy(hf_base, None, lam, prompt, args.n, eog), args.repeats
    )
    streams["hf pair"], rows["hf pair"] = median_run(
        lambda: hf_greedy(hf_base, hf_mem, lam, prompt, args.n, eog), args.repeats
    )
    for key, mem in (("ours base", None), ("ours pair", mem_path)):
        with MemoryDecoderLM(base_path, mem, lam=lam, **opts) as lm:
            ours_greedy(lm, prompt, 4)  # warm-up (numba kernels, llama.cpp buffers)
            streams[key], rows[key] = median_run(lambda lm=lm: ours_greedy(lm, prompt, args.n), args.repeats)

    print(f"\n{'setting':<44}{'ms/token':>10}{'tok/s':>9}{'x base':>9}")
    labels = {
        "hf base": "transformers fp32, base alone",
        "hf pair": "transformers fp32, base + memdec",
        "ours base": "edge-memdec (llama.cpp), base alone",
        "ours pair": "edge-memdec (llama.cpp), base + memdec",
    }
    for key, label in labels.items():
        own_base = rows["hf base"] if key.startswith("hf") else rows["ours base"]
        sec = rows[key]
        print(f"{label:<44}{sec * 1e3:>10.2f}{1 / sec:>9.1f}{sec / own_base:>9.2f}")
    print(f"\n{'ours / theirs (tokens/s)':<44}{'ratio':>10}{'target':>9}")
    print(f"{'base alone':<44}{rows['hf base'] / rows['ours base']:>10.2f}{'':>9}")
    print(f"{'base + memory decoder':<44}{rows['hf pair'] / rows['ours pair']:>10.2f}{'>= 8':>9}")

    checks = [
        ("quantized GGUFs vs transformers on their dequantized weights, base", "ours base", "hf base"),
        ("quantized GGUFs vs transformers on their dequantized weights, pair", "ours pair", "hf pair"),
    ]
    if not args.no_f32_check:
        with tempfile.TemporaryDirectory(prefix="memdec-ref-") as tmp:
            folder = Path(tmp)
            t = time.perf_counter()
            base_f32 = export_f32(torch_base, folder / "base", folder / "base-f32.gguf", base_path, None)
            mem_f32 = export_f32(torch_mem, folder / "mem", folder / "mem-f32.gguf", base_path, lam)
            print(f"\nexported both models to f32 GGUFs in {time.perf_counter() - t:.0f} s")
            for key, mem in (("f32 base", None), ("f32 pair", mem_f32)):
                with MemoryDecoderLM(base_f32, mem, lam=lam, f32_kv=True, **opts) as lm:
                    streams[key], _ = ours_greedy(lm, prompt, args.n)
        checks += [
            ("f32 GGUFs (f32 KV cache) vs transformers, same weights, base", "f32 base", "hf base"),
            ("f32 GGUFs (f32 KV cache) vs transformers, same weights, pair", "f32 pair", "hf pair"),
        ]
    print(f"\n{'greedy tokens, ours vs transformers':<66}{'same':>8}{'first diff':>12}")
    for label, ours, theirs in checks:
        same, first = agreement(streams[ours], streams[theirs])
        where = "-" if first is None else str(first)
        print(f"{label:<66}{f'{same}/{len(streams[theirs])}':>8}{where:>12}")
    print(
        f"\nbase {base_path.name}, memory decoder {mem_path.name}, lambda {lam:g}, prompt {len(prompt)} tokens, "
        f"{args.n} tokens x {args.repeats} repeats (median), {args.threads} threads"
    )


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"bench took {time.perf_counter() - start:.0f} s")
