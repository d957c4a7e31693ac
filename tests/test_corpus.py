"""Corpora: front matter stripped, splits by document, deterministic, disjoint, with a manifest."""

from __future__ import annotations

import json

import pytest

from edge_memdec.corpus import load_corpus, read_split, split_documents, strip_front_matter, write_split
from edge_memdec.errors import UserError


def test_front_matter_is_stripped():
    text = "---\nkey: mit\nname: MIT\n---\n\nPermission is hereby granted\n"
    assert strip_front_matter(text).strip() == "Permission is hereby granted"
    assert strip_front_matter("no front matter\n---\n") == "no front matter\n---\n"


def test_legal_corpus_has_no_yaml():
    docs = load_corpus("legal")
    assert len(docs) > 2000
    assert not any(d.text.startswith("key:") or "\nshort_name:" in d.text[:400] for d in docs)


def test_split_is_by_document_deterministic_and_disjoint(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(40):
        (folder / f"{i:02d}.txt").write_text(f"document {i} " * 5, encoding="utf-8")
    manifest = write_split(str(folder), tmp_path / "split", seed=3)
    ids = manifest["documents"]
    assert sum(len(v) for v in ids.values()) == 40
    assert set(ids["train"]).isdisjoint(ids["test"]) and set(ids["train"]).isdisjoint(ids["validation"])
    assert [d.doc_id for d in read_split(tmp_path / "split", "test")] == ids["test"]
    again = split_documents(load_corpus(str(folder)), seed=3)
    assert [d.doc_id for d in again["test"]] == ids["test"]
    assert json.loads((tmp_path / "split" / "manifest.json").read_text())["seed"] == 3


def test_jsonl_with_unicode_line_separators(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"id": i, "text": f"line\u2028sep {i}"}, ensure_ascii=False) for i in range(5)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_split(str(path), tmp_path / "s")
    assert sum(len(read_split(tmp_path / "s", s)) for s in ("train", "validation", "test")) == 5


def test_unknown_corpus_is_a_user_error(tmp_path):
    with pytest.raises(UserError):
        load_corpus(str(tmp_path / "missing"))
