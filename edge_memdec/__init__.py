"""edge-memdec: Memory Decoder (arXiv 2508.09874) beside a llama.cpp base model, on CPU or a consumer GPU."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

# llama.cpp runs prompt batches on OpenMP threads; libgomp's default busy-wait made a 36-token prompt take 8 s
# instead of 0.4 s on a busy 2-core machine. It must be set before libgomp loads, i.e. before any submodule
# imports llama_cpp; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

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
