"""Does a memory decoder that has seen the chat template answer chat questions better? (quality issue, chat)

Writes two training splits from the same licence documents, cut into chunks of a few paragraphs:
`plain` (the chunks as they are) and `wrapped` (each chunk the assistant's answer to a user question naming the
licence, rendered with the base's own chat template, end-of-turn included). Then, for each, it prints the
commands that continue a trained decoder on it for one pass at a small budget (datastore, kNN targets, train,
export), and the chat evaluation of both decoders; `--run` runs them. Plain is the control: any change it shows
comes from the extra training, not from the template.

    python recipes/chat_wrapped.py WORK --init WORK/run-c8/hf [--tokens 150000] [--run]

WORK is the legal campaign's folder (its `split/`); everything is written under WORK/chat-wrapped/. Needs the
train extra.
"""

from __future__ import annotations

import argparse
import random
import shlex
import subprocess
import sys
from pathlib import Path

from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from edge_memdec.corpus import Document, documents_jsonl, split_documents_of
from edge_memdec.files import write_text_atomic
from edge_memdec.gguf_file import read_gguf
from edge_memdec.paths import default_base_gguf

QUESTIONS = (
    "What does the {name} license say?",
    "Quote the relevant part of the {name} license.",
    "What are the terms of {name}?",
    "Show me the text of the {name} license.",
    "What does {name} require?",
)
END_OF_TURN = "<|im_end|>"  # SmolLM2's template
CHUNK_CHARS = 1500  # a few paragraphs: an answer's length, so the template recurs every ~350 tokens


def chunks(text: str, max_chars: int = CHUNK_CHARS) -> list[str]:
    """`text` cut at paragraph breaks into pieces of at most about `max_chars` characters."""
    pieces, current = [], ""
    for paragraph in text.split("\n\n"):
        if current and len(current) + len(paragraph) > max_chars:
            pieces.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    return [*pieces, current] if current else pieces


def licence_name(doc_id: str) -> str:
    """`apache-2.0.LICENSE` -> `apache-2.0`."""
    return doc_id.rsplit(".", 1)[0] if doc_id.endswith((".LICENSE", ".txt")) else doc_id


def wrapped_documents(docs: list[Document], base: Path, seed: int = 0) -> tuple[list[Document], list[Document]]:
    """(plain, wrapped): the same chunks, bare and as chat answers rendered with `base`'s template."""
    meta = read_gguf(base).metadata
    tokens = meta["tokenizer.ggml.tokens"]
    formatter = Jinja2ChatFormatter(
        template=meta["tokenizer.chat_template"],
        eos_token=tokens[int(meta["tokenizer.ggml.eos_token_id"])],
        bos_token=tokens[int(meta["tokenizer.ggml.bos_token_id"])],
    )
    rng = random.Random(seed)
    plain, wrapped = [], []
    for doc in docs:
        for i, chunk in enumerate(chunks(doc.text)):
            question = rng.choice(QUESTIONS).format(name=licence_name(doc.doc_id))
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": chunk}]
            plain.append(Document(f"{doc.doc_id}#{i}", chunk))
            rendered = formatter(messages=messages).prompt  # ends with the next turn's header: cut after ours
            end = rendered.rindex(END_OF_TURN) + len(END_OF_TURN)
            wrapped.append(Document(f"{doc.doc_id}#{i}", rendered[:end]))
    return plain, wrapped


def write_split(out: Path, train: list[Document], source: Path) -> None:
    """A split folder: `train` as its train documents, the source's validation and test splits unchanged."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "train.jsonl", documents_jsonl(train))
    for name in ("validation.jsonl", "test.jsonl", "manifest.json"):
        write_text_atomic(out / name, (source / name).read_text(encoding="utf-8"))


def commands(root: Path, variant: str, init: Path, tokens: int, threads: int) -> list[list[str]]:
    """Datastore, kNN targets, one pass of training from `init`, and the q8_0 export, for one variant."""
    cli = [sys.executable, "-m", "edge_memdec.cli"]
    split, ds, run = root / variant / "split", root / variant / "datastore", root / variant / "run"
    return [
        [*cli, "datastore", "build", "--corpus", str(split), "--out", str(ds), "--max-tokens", str(tokens),
         "--hidden-blocks", "24", "--pass", "carry", "--threads", str(threads),
         *(["--special-tokens"] if variant == "wrapped" else [])],
        [*cli, "knn-targets", str(ds), "-k", "1024", "--temperature", "1", "--threads", str(threads)],
        [*cli, "train", str(ds), "--out", str(run), "--init", str(init), "--frozen-blocks", "24", "--epochs", "1",
         "--lr", "1e-4", "--batch-windows", "8", "--n-ctx", "1024", "--stride", "1024", "--threads", str(threads),
         "--precision", "bf16", "--valid-corpus", str(split), "--valid-tokens", "10000",
         "--export", str(root / f"legal-{variant}-q8_0.gguf"), "--outtype", "q8_0", "--domain", "legal"],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--init", type=Path, required=True, help="the trained decoder's HF folder (RUN/hf)")
    parser.add_argument("--tokens", type=int, default=150_000, help="datastore positions per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run", action="store_true", help="run the commands (else print them)")
    args = parser.parse_args()
    root, source = args.work / "chat-wrapped", args.work / "split"
    plain, wrapped = wrapped_documents(split_documents_of(source, "train"), default_base_gguf())
    todo = []
    for variant, docs in (("plain", plain), ("wrapped", wrapped)):
        write_split(root / variant / "split", docs, source)
        if not (root / f"legal-{variant}-q8_0.gguf").exists():  # a finished variant is not trained again
            todo += commands(root, variant, args.init, args.tokens, args.threads)
    evaluation = Path(__file__).resolve().parent.parent / "bench" / "chat_eval.py"
    for variant in ("plain", "wrapped"):
        if (root / f"chat-{variant}.json").exists():
            continue
        todo.append([sys.executable, str(evaluation), "--memdec", str(root / f"legal-{variant}-q8_0.gguf"),
                     "--special", "base", "--lam", "0.5", "--lam", "0.9", "-n", "128", "--threads", str(args.threads),
                     "--json", str(root / f"chat-{variant}.json")])
    for command in todo:
        print(shlex.join(command), flush=True)
        if args.run:
            subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
