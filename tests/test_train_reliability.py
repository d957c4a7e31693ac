"""`datastore build` and `knn-targets` killed with SIGKILL mid-run and rerun, a full disk while they write, and
the IVF-PQ index against exact search. Real subprocesses, the real tiny base in PyTorch, real faiss."""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
faiss = pytest.importorskip("faiss")

from conftest import licence_folder, licence_text  # noqa: E402

from edge_memdec.train.datastore import datastore_keys, load_keys, trim_to_finished  # noqa: E402
from edge_memdec.train.knn_targets import (  # noqa: E402
    FlatKeys,
    build_index,
    build_targets,
    drop_self,
    exact_agreement,
)

CLI = [sys.executable, "-m", "edge_memdec.cli"]
TOKENS = 20_000  # ~156 shards of 4 windows; the tiny base keys them in a few seconds
KNN = ["-k", "64", "--top", "8", "--chunk", "256", "--threads", "1"]


def build_args(corpus: Path, out: Path, base: Path) -> list[str]:
    return [
        "datastore", "build", "--corpus", str(corpus), "--out", str(out), "-m", str(base),
        "--max-tokens", str(TOKENS), "--n-ctx", "64", "--stride", "32", "--shard-windows", "4", "--threads", "1",
    ]  # fmt: skip


def run(args: list[str], limit: int | None = None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; with `limit`, files it writes may not grow past `limit` bytes (a full disk:
    writes fail with EFBIG, SIGXFSZ ignored)."""

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=limit_file_size if limit is not None else None,
    )


def kill_when(args: list[str], ready, what: str) -> None:
    """Start the CLI, SIGKILL it as soon as `ready()` is true (polled), and check it had not finished yet."""
    child = subprocess.Popen([*CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    try:
        while not ready():
            assert child.poll() is None, f"{what} ended (status {child.returncode}) before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet; it is replaced atomically, so never half-read
        return {}


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last, proc.stderr


def assert_same_datastore(a: Path, b: Path) -> None:
    ma, mb = (json.loads((d / "datastore.json").read_text()) for d in (a, b))
    for m in (ma, mb):
        m.pop("seconds")
        m["finished"].sort()
    assert ma == mb
    np.testing.assert_array_equal(np.load(a / "tokens.npy"), np.load(b / "tokens.npy"))
    for shard in ma["shards"]:
        name = f"keys-{shard['index']:05d}.npy"
        np.testing.assert_array_equal(np.load(a / name), np.load(b / name), err_msg=name)


def copy_datastore(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("targets"))
    return dst


def unfinish(ds: Path, keep: int) -> dict:
    """Turn a finished datastore into the state a build killed after `keep` shards leaves behind."""
    manifest = json.loads((ds / "datastore.json").read_text())
    manifest["finished"] = manifest["finished"][:keep]
    for shard in manifest["shards"][keep:]:
        (ds / f"keys-{shard['index']:05d}.npy").unlink()
    (ds / "datastore.json").write_text(json.dumps(manifest))
    return manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A folder of real licence texts (every 20th file, ~117 documents) for `--max-tokens` to sample from."""
    folder = tmp_path_factory.mktemp("corpus")
    for path in sorted(licence_folder().glob("*.LICENSE"))[1::20]:
        text = licence_text(path)
        if text.strip():
            (folder / f"{path.stem}.txt").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, tiny_llama_ckpt) -> Path:
    """An uninterrupted datastore (20k positions, 156 shards) with uninterrupted exact k=64 targets."""
    ds = tmp_path_factory.mktemp("reference") / "ds"
    for args in (build_args(corpus, ds, tiny_llama_ckpt), ["knn-targets", str(ds), *KNN]):
        proc = run(args)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return ds


def test_killed_datastore_build_resumes_to_the_uninterrupted_result(
    reference, corpus, tiny_llama_ckpt, tmp_path
):
    ds = tmp_path / "ds"
    args = build_args(corpus, ds, tiny_llama_ckpt)
    kill_when(args, lambda: len(read_json(ds / "datastore.json").get("finished", [])) >= 3, "datastore build")
    manifest = json.loads((ds / "datastore.json").read_text())
    finished = set(manifest["finished"])
    assert 3 <= len(finished) < len(manifest["shards"])
    # under final names only whole files: the manifest, the token stream, finished shards, and at most the one
    # shard whose file was renamed into place just before the kill (the manifest did not record it yet)
    shards = {s["index"]: s for s in manifest["shards"]}
    on_disk = {p.name for p in ds.iterdir() if not p.name.startswith(".")}
    keys_files = {name for name in on_disk if name.startswith("keys-")}
    assert on_disk - keys_files == {"datastore.json", "tokens.npy"}
    indices = {int(name[5:10]) for name in keys_files}
    assert finished <= indices and len(indices - finished) <= 1
    for i in indices:
        keys = np.load(ds / f"keys-{i:05d}.npy")
        assert keys.shape == (shards[i]["stop"] - shards[i]["start"], 64) and keys.dtype == np.float16
        np.testing.assert_array_equal(keys, np.load(reference / f"keys-{i:05d}.npy"))
    proc = run(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_datastore(ds, reference)  # bit-equal: one torch thread, the same windows
    assert not [p.name for p in ds.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_killed_knn_targets_resume_to_the_uninterrupted_result(reference, tmp_path):
    out = tmp_path / "targets"
    args = ["knn-targets", str(reference), "-o", str(out), *KNN]
    kill_when(args, lambda: len(read_json(out / "targets.json").get("finished", [])) >= 2, "knn-targets")
    manifest = json.loads((out / "targets.json").read_text())
    chunks = len(range(0, manifest["n_positions"], 256))
    assert not manifest.get("complete") and 2 <= len(manifest["finished"]) < chunks
    assert not (out / "knn-ids.npy").exists() and not (out / "knn-probs.npy").exists()
    partial = np.load(out / "knn-ids.partial.npy", mmap_mode="r")
    expected = np.load(reference / "targets" / "knn-ids.npy", mmap_mode="r")
    for start in manifest["finished"]:  # every chunk the manifest calls finished is really there
        np.testing.assert_array_equal(partial[start : start + 256], expected[start : start + 256])
    del partial
    proc = run(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # bit-equal: the same flat index, the same chunks of queries
    for name in ("knn-ids.npy", "knn-probs.npy"):
        np.testing.assert_array_equal(
            np.load(out / name), np.load(reference / "targets" / name), err_msg=name
        )
    assert sorted(p.name for p in out.iterdir()) == ["knn-ids.npy", "knn-probs.npy", "targets.json"]


def test_full_disk_during_datastore_build_keeps_finished_shards(reference, corpus, tiny_llama_ckpt, tmp_path):
    ds = copy_datastore(reference, tmp_path / "ds")
    manifest = unfinish(ds, keep=10)
    before = {p.name: p.read_bytes() for p in ds.iterdir()}
    proc = run(build_args(corpus, ds, tiny_llama_ckpt), limit=8_000)  # a shard is 16.5 kB
    assert_one_line_error(proc, f"writing {ds / 'keys-00010.npy'} failed")
    assert {p.name: p.read_bytes() for p in ds.iterdir()} == before  # nothing new, nothing changed
    assert json.loads((ds / "datastore.json").read_text())["finished"] == manifest["finished"]


def test_full_disk_during_knn_targets_is_one_line(reference, tmp_path):
    out = tmp_path / "targets"
    proc = run(["knn-targets", str(reference), "-o", str(out), *KNN], limit=100_000)  # ids need 640 kB
    assert_one_line_error(proc, "failed (File too large)")
    assert sorted(p.name for p in out.iterdir()) in ([], ["targets.json"])


@pytest.fixture(scope="module")
def small(reference, tmp_path_factory) -> Path:
    """The first 25 shards (~3,200 positions) of the reference datastore as a datastore of its own."""
    ds = copy_datastore(reference, tmp_path_factory.mktemp("small") / "ds")
    unfinish(ds, keep=25)
    trim_to_finished(ds)
    return ds


def test_ivfpq_excludes_self_by_index_and_agrees_with_exact_search(small, tmp_path):
    """IVF-PQ scaled down to ~3,200 64-dim keys (25 shards). Coarse codes (16 lists, 8 bytes) rank another key above the
    query's own entry for ~3% of queries: it is still the one dropped, by index. Targets from `auto` above its
    threshold (32 lists, 32-byte codes, nprobe 8) are normalised, and their top-1 token agrees with exact search
    on ~0.9 of positions (measured 0.903 on carried keys, 0.911 on windowed ones)."""
    keys = load_keys(small)
    n = keys.shape[0]  # 25 shards: 3,200 positions of the carried pass (3,232 of 1024/512-style windows)
    assert keys.shape == (n, 64) and 3_000 < n < 3_300
    coarse = build_index(keys, "ivfpq", nprobe=4, lists=16, pq_bytes=8)
    distances, neighbours = coarse.search(keys, 9)
    own = np.arange(n)
    assert (neighbours == own[:, None]).any(axis=1).mean() > 0.99  # quantised, yet among the 9 hits
    assert (neighbours[:, 0] != own).mean() > 0.01, "self always came first: this would prove nothing"
    kept_d, kept = drop_self(distances, neighbours, own, 8)
    assert kept.shape == (n, 8) and not (kept == own[:, None]).any()
    other = neighbours != own[:, None]
    np.testing.assert_array_equal(kept[other.all(axis=1)], neighbours[other.all(axis=1), :8])

    common = dict(k=32, top=8, chunk=1024, threads=1, nprobe=8)
    approx = build_targets(
        small, tmp_path / "ivf", index_kind="auto", threshold=1_000, lists=32, pq_bytes=32, **common
    )
    exact = build_targets(small, tmp_path / "flat", index_kind="flat", **common)
    assert approx["index_used"] == "ivfpq: 32 lists, 32-byte codes, nprobe 8"
    assert exact["index_used"] == "flat"
    ids = {name: np.load(tmp_path / name / "knn-ids.npy") for name in ("ivf", "flat")}
    probs = np.load(tmp_path / "ivf" / "knn-probs.npy").astype(np.float32)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=2e-3)
    assert (probs >= 0).all() and (np.diff(probs, axis=1) <= 1e-3).all()  # heaviest first
    agreement = float(np.mean(ids["ivf"][:, 0] == ids["flat"][:, 0]))
    print(f"IVF-PQ top-1 target agreement with exact search: {agreement:.3f}")
    assert agreement > 0.8
    assert abs(approx["next_token_in_support"] - exact["next_token_in_support"]) < 0.1


def test_ivfflat_searched_by_list_finds_faiss_neighbours_and_targets(small, tmp_path):
    """IVF-flat searched by inverted list (one matrix product per list, `ivf_search`) against faiss's own
    per-query scan of the same index: the same neighbours at the same distances (up to rounding: ties may swap),
    -1 where a query's lists hold fewer than k keys, and kNN targets that match whichever way they are searched
    (chunks below `BY_LIST_MIN_QUERIES` go through faiss)."""
    from edge_memdec.train.ivf_search import BY_LIST_MIN_QUERIES, search, search_by_list

    keys = load_keys(small)
    index = build_index(keys, "ivfflat", nprobe=3, lists=16)
    d_faiss, i_faiss = index.search(keys, 65)
    d_list, i_list = search(index, keys, 65)
    assert len(keys) >= BY_LIST_MIN_QUERIES
    np.testing.assert_allclose(d_list, d_faiss, rtol=1e-4, atol=1e-3)
    recall = np.mean([len(np.intersect1d(a, b)) / 65 for a, b in zip(i_faiss, i_list, strict=True)])
    assert recall > 0.999
    assert not np.array_equal(i_list, index.search(keys, 64)[1]), "k was not passed through"
    # far more neighbours than one probed list holds: the same padding as faiss's
    d_few, i_few = index.search(keys[:50], 900)
    d_pad, i_pad = search_by_list(index, keys[:50], 900)
    assert (i_few == -1).any()
    np.testing.assert_array_equal(i_pad == -1, i_few == -1)

    common = dict(k=32, top=8, threads=1, nprobe=3, lists=16, index_kind="ivfflat")
    by_list = build_targets(small, tmp_path / "by-list", chunk=2048, **common)
    per_query = build_targets(small, tmp_path / "per-query", chunk=512, **common)
    assert by_list["index_used"] == per_query["index_used"] == "ivfflat: 16 lists, nprobe 3"
    probs = {name: np.load(tmp_path / name / "knn-probs.npy").astype(np.float32) for name in ("by-list", "per-query")}
    ids = {name: np.load(tmp_path / name / "knn-ids.npy") for name in ("by-list", "per-query")}
    assert np.mean(ids["by-list"][:, 0] == ids["per-query"][:, 0]) > 0.99
    np.testing.assert_allclose(probs["by-list"].sum(axis=1), 1.0, atol=2e-3)
    np.testing.assert_allclose(np.sort(probs["by-list"], axis=1), np.sort(probs["per-query"], axis=1), atol=2e-3)


def test_flat_search_is_indexflatl2s_without_copying_the_keys(small):
    """`flat` searches the loaded keys where they are (a 3M-key datastore is 6.8 GB of float32 keys: IndexFlatL2
    would hold a second copy) and answers exactly as IndexFlatL2, padding included."""
    keys = load_keys(small)
    flat = build_index(keys, "flat")
    reference = faiss.IndexFlatL2(keys.shape[1])
    reference.add(keys)
    assert np.shares_memory(flat.keys, keys)
    for k in (9, len(keys) + 5):
        d_ref, i_ref = reference.search(keys[:300], k)
        d_flat, i_flat = flat.search(keys[:300], k)
        np.testing.assert_array_equal(i_flat, i_ref)
        np.testing.assert_array_equal(d_flat, d_ref)


def test_keys_read_from_their_shards_search_as_the_loaded_keys(small):
    """`ShardRows` reads keys from the shard files as asked (slices and positions across shard boundaries, in
    any order), and every search over them (exact a block at a time, IVF filled a block at a time, the
    approximate index's agreement sample) answers as over the loaded array: a 3M-key datastore's 6.8 GB of
    float32 keys are then never all in memory."""
    loaded = load_keys(small)
    keys = datastore_keys(small)
    assert keys.shape == loaded.shape and len(keys) == len(loaded)
    for piece in (slice(0, 5), slice(100, 1_900), slice(len(loaded) - 3, None), slice(7, 7)):
        np.testing.assert_array_equal(keys[piece], loaded[piece])
    ids = np.array([3_100, 5, 129, 128, 127, 5, 2_000])
    np.testing.assert_array_equal(keys[ids], loaded[ids])
    with pytest.raises(IndexError):
        keys[np.array([len(loaded)])]

    block = 500  # 7 blocks, the last one short
    streamed, in_memory = FlatKeys(keys, block=block), build_index(loaded, "flat")
    for k in (9, 700, len(loaded) + 5):  # 700 > a block's keys; beyond n: padded with -1
        d_stream, i_stream = streamed.search(loaded[:200], k)
        d_ref, i_ref = in_memory.search(loaded[:200], k)
        np.testing.assert_allclose(d_stream, d_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(i_stream == -1, i_ref == -1)
        same = np.mean(i_stream == i_ref)
        assert same > 0.999, same  # only equal distances may swap
    for kind in ("ivfflat", "ivfpq"):
        index_options = dict(nprobe=4, lists=16, pq_bytes=8)
        a, b = build_index(keys, kind, **index_options), build_index(loaded, kind, **index_options)
        assert a.ntotal == b.ntotal == len(loaded)
        for found, expected in zip(a.search(loaded[:300], 10), b.search(loaded[:300], 10), strict=True):
            np.testing.assert_array_equal(found, expected)
        assert exact_agreement(a, keys, 32) == exact_agreement(b, loaded, 32)
