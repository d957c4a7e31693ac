"""edge-memdec: Memory Decoder (arXiv 2508.09874) beside a llama.cpp base model, on CPU or a consumer GPU."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["MemoryDecoderLM", "UserError", "__version__"]

from edge_memdec.errors import UserError

if TYPE_CHECKING:
    from edge_memdec.api import MemoryDecoderLM


def __getattr__(name: str):
    """Import the Python API lazily so `import edge_memdec` stays cheap (no llama.cpp load)."""
    if name == "MemoryDecoderLM":
        from edge_memdec.api import MemoryDecoderLM

        return MemoryDecoderLM
    raise AttributeError(f"module 'edge_memdec' has no attribute {name!r}")
