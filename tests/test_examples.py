"""The examples run as a user would run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_offline_app_explains_clauses_of_a_real_licence(tmp_path, legal_text, smollm2_gguf, tiny_memdec_gguf):
    licence = tmp_path / "licence.txt"
    licence.write_text(legal_text, encoding="utf-8")
    args = ["--base", str(smollm2_gguf), "--memdec", str(tiny_memdec_gguf), "--clauses", "2", "-n", "4"]
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "offline_app.py"), str(licence), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "[1] " in result.stdout and "[2] " in result.stdout


def test_offline_app_reports_a_missing_file(tmp_path, smollm2_gguf, tiny_memdec_gguf):
    args = [str(tmp_path / "nope.txt"), "--base", str(smollm2_gguf), "--memdec", str(tiny_memdec_gguf)]
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "offline_app.py"), *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    assert result.stderr == f"error: {tmp_path / 'nope.txt'} does not exist\n"
