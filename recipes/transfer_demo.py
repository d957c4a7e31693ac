"""Cross-tokenizer transfer, measured: a memory decoder trained for base A moved to base B (another tokenizer).

No second small real base model ships in a package this project can install, so both bases are tiny llama models
trained here for a few hundred steps on real licence text (licensedcode-data, split by document), each with its
own byte-level BPE tokenizer: A has 2,048 tokens and GPT-2's pre-tokenizer, B has 1,536 tokens, Qwen2's split
regex and its own training documents. Everything after the bases goes through the public CLI:

  datastore build + knn-targets on A -> train (S steps) -> datastore build + knn-targets on B
  -> transfer (default budget: S/10 steps)
controls, S/10 steps each: a fresh decoder for B from B's own weights; base A's own weights (no decoder training)
moved by the same transfer (it separates what the kNN training of decoder A carries over from plain ensembling).

and the table gives test-split PPL (lambda chosen on the validation split) of each base alone and with each decoder.

    python recipes/transfer_demo.py --work /tmp/transfer-demo        # ~11 min on a busy 2-core machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

from edge_memdec.corpus import join_documents, read_split, write_split
from edge_memdec.files import write_text_atomic
from edge_memdec.scoring import mixed_ppl
from edge_memdec.train.logprobs import target_logprobs

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LAMBDAS = [0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
CTX, STRIDE = 256, 128


def cli(*args: object) -> None:
    """Run one `edge-memdec` command in a child process (as a user would), failing loudly."""
    cmd = [sys.executable, "-m", "edge_memdec.cli", *map(str, args)]
    print("$ edge-memdec", " ".join(map(str, args[:3])), "...", flush=True)
    subprocess.run(cmd, check=True)


def make_tokenizer(kind: str, texts: list[str], vocab: int) -> Tokenizer:
    """Byte-level BPE of `vocab` tokens: kind "gpt2" (GPT-2 pre-tokenizer) or "qwen2" (Qwen2's split regex)."""
    tok = Tokenizer(models.BPE())
    if kind == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def train_base(folder: Path, tok: Tokenizer, text: str, steps: int, hidden: int, seed: int) -> Path:
    """A tiny llama base (2 blocks, tied embeddings) pretrained by next-token cross-entropy on `text`.

    Batches of 8 random windows of CTX tokens, AdamW lr 3e-3 with linear decay; saved with its tokenizer.json.
    """
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    ids = torch.tensor(tok.encode(text).ids, dtype=torch.int64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        starts = rng.integers(0, len(ids) - CTX - 1, size=8)
        batch = torch.stack([ids[s : s + CTX + 1] for s in starts])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone()).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  base {folder.name} step {step}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    tmp = folder.with_name(f".{folder.name}.tmp")
    model.save_pretrained(tmp)
    tok.save(str(tmp / "tokenizer.json"))
    os.replace(tmp, folder)
    return folder


def load(folder: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def scored(base_lp: dict, mem: LlamaForCausalLM | None, tokens: dict) -> dict:
    """Test PPL of base alone (mem None) or base + mem at the lambda best on validation."""
    if mem is None:
        return {"ppl": mixed_ppl(base_lp["test"], base_lp["test"], [0.0])[0.0], "lambda": 0.0}
    valid = mixed_ppl(base_lp["validation"], target_logprobs(mem, tokens["validation"], CTX, STRIDE), LAMBDAS)
    lam = min(valid, key=valid.get)
    test_mem = target_logprobs(mem, tokens["test"], CTX, STRIDE)
    return {"ppl": mixed_ppl(base_lp["test"], test_mem, [lam])[lam], "lambda": lam}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("transfer-demo"))
    ap.add_argument("--base-steps", type=int, default=400, help="pretraining steps of each tiny base")
    ap.add_argument("--datastore-tokens", type=int, default=40000, help="datastore size per base")
    ap.add_argument("--source-steps", type=int, default=150, help="optimizer steps of the source decoder")
    ap.add_argument("--eval-tokens", type=int, default=12000, help="validation / test tokens (base B's)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    split = work / "split"
    if not (split / "manifest.json").is_file():
        write_split("legal", split, 0)
    train_docs = read_split(split, "train")
    half = len(train_docs) // 2
    pretrain = {"a": train_docs[:half:2], "b": train_docs[1:half:2]}  # disjoint pretraining documents
    tokenizers = {
        "a": make_tokenizer("gpt2", [d.text for d in pretrain["a"]], 2048),
        "b": make_tokenizer("qwen2", [d.text for d in pretrain["b"]], 1536),
    }
    hidden = {"a": 128, "b": 96}
    bases = {}
    for i, k in enumerate("ab"):
        text = join_documents(pretrain[k])[:1_500_000]
        bases[k] = train_base(work / f"base-{k}", tokenizers[k], text, args.base_steps, hidden[k], seed=i)
    vocab_a, vocab_b = tokenizers["a"].get_vocab(), tokenizers["b"].get_vocab()
    print(f"tokenizers: A {len(vocab_a)} tokens, B {len(vocab_b)} tokens, {len(vocab_a.keys() & vocab_b.keys())} shared")

    common = ["--n-ctx", CTX, "--stride", STRIDE, "--threads", args.threads]
    for k in "ab":
        ds = work / f"ds-{k}"
        cli("datastore", "build", "--corpus", split, "--out", ds, "-m", bases[k],
            "--max-tokens", args.datastore_tokens, "--shard-windows", 16, *common)  # fmt: skip
        cli("knn-targets", ds, "-k", 256, "--top", 16, "--threads", args.threads)
    train_opts = [*common, "--batch-windows", 4, "--lr", "2e-3", "--valid-corpus", split, "--valid-tokens", 3000]
    source = work / "run-a"
    if not (source / "train.json").is_file():
        cli("train", work / "ds-a", "--out", source, "-m", bases["a"], "--layers", 2,
            "--epochs", 100, "--max-steps", args.source_steps, *train_opts)  # fmt: skip
    transferred = work / "run-b-transfer"
    if not (transferred / "train.json").is_file():
        cli("transfer", source, work / "ds-b", "--out", transferred, "-m", bases["b"],
            "--threads", args.threads, "--valid-corpus", split, "--valid-tokens", 3000)  # fmt: skip
    budget = json.loads((transferred / "train.json").read_text())["transfer"]
    untrained = work / "run-b-transfer-untrained"  # control: base A's weights moved without decoder training
    if not (untrained / "train.json").is_file():
        cli("transfer", bases["a"], work / "ds-b", "--out", untrained, "-m", bases["b"], "--steps", budget["steps"],
            "--lr", "2e-3", "--batch-windows", 4, "--n-ctx", CTX, "--stride", STRIDE, "--threads", args.threads)  # fmt: skip
    control = work / "run-b-fresh"
    if not (control / "train.json").is_file():
        cli("train", work / "ds-b", "--out", control, "-m", bases["b"], "--layers", 2,
            "--epochs", 100, "--max-steps", budget["steps"], *train_opts)  # fmt: skip

    # test-split PPL, lambda chosen on the validation split; both splits tokenized by each base's tokenizer
    results = []
    for k, rows in (
        ("a", [("base A alone", None), (f"base A + decoder A ({budget['source_steps']} steps)", source / "hf")]),
        ("b", [
            ("base B alone", None),
            ("base B + transferred decoder, before continued training (0 steps)", transferred / "transfer-init"),
            (f"base B + transferred decoder, after ({budget['steps']} steps)", transferred / "hf"),
            (f"base B + fresh decoder from B's weights (same {budget['steps']} steps)", control / "hf"),
            ("base B + base A's weights moved, no decoder training (0 steps)", untrained / "transfer-init"),
            (f"base B + base A's weights moved, then {budget['steps']} steps", untrained / "hf"),
        ]),
    ):  # fmt: skip
        tok = tokenizers[k]
        tokens = {
            s: np.asarray(tok.encode(join_documents(read_split(split, s))).ids[: args.eval_tokens], np.int32)
            for s in ("validation", "test")
        }
        base = load(bases[k])
        base_lp = {s: target_logprobs(base, t, CTX, STRIDE) for s, t in tokens.items()}
        for label, folder in rows:
            r = scored(base_lp, load(folder) if folder else None, tokens)
            results.append({"model": label, "test_tokens": len(tokens["test"]) - 1, **r})

    width = max(len(r["model"]) for r in results)
    print(f"\n{'':{width}}  test PPL  lambda  tokens")
    for r in results:
        print(f"{r['model']:{width}}  {r['ppl']:8.3f}  {r['lambda']:6.2f}  {r['test_tokens']}")
    rows = budget
    print(
        f"\ntransfer: {rows['rows_copied']} of {rows['rows']} rows copied, {rows['rows_composed']} composed, "
        f"{rows['rows_fallback']} fallback; {rows['steps']} steps vs the source's {rows['source_steps']} "
        f"({rows['budget_fraction']:.0%}); total {time.perf_counter() - t_start:.0f} s"
    )
    write_text_atomic(work / "transfer-demo.json", json.dumps({"results": results, "transfer": budget}, indent=1))


if __name__ == "__main__":
    main()
