"""A full disk while `perplexity --json/--plot` and `convert` write: one line, exit 1, nothing under the final name,
earlier results untouched. The disk fills through RLIMIT_FSIZE (SIGXFSZ ignored), so writes past the limit fail
with EFBIG exactly where a full disk fails with ENOSPC. (`datastore build` and `knn-targets`:
test_train_reliability.py.)"""

from __future__ import annotations

import resource
import signal
import subprocess
import sys

import pytest


def run_limited(limit: int, *args) -> subprocess.CompletedProcess:
    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "edge_memdec.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=limit_file_size,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, start: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # progress bars may come first
    assert last.startswith(start), proc.stderr


@pytest.fixture
def text(tmp_path, legal_text):
    path = tmp_path / "legal.txt"
    path.write_text(legal_text, encoding="utf-8")
    return path


def perplexity_args(smollm2_gguf, tiny_memdec_gguf, text):
    return ["perplexity", "-m", smollm2_gguf, "--memdec", tiny_memdec_gguf, "-f", text, "-c", "64", "--chunks", "1",
            "--lambda-sweep", "0,0.5,1", "-t", "2"]  # fmt: skip


def test_full_disk_on_perplexity_json_keeps_the_earlier_report(
    smollm2_gguf, tiny_memdec_gguf, text, tmp_path
):
    report = tmp_path / "report.json"
    report.write_text('{"earlier": "report"}\n')
    proc = run_limited(300, *perplexity_args(smollm2_gguf, tiny_memdec_gguf, text), "--json", report)
    assert_one_line_error(proc, f"error: writing {report} failed (File too large)")
    assert "Final estimate" in proc.stdout  # the scores were printed before the write failed
    assert report.read_text() == '{"earlier": "report"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["legal.txt", "report.json"]


def test_full_disk_on_perplexity_plot_keeps_the_earlier_plot(smollm2_gguf, tiny_memdec_gguf, text, tmp_path):
    report, plot = tmp_path / "report.json", tmp_path / "lambda.png"
    plot.write_bytes(b"earlier plot")
    proc = run_limited(
        8_000, *perplexity_args(smollm2_gguf, tiny_memdec_gguf, text), "--json", report, "--plot", plot
    )
    assert_one_line_error(proc, f"error: writing {plot} failed (File too large)")
    assert plot.read_bytes() == b"earlier plot"
    assert report.stat().st_size < 8_000 and '"mixed"' in report.read_text()  # the small JSON fit
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lambda.png", "legal.txt", "report.json"]


def test_full_disk_on_quantized_convert_keeps_the_earlier_gguf(tiny_memdec_ckpt, tiny_memdec_gguf, tmp_path):
    """q8_0 (written by our encoder, 3.4 MB) and q4_k_m (whose f32 temp file fails first; llama.cpp's own writer
    cannot be reached with a per-file limit, its output being smaller than its input) both stop at a 1 MiB limit;
    the GGUF already under the output name stays as it was."""
    out = tmp_path / "memdec.gguf"
    earlier = tiny_memdec_gguf.read_bytes()
    out.write_bytes(earlier)
    for outtype in ("q8_0", "q4_k_m"):
        proc = run_limited(1 << 20, "convert", tiny_memdec_ckpt, "-o", out, "--outtype", outtype)
        assert_one_line_error(proc, f"error: writing {out} failed (")
        assert "check the free disk space" in proc.stderr
        assert out.read_bytes() == earlier
        assert [p.name for p in tmp_path.iterdir()] == [out.name]
