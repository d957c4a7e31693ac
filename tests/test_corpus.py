"""Corpora: front matter stripped, splits by document, deterministic, disjoint, with a manifest."""

from __future__ import annotations

import json

import pytest

from edge_memdec.corpus import (
    general_documents,
    general_sample,
    general_text,
    load_corpus,
    read_split,
    split_documents,
    strip_front_matter,
    write_split,
)
from edge_memdec.errors import UserError


def test_front_matter_is_stripped():
    text = "---\nkey: mit\nname: MIT\n---\n\nPermission is hereby granted\n"
    assert strip_front_matter(text).strip() == "Permission is hereby granted"
    assert strip_front_matter("no front matter\n---\n") == "no front matter\n---\n"


def test_legal_corpus_has_no_yaml():
    docs = load_corpus("legal")
    assert len(docs) > 2000
    assert not any(d.text.startswith("key:") or "\nshort_name:" in d.text[:400] for d in docs)


def test_general_text_is_four_news_categories_and_shares_no_document_with_finance():
    general = general_documents()
    finance = {d.text for d in load_corpus("finance")}
    assert len(general) > 1500 and {d.doc_id.split("/")[0] for d in general} == {
        "entertainment",
        "politics",
        "sports",
        "tech",
    }
    assert not finance & {d.text for d in general}


def test_general_news_is_a_fixed_sample_unless_a_file_has_that_name(tmp_path, monkeypatch):
    news = general_text("news")
    assert 30_000 < len(news) <= 40_000 and news == general_text("news")
    assert news.split("\n\n")[0] in {d.text.split("\n\n")[0] for d in general_documents()}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "news").write_text("my own general text", encoding="utf-8")
    assert general_text("news") == "my own general text"
    assert general_sample() == news  # the reports' general text does not depend on the working folder
    with pytest.raises(UserError, match="does not exist"):
        general_text("missing.txt")


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


def test_normalize_reflows_wrapped_paragraphs_and_keeps_structure():
    from edge_memdec.normalize import normalize_text

    text = (
        "                         EXAMPLE PUBLIC LICENSE\n"
        "                          Version 1, May 2001\n"
        " \n"
        "1. Definitions.\n"
        "\n"
        "   The licensor grants you a worldwide, royalty-free, non-exclusive\n"
        "   licence to use, copy and modify the software, subject to the  terms\n"
        "   below, if you (1) keep this notice in every copy you make, and\n"
        "   (2) state your changes.\n"
        "*******************************************************************\n"
        "Conditions:\n"
        "- you keep the copyright notice in every copy of the software that\n"
        "  you distribute to anyone;\n"
        "- you do not use the names of the authors.\n"
        "\n\n\n"
        "Copyright (c) 2001 Example\n"
        "All rights reserved.\n"
    )
    assert normalize_text(text).split("\n") == [
        "EXAMPLE PUBLIC LICENSE",
        "Version 1, May 2001",
        "",
        "1. Definitions.",
        "",
        "The licensor grants you a worldwide, royalty-free, non-exclusive licence to use, copy and modify the "
        "software, subject to the terms below, if you (1) keep this notice in every copy you make, and (2) state "
        "your changes.",
        "",
        "Conditions:",
        "- you keep the copyright notice in every copy of the software that you distribute to anyone;",
        "- you do not use the names of the authors.",
        "",
        "Copyright (c) 2001 Example",
        "All rights reserved.",
    ]


def test_normalize_leaves_unwrapped_text_alone():
    from edge_memdec.normalize import normalize_text

    long = "A paragraph on one line that runs well past any typewriter margin. " * 4
    text = f"Title\n\n{long.strip()}\n{long.strip()}\n\nThe end."
    assert normalize_text(text) == text


def test_split_normalises_unless_raw(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    wrapped = "\n".join(["word " * 12] * 4)  # a 60-column paragraph wrapped over four lines
    for i in range(6):
        (folder / f"{i}.txt").write_text(wrapped, encoding="utf-8")
    write_split(str(folder), tmp_path / "norm", seed=0)
    write_split(str(folder), tmp_path / "raw", seed=0, normalize=False)
    norm, raw = read_split(tmp_path / "norm", "train"), read_split(tmp_path / "raw", "train")
    assert [d.doc_id for d in norm] == [d.doc_id for d in raw]
    assert all("\n" not in d.text for d in norm) and all(d.text.count("\n") == 3 for d in raw)
