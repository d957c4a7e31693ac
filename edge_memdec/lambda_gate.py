"""The entropy gate on lambda: each token's memory-decoder weight follows how sure the two models are.

    lambda_t = lambda * sigmoid(base_slope * H_base,t - slope * H_mem,t + offset)

H (nats) is the entropy of a model's next-token distribution over the ids both share. Where the decoder is
sure (recalled domain text) lambda_t nears lambda; where it is unsure (text it never saw) lambda_t falls toward 0
and the base speaks. lambda stays the ceiling, so `--lambda` keeps its meaning. Written "SLOPE,OFFSET" the two
slopes are equal (a gate on the entropy gap H_base - H_mem); "SLOPE,OFFSET,BASE_SLOPE" weighs the base's
entropy apart (0: the decoder's own certainty alone). The shipped legal decoder's measurements are in the README
("The entropy gate"). A GGUF may recommend its gate (`memdec.lambda_gate.slope`, `.offset` and, when it differs
from the slope, `.base_slope`, written by `convert --lambda-gate`) as it recommends its lambda.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edge_memdec.errors import UserError

GGUF_KEY = "lambda_gate"  # memdec.lambda_gate.slope and memdec.lambda_gate.offset (f32)
OFF_WORDS = ("off", "none", "0")  # --lambda-gate off: the fixed lambda of the paper
FROM_GGUF = "gguf"  # a pair's default: the gate its one decoder's GGUF recommends (none: the fixed lambda)


@dataclass(frozen=True)
class LambdaGate:
    """lambda_t = lambda * sigmoid(base_slope * H_base - slope * H_mem + offset); slopes in 1/nats, offset
    unitless; base_slope None: equal to slope (the gate on the entropy gap)."""

    slope: float
    offset: float
    base_slope: float | None = None

    def __post_init__(self) -> None:
        for name, value in (("slope", self.slope), ("offset", self.offset), ("base slope", self.base_slope)):
            if name == "base slope" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"the lambda gate's {name} must be a finite number, got {value!r}")
        if self.base_slope is not None and float(self.base_slope) == float(self.slope):
            object.__setattr__(self, "base_slope", None)  # one spelling per gate: "1,0" is "1,0,1"

    @property
    def base_weight(self) -> float:
        """The slope on H_base (1/nats): base_slope, or slope when the two are equal."""
        return float(self.slope if self.base_slope is None else self.base_slope)

    def text(self) -> str:
        """As --lambda-gate takes it: "slope,offset", or "slope,offset,base_slope" when the slopes differ."""
        tail = "" if self.base_slope is None else f",{self.base_slope:g}"
        return f"{self.slope:g},{self.offset:g}{tail}"

    @classmethod
    def parse(cls, text: str) -> LambdaGate | None:
        """--lambda-gate's "SLOPE,OFFSET[,BASE_SLOPE]" (e.g. 1,0 or 1.5,1,1), or None for "off"; a UserError in one
        sentence otherwise."""
        if text.strip().lower() in OFF_WORDS:
            return None
        parts = [p.strip() for p in text.split(",")]
        try:
            if len(parts) not in (2, 3):
                raise ValueError(text)
            numbers = [float(p) for p in parts]
        except ValueError:
            raise UserError(
                f"the lambda gate takes SLOPE,OFFSET or SLOPE,OFFSET,BASE_SLOPE (e.g. 1,0) or off, got {text!r}"
            ) from None
        return cls(*numbers)

    @classmethod
    def of_metadata(cls, memdec: dict) -> LambdaGate | None:
        """The gate a decoder GGUF recommends (its `memdec.*` keys without the prefix), None without one."""
        slope, offset = memdec.get(f"{GGUF_KEY}.slope"), memdec.get(f"{GGUF_KEY}.offset")
        base_slope = memdec.get(f"{GGUF_KEY}.base_slope")
        if slope is None and offset is None and base_slope is None:
            return None
        if slope is None or offset is None:
            raise UserError(f"the memory decoder's GGUF has only part of memdec.{GGUF_KEY} (slope and offset)")
        base = None if base_slope is None else _f32_decimal(base_slope)
        return cls(_f32_decimal(slope), _f32_decimal(offset), base)

    def metadata(self) -> dict[str, dict[str, float]]:
        """As `convert`'s memdec facts: {"lambda_gate": {"slope": ..., "offset": ...[, "base_slope": ...]}}."""
        facts = {"slope": float(self.slope), "offset": float(self.offset)}
        return {GGUF_KEY: facts | ({} if self.base_slope is None else {"base_slope": float(self.base_slope)})}


def _f32_decimal(value: object) -> float:
    """A GGUF f32 value as the decimal it was written from (0.800000011920929 -> 0.8): 7 significant digits."""
    return float(f"{float(value):.7g}")


def resolve_gate(gate: LambdaGate | str | None, memdecs: list[dict]) -> LambdaGate | None:
    """The gate a pair runs: `gate` itself (a LambdaGate, its text, None or "off"), or for FROM_GGUF the one
    its decoder's metadata (`memdecs`: each decoder's memdec.* dict) recommends (none with several decoders)."""
    if gate == FROM_GGUF:
        return LambdaGate.of_metadata(memdecs[0]) if len(memdecs) == 1 else None
    if isinstance(gate, str):
        gate = LambdaGate.parse(gate)
    return _for_decoders(gate, len(memdecs))


def request_gate(text: str, n_decoders: int) -> LambdaGate | None:
    """A request's own gate ("SLOPE,OFFSET[,BASE_SLOPE]" or "off") for a pair of `n_decoders` memory decoders (UserError)."""
    if not isinstance(text, str):
        raise UserError(f"the lambda gate must be text, SLOPE,OFFSET[,BASE_SLOPE] or off, got {text!r}")
    return _for_decoders(LambdaGate.parse(text), n_decoders)


def _for_decoders(gate: LambdaGate | None, n_decoders: int) -> LambdaGate | None:
    """`gate`, which needs exactly one memory decoder (UserError otherwise)."""
    if gate is not None and n_decoders != 1:
        raise UserError(
            f"the lambda gate needs exactly one memory decoder, got {n_decoders}; pass --lambda-gate off"
        )
    return gate
