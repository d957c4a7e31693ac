"""`edge-memdec convert` as a user runs it: a real subprocess, one-line errors, nothing half-written."""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from edge_memdec.gguf_file import read_gguf


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_memdec.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_convert_a_memory_decoder_with_its_metadata(tiny_memdec_ckpt, smollm2_gguf, tmp_path):
    out = tmp_path / "legal-memdec-q8_0.gguf"
    proc = run_cli(
        "convert", tiny_memdec_ckpt, "-o", out, "--outtype", "q8_0", "--tokenizer-from", smollm2_gguf,
        "--lambda", "0.45", "--domain", "legal", "--base-model", "SmolLM2-135M-Instruct",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {out}"
    info = read_gguf(out)
    assert info.file_type == "Q8_0"
    assert info.memdec["lambda"] == pytest.approx(0.45)
    assert (info.memdec["domain"], info.memdec["base_model"]) == ("legal", "SmolLM2-135M-Instruct")
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_convert_a_gpt2_memory_decoder_that_pairs_with_its_gpt2_base(
    tiny_gpt2_memdec_ckpt, tiny_gpt2_gguf, tmp_path
):
    out = tmp_path / "gpt2-memdec-q8_0.gguf"
    proc = run_cli(
        "convert", tiny_gpt2_memdec_ckpt, "-o", out, "--outtype", "q8_0", "--tokenizer-from", tiny_gpt2_gguf,
        "--lambda", "0.4",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {out}"
    shown = run_cli("inspect", out, "--base", tiny_gpt2_gguf)
    assert shown.returncode == 0, shown.stderr
    assert "arch         gpt2, 1 layers, hidden 256, 4 heads (4 kv), trained context 512" in shown.stdout
    assert "file type    Q8_0 (tensors: 11 F32, 5 Q8_0)" in shown.stdout
    assert f"pair         compatible with {tiny_gpt2_gguf.name}" in shown.stdout


def test_gpt2_setting_llama_cpp_cannot_follow_is_one_line(tiny_gpt2_ckpt, tmp_path):
    folder = tmp_path / "layer-scaled"
    shutil.copytree(tiny_gpt2_ckpt, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "scale_attn_by_inverse_layer_idx": True}))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = run_cli("convert", folder, "-o", out_dir / "model.gguf")
    assert proc.returncode == 1
    assert proc.stderr == (
        f"error: {folder}/config.json sets scale_attn_by_inverse_layer_idx = True, but llama.cpp does not divide "
        "attention scores by the layer number; it cannot convert\n"
    )
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}"], "does not exist"),
        (["{ckpt}", "--outtype", "q3"], "unknown outtype 'q3'"),
        (["{ckpt}", "--lambda", "2"], "lambda must be between 0 and 1, got 2.0"),
        (["{ckpt}", "--tokenizer-from", "{ckpt}/config.json"], "not a GGUF file"),
    ],
)
def test_convert_errors_are_one_line_and_write_nothing(args, message, tiny_llama_ckpt, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    filled = [a.format(missing=tmp_path / "no-such-model", ckpt=tiny_llama_ckpt) for a in args]
    proc = run_cli("convert", *filled, "-o", out_dir / "model.gguf")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr
    assert list(out_dir.iterdir()) == []


def test_killed_conversion_never_leaves_a_partial_file(tiny_memdec_ckpt, tmp_path):
    """SIGKILL while the GGUF is being written: nothing under the final name, and a rerun cleans up and succeeds."""
    out = tmp_path / "memdec.gguf"
    command = [sys.executable, "-m", "edge_memdec.cli", "convert", str(tiny_memdec_ckpt), "-o", str(out)]
    for delay in (0.0, 0.02, 0.05):
        child = subprocess.Popen([*command, "--outtype", "f32"], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".memdec.gguf.*.part")) and child.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        time.sleep(delay)
        child.kill()
        child.wait()
        if out.exists():  # the child finished first: then the file must be whole
            assert read_gguf(out).n_params == 3_219_776
            out.unlink()
    assert list(tmp_path.glob(".memdec.gguf.*.part"))
    proc = run_cli("convert", tiny_memdec_ckpt, "-o", out, "--outtype", "f32")
    assert proc.returncode == 0, proc.stderr
    assert read_gguf(out).n_params == 3_219_776
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_full_disk_is_one_line_and_leaves_nothing(tiny_memdec_ckpt, tmp_path):
    """A file-size limit of 1 MiB makes the 14 MiB export fail mid-write the way a full disk does."""
    limit = 1 << 20

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "memdec.gguf"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_memdec.cli",
            "convert",
            str(tiny_memdec_ckpt),
            "-o",
            str(out),
            "--outtype",
            "f32",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: writing {out} failed (File too large)"), proc.stderr
    assert proc.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
