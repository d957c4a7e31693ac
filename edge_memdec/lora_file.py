"""GGUF LoRA adapters: checked here, against the base they are meant for, before llama.cpp opens them.

llama.cpp (src/llama-adapter.cpp) reads `general.type` and `adapter.type` as strings and `adapter.lora.alpha`
as an f32 without checking their types, which aborts the process on a file that stores them otherwise; it
pairs every `<base tensor>.lora_a` with its `.lora_b`, skips `*_norm.weight`, and refuses any other tensor, a
pair whose base tensor is missing, and shapes that do not match it. Each of those is one sentence here.

Shapes are GGUF order (PyTorch's reversed): for a base matrix [n_in, n_out], lora_a is [n_in, rank] and lora_b
is [rank, n_out]; the token embedding's pair [rank, n_vocab] and [rank, n_embd] (llama.cpp's llm_build_inp_embd).
The adapter adds (alpha / rank) * scale * B @ A to the base matrix, scale being the user's `--lora FILE:SCALE`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFValueType, Keys

from edge_memdec.errors import UserError, refuse_misfit
from edge_memdec.gguf_file import GGUFInfo, TensorInfo, read_adapter_gguf

ADAPTER_TYPE = Keys.Adapter.TYPE  # str: "lora"
LORA_ALPHA = Keys.Adapter.LORA_ALPHA  # f32: alpha; 0 or absent: the product is scaled by --lora's scale alone
ALORA_TOKENS = Keys.Adapter.ALORA_INVOCATION_TOKENS  # an activated LoRA: not run here
BASE_NAME = Keys.General.BASE_MODEL_NAME.format(id=0)  # str: the base it was trained on (informative)
LORA_A, LORA_B = ".lora_a", ".lora_b"
SKIPPED_SUFFIX = "_norm.weight"  # llama.cpp ignores norm vectors in an adapter
TOKEN_EMBD = "token_embd.weight"


@dataclass(frozen=True)
class LoraPair:
    """The two low-rank factors an adapter adds to one base tensor."""

    target: str  # the base tensor, e.g. "blk.0.attn_q.weight"
    a: TensorInfo
    b: TensorInfo

    @property
    def rank(self) -> int:
        return self.a.shape[0] if self.target.endswith(TOKEN_EMBD) else self.a.shape[1]

    @property
    def base_shape(self) -> tuple[int, int]:
        """The base tensor's GGUF shape this pair fits."""
        if self.target.endswith(TOKEN_EMBD):
            return self.b.shape[1], self.a.shape[1]
        return self.a.shape[0], self.b.shape[1]


@dataclass(frozen=True)
class LoraInfo:
    """A validated GGUF LoRA adapter."""

    header: GGUFInfo
    alpha: float
    pairs: list[LoraPair]

    @property
    def path(self) -> Path:
        return self.header.path

    @property
    def arch(self) -> str:
        return self.header.arch

    @property
    def n_bytes(self) -> int:
        return self.header.n_bytes

    @property
    def ranks(self) -> list[int]:
        """The distinct ranks of its pairs, smallest first."""
        return sorted({p.rank for p in self.pairs})

    @property
    def base_name(self) -> str | None:
        value = self.header.get(BASE_NAME)
        return value if isinstance(value, str) else None


def read_lora(path: str | Path) -> LoraInfo:
    """Read and check a GGUF LoRA adapter so that llama.cpp's loader can neither abort nor refuse it for a reason
    of the file alone (whether it fits a base is `lora_problems`)."""
    info = read_adapter_gguf(path)

    def fail(problem: str) -> UserError:
        return UserError(f"{info.path} is not a valid LoRA adapter: {problem}; re-export it")

    if info.value_types.get(ADAPTER_TYPE, (None,))[0] != GGUFValueType.STRING or info.get(ADAPTER_TYPE) != "lora":
        raise fail(f"{ADAPTER_TYPE} is {info.get(ADAPTER_TYPE)!r}, not the string 'lora'")
    alpha = info.get(LORA_ALPHA, 0.0)
    if LORA_ALPHA in info.metadata and (info.value_types[LORA_ALPHA][0] != GGUFValueType.FLOAT32 or not math.isfinite(alpha)):
        raise fail(f"{LORA_ALPHA} is not a finite f32 number")
    if ALORA_TOKENS in info.metadata:
        raise UserError(f"{info.path} is an activated LoRA (aLoRA), which this runtime does not run")
    halves: dict[str, dict[str, TensorInfo]] = {}
    for t in info.tensors:
        suffix = t.name[-len(LORA_A) :]
        if suffix in (LORA_A, LORA_B):
            halves.setdefault(t.name[: -len(suffix)], {})[suffix] = t
        elif not t.name.endswith(SKIPPED_SUFFIX):
            raise fail(f"the tensor {t.name!r} is neither a .lora_a nor a .lora_b half")
    pairs = []
    for target, half in halves.items():
        if len(half) != 2:
            missing = LORA_B if LORA_A in half else LORA_A
            raise fail(f"the tensor {target}{missing} is missing")
        a, b = half[LORA_A], half[LORA_B]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise fail(f"the pair of {target} is not two matrices")
        embd = target.endswith(TOKEN_EMBD)
        if (a.shape[0] != b.shape[0]) if embd else (a.shape[1] != b.shape[0]):
            raise fail(f"the two halves of {target} have different ranks")
        pairs.append(LoraPair(target, a, b))
    if not pairs:
        raise fail("it holds no lora_a / lora_b tensor pair")
    return LoraInfo(header=info, alpha=float(alpha), pairs=pairs)


def lora_problems(base: GGUFInfo, lora: LoraInfo) -> list[str]:
    """Every reason llama.cpp would refuse `lora` on `base`, one sentence each; empty when it fits."""
    problems = []
    if lora.arch != base.arch:
        problems.append(f"it is for the {lora.arch} architecture and the base is {base.arch}")
    tensors = {t.name: t for t in base.tensors}
    for pair in lora.pairs:
        target = tensors.get(pair.target)
        if target is None:
            problems.append(f"the base has no tensor {pair.target}")
        elif len(target.shape) != 2 or target.shape != pair.base_shape:
            problems.append(
                f"{pair.target} is {list(target.shape)} in the base but {list(pair.base_shape)} in the adapter"
            )
        if len(problems) >= 3:
            break
    return problems


def check_lora(base: GGUFInfo, lora: LoraInfo) -> None:
    """Raise UserError with the first problem when `lora` cannot run on `base`."""
    refuse_misfit(
        f"the LoRA adapter {lora.path.name}", base.path.name, lora_problems(base, lora), "use an adapter trained on this base"
    )


def lora_spec(item: str | Path | tuple[str | Path, float]) -> tuple[Path, float]:
    """One adapter as (file, scale): a `--lora` string FILE[:SCALE], a path (scale 1) or a (path, scale) pair;
    the scale must be a finite number."""
    if isinstance(item, Path):
        return item, 1.0
    if not isinstance(item, str):
        path, scale = item
        return Path(path), _finite_scale(scale, f"{path}:{scale}")
    path, scale = item, 1.0
    head, sep, tail = item.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
        except ValueError:
            pass  # a colon in the file name itself
        else:
            path = head
    if not path:
        raise UserError("--lora needs a file, e.g. --lora adapter.gguf or --lora adapter.gguf:0.5")
    return Path(path), _finite_scale(scale, item)


def _finite_scale(scale: object, shown: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise UserError(f"--lora {shown}: the scale must be a finite number, e.g. adapter.gguf:0.5")
    return float(scale)
