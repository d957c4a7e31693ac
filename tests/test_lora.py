"""`lora train` (LoRA and --full) on tiny real bases -> GGUF -> llama.cpp, checked against PyTorch; `--lora` on
the runtime alone and beside a memory decoder; bad adapters refused in one sentence before llama.cpp opens them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from gguf import GGUFReader, GGUFValueType, GGUFWriter  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from edge_memdec.cli import app  # noqa: E402
from edge_memdec.errors import UserError  # noqa: E402
from edge_memdec.llama_model import LlamaModel, ModelOptions  # noqa: E402

CLI = [sys.executable, "-m", "edge_memdec.cli"]
PROBE = list(range(5, 69))  # token ids whose logits are compared
EXACT = dict(n_ctx=128, f32_kv=True, flash_attn=False, n_threads=1)  # llama.cpp as close to PyTorch fp32 as it goes


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def lora_args(source: Path, out: Path, base: Path, *extra: str) -> list[str]:
    small = ["--rank", "4", "--alpha", "8", "--n-ctx", "64", "--stride", "64", "--batch-windows", "8"]
    return ["lora", "train", str(source), "--out", str(out), "-m", str(base), *small, "--threads", "1", *extra]


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_llama_ckpt, legal_text) -> dict[str, Path]:
    """A corpus split of real licence text and the tiny llama's datastore of its train documents."""
    work = tmp_path_factory.mktemp("lora")
    (work / "legal.txt").write_text(legal_text, encoding="utf-8")
    split, ds = work / "split", work / "ds"
    invoke("corpus", "split", str(work / "legal.txt"), "--out", str(split))
    invoke(
        "datastore", "build", "--corpus", str(split), "--out", str(ds), "-m", str(tiny_llama_ckpt),
        "--n-ctx", "64", "--stride", "32", "--shard-windows", "4", "--threads", "1",
    )  # fmt: skip
    return {"split": split, "ds": ds, "work": work}


@pytest.fixture(scope="module")
def llama_lora(stores, tiny_llama_gguf) -> dict[str, Path]:
    """One epoch of a rank-4 LoRA on the datastore's tokens, exported as an f32 GGUF adapter."""
    run, gguf = stores["work"] / "run-lora", stores["work"] / "lora.gguf"
    out = invoke(
        *lora_args(stores["ds"], run, tiny_llama_gguf, "--lr", "1e-2", "--valid-tokens", "300"),
        "--export", str(gguf), "--outtype", "f32",
    )  # fmt: skip
    assert "trained a LoRA adapter" in out and "exported" in out
    return {"run": run, "gguf": gguf}


def pytorch_logits(base_gguf: Path, adapter: Path | None = None, hf: Path | None = None) -> np.ndarray:
    """PyTorch fp32 logits of PROBE: the base from its GGUF, with a peft adapter merged, or a checkpoint folder."""
    from peft import PeftModel

    from edge_memdec.train.base import load_base

    model = (load_base(hf, tokenizer_gguf=base_gguf) if hf else load_base(base_gguf)).model
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    with torch.no_grad():
        return model.eval()(torch.tensor([PROBE])).logits[0].numpy()


def llama_logits(gguf: Path, **options) -> np.ndarray:
    model = LlamaModel(gguf, ModelOptions(**EXACT, **options))
    try:
        return model.logits_rows(model.eval(PROBE, [True] * len(PROBE))).copy()
    finally:
        model.close()


def test_lora_trains_on_the_datastore_budget_and_llama_cpp_matches_pytorch(stores, llama_lora, tiny_llama_gguf):
    summary = json.loads((llama_lora["run"] / "train.json").read_text())
    positions = len(np.load(stores["ds"] / "tokens.npy")) - 1
    assert summary["kind"] == "lora" and summary["positions_trained"] == positions  # one epoch of the same tokens
    assert summary["validation"]["ppl"] < summary["validation"]["base_ppl"]
    assert summary["peak_rss_mib"] > 0 and summary["params_trained"] < summary["params_total"] / 5
    reference = pytorch_logits(tiny_llama_gguf, llama_lora["run"] / "adapter")
    with_lora = llama_logits(tiny_llama_gguf, lora=[llama_lora["gguf"]])
    plain = llama_logits(tiny_llama_gguf)
    assert np.abs(with_lora - reference).max() < 1e-3  # measured 4e-6
    assert np.abs(plain - reference).max() > 0.05  # the adapter changed the logits
    np.testing.assert_array_equal(llama_logits(tiny_llama_gguf, lora=[f"{llama_lora['gguf']}:0"]), plain)


def test_lora_of_a_qwen2_base_from_a_split_folder_matches_pytorch(stores, tiny_qwen2_gguf, tmp_path):
    run, gguf = tmp_path / "run", tmp_path / "qwen2-lora.gguf"
    invoke(*lora_args(stores["split"], run, tiny_qwen2_gguf, "--max-steps", "3", "--lr", "1e-2"))
    invoke("lora", "export", str(run), "--out", str(gguf), "--outtype", "f32")
    reference = pytorch_logits(tiny_qwen2_gguf, run / "adapter")
    assert np.abs(llama_logits(tiny_qwen2_gguf, lora=[(gguf, 1.0)]) - reference).max() < 1e-3
    assert "fits tiny-qwen2-f32.gguf" in invoke("inspect", str(gguf), "--base", str(tiny_qwen2_gguf))


@pytest.fixture(scope="module")
def dapt(stores, tiny_llama_gguf) -> dict[str, Path]:
    """Two steps of full fine-tuning on the datastore's tokens, exported as an f32 GGUF."""
    run, gguf = stores["work"] / "run-dapt", stores["work"] / "dapt.gguf"
    invoke(
        *lora_args(stores["ds"], run, tiny_llama_gguf, "--full", "--max-steps", "2", "--lr", "1e-2"),
        "--export", str(gguf), "--outtype", "f32",
    )  # fmt: skip
    return {"run": run, "gguf": gguf}


def test_full_fine_tune_exports_a_model_llama_cpp_runs(dapt, tiny_llama_gguf):
    run, gguf = dapt["run"], dapt["gguf"]
    summary = json.loads((run / "train.json").read_text())
    assert summary["kind"] == "full" and summary["params_trained"] == summary["params_total"]
    tuned = pytorch_logits(tiny_llama_gguf, hf=run / "hf")
    assert np.abs(llama_logits(gguf) - tuned).max() < 1e-3
    assert np.abs(pytorch_logits(tiny_llama_gguf) - tuned).max() > 0.05


def test_lora_resume_after_sigkill_equals_uninterrupted(stores, tiny_llama_gguf, tmp_path):
    steps = ["--epochs", "4", "--max-steps", "40", "--checkpoint-every", "1", "--warmup-steps", "5"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run([*CLI, *lora_args(stores["ds"], straight, tiny_llama_gguf, *steps)], check=True)
    child = subprocess.Popen([*CLI, *lora_args(stores["ds"], killed, tiny_llama_gguf, *steps)])
    checkpoint = killed / "checkpoint.pt"
    deadline = time.time() + 600
    while not checkpoint.is_file() and time.time() < deadline and child.poll() is None:
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    state = torch.load(checkpoint, weights_only=False)
    assert state["step"] < 40, "the run finished before it could be killed"
    assert all("lora_" in name for name in state["model"])  # the adapter alone, not the frozen base
    shutil.rmtree(killed / "adapter", ignore_errors=True)
    subprocess.run([*CLI, *lora_args(stores["ds"], killed, tiny_llama_gguf, *steps, "--resume")], check=True)
    a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_lora_beside_a_memory_decoder_adapts_the_base_only(llama_lora, tiny_llama_gguf, legal_text):
    from edge_memdec.api import MemoryDecoderLM

    text, kwargs = legal_text[:3000], dict(n_ctx=64, stride=32, lambdas=[0.5])
    with MemoryDecoderLM(tiny_llama_gguf, None, lora=str(llama_lora["gguf"]), n_threads=1) as lm:
        adapted = lm.perplexity(text, **kwargs)["base"]["ppl"]
    with MemoryDecoderLM(tiny_llama_gguf, None, n_threads=1) as lm:
        plain = lm.perplexity(text, **kwargs)["base"]["ppl"]
    # the plain tiny model stands in as the memory decoder: the mixture must see the LoRA on the base alone
    with MemoryDecoderLM(tiny_llama_gguf, tiny_llama_gguf, lora=[llama_lora["gguf"]], n_threads=1) as lm:
        report = lm.perplexity(text, **kwargs)
    assert adapted < plain
    assert report["base"]["ppl"] == pytest.approx(adapted, rel=1e-6)
    assert report["memdec"]["ppl"] == pytest.approx(plain, rel=1e-6)
    assert report["lora"] == [{"file": llama_lora["gguf"].name, "scale": 1.0}]
    assert report["mixed"][0]["ppl"] < max(adapted, plain)  # a mixture's NLL is at most the worse model's


def test_chat_and_inspect_take_the_adapter(llama_lora, tiny_llama_gguf):
    invoke("chat", "-m", str(tiny_llama_gguf), "--no-memdec", "--lora", f"{llama_lora['gguf']}:0.5",
           "-p", "The licence", "--raw", "-n", "4", "--temp", "0", "-t", "1", "-c", "256")  # fmt: skip
    text = invoke("inspect", str(llama_lora["gguf"]), "--base", str(tiny_llama_gguf))
    assert "LoRA adapter for a llama model" in text and "rank 4, alpha 8" in text
    assert "14 matrices in 2 blocks" in text and "fits tiny-llama-f32.gguf" in text


def rewrite(src: Path, dst: Path, alpha_type=GGUFValueType.FLOAT32, general_type: object = "adapter", drop=""):
    """A copy of adapter `src` with adapter.lora.alpha stored as `alpha_type`, general.type set to
    `general_type` (an int is stored as uint32) and the tensor `drop` left out."""
    reader = GGUFReader(src)
    writer = GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "adapter.lora.alpha":
            writer.add_key_value(key, field.contents(), alpha_type)
        elif key == "general.type" and isinstance(general_type, int):
            writer.add_uint32(key, general_type)
        else:
            writer.add_key_value(key, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)
    for tensor in reader.tensors:
        if tensor.name != drop:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_bad_adapters_are_one_sentence_before_llama_cpp_opens_them(
    llama_lora, tiny_llama_gguf, tiny_qwen2_gguf, smollm2_gguf, tmp_path
):
    good = llama_lora["gguf"]
    data = good.read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(data[: len(data) - 100])
    (tmp_path / "noise.gguf").write_bytes(os.urandom(4096))
    corrupt = bytearray(data)
    corrupt[24:32] = (2**40).to_bytes(8, "little")  # the first key's length
    (tmp_path / "corrupt.gguf").write_bytes(bytes(corrupt))
    cases = {
        # llama.cpp aborts the whole process on these two (GGML_ASSERT in gguf.cpp, measured)
        rewrite(good, tmp_path / "alpha-f64.gguf", alpha_type=GGUFValueType.FLOAT64): "adapter.lora.alpha",
        rewrite(good, tmp_path / "type-int.gguf", general_type=7): "general.type is not a string",
        rewrite(good, tmp_path / "half.gguf", drop="blk.1.attn_q.weight.lora_b"): "blk.1.attn_q.weight.lora_b is missing",
        tmp_path / "truncated.gguf": "truncated",
        tmp_path / "noise.gguf": "not a GGUF file",
        tmp_path / "corrupt.gguf": "not a valid GGUF file",
        tiny_qwen2_gguf: "is not a LoRA adapter",
    }
    for path, needle in cases.items():
        with pytest.raises(UserError, match=needle):
            LlamaModel(tiny_llama_gguf, ModelOptions(n_ctx=64, lora=[path]))
    with pytest.raises(UserError, match="does not fit the base model SmolLM2.*in the base but"):
        LlamaModel(smollm2_gguf, ModelOptions(n_ctx=64, lora=[good]))
    for args, needle in (
        (["--lora", str(good), "-m", str(tiny_qwen2_gguf)], "is for the llama architecture and the base is qwen2"),
        (["--lora", f"{good}:nan", "-m", str(tiny_llama_gguf)], "finite number"),
        (["-m", str(good)], "is a LoRA adapter, not a model"),
    ):
        proc = subprocess.run(
            [*CLI, "chat", "--no-memdec", "-p", "hi", *args], capture_output=True, text=True, timeout=120
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert needle in lines[0]


def test_compare_reports_every_row_on_one_protocol(stores, llama_lora, dapt, tiny_llama_gguf, tiny_llama_ckpt, legal_text, tmp_path):
    pytest.importorskip("faiss")
    from conftest import licence_folder, licence_text

    from edge_memdec.api import MemoryDecoderLM

    invoke("knn-targets", str(stores["ds"]), "-k", "8", "--top", "4", "--chunk", "64", "--threads", "1")
    memdec = tmp_path / "memdec.gguf"
    invoke(
        "train", str(stores["ds"]), "--out", str(tmp_path / "run-mem"), "-m", str(tiny_llama_ckpt), "--layers", "1",
        "--n-ctx", "32", "--stride", "32", "--batch-windows", "2", "--threads", "1", "--max-steps", "2",
        "--export", str(memdec), "--outtype", "f32", "--tokenizer-from", str(tiny_llama_gguf),
    )  # fmt: skip
    domain, general = tmp_path / "domain.txt", tmp_path / "general.txt"
    domain.write_text(legal_text[:2000], encoding="utf-8")
    general.write_text(licence_text(licence_folder() / "gpl-2.0.LICENSE")[:2000], encoding="utf-8")
    report_path, plot = tmp_path / "compare.json", tmp_path / "compare.png"
    table = invoke(
        "compare", "-f", str(domain), "--general", str(general), "-m", str(tiny_llama_gguf),
        "--lora", str(llama_lora["gguf"]), "--dapt", str(dapt["gguf"]), "--memdec", str(memdec),
        "--knn", str(stores["ds"]), "-k", "8", "-c", "64", "--decode-tokens", "4", "-t", "1",
        "--json", str(report_path), "--plot", str(plot),
    )  # fmt: skip
    report = json.loads(report_path.read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == [
        "base", "base + LoRA", "DAPT (full fine-tune)", "kNN-LM", "base + memory decoder",
        "base + LoRA + memory decoder",
    ]  # fmt: skip
    assert all(name in table for name in rows)
    assert all(r["tokens_scored"] == report["tokens_scored"] for r in rows.values())
    assert all(r["stderr"] > 0 and r["general_ppl"] > 1 for r in rows.values())
    assert rows["kNN-LM"]["decode_ms_per_token"] is None
    assert all(r["decode_ms_per_token"] > 0 for name, r in rows.items() if name != "kNN-LM")
    options = dict(n_ctx=64, n_batch=64, n_threads=1, flash_attn=False)  # as compare opens its models
    with MemoryDecoderLM(tiny_llama_gguf, None, lora=[llama_lora["gguf"]], **options) as lm:
        alone = lm.perplexity(legal_text[:2000], n_ctx=64, lambdas=[])["base"]["ppl"]
    assert rows["base + LoRA"]["ppl"] == pytest.approx(alone, rel=1e-9)  # the same protocol as `perplexity`
    lora_run = json.loads((llama_lora["run"] / "train.json").read_text())
    memdec_run = json.loads((tmp_path / "run-mem" / "train.json").read_text())
    assert rows["base + LoRA"]["training"]["positions"] == lora_run["positions_trained"]
    both = rows["base + LoRA + memory decoder"]["training"]
    assert both["positions"] == lora_run["positions_trained"] + memdec_run["positions_trained"]
    assert both["seconds"] == pytest.approx(lora_run["seconds"] + memdec_run["seconds"], rel=1e-5)
    assert rows["kNN-LM"]["training"]["positions"] == len(np.load(stores["ds"] / "tokens.npy")) - 1
    assert rows["DAPT (full fine-tune)"]["bytes"] == dapt["gguf"].stat().st_size
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
