"""Incremental detokenization: token pieces (bytes) in, complete UTF-8 text out, stop strings held back."""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    """Turns a stream of token pieces into text that is safe to show.

    A multi-byte character split across tokens is emitted once all its bytes arrived; text that could be the
    start of a stop string is held back until it is clear it is not one.
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self._pending = ""
        self.text = ""
        self.stopped = False

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; return the newly showable text ("" when held back or after a stop)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(piece)
        return self._release(final=False)

    def flush(self) -> str:
        """End of generation: return whatever is still held back (a partial stop string is just text)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        for stop in self._stop:
            at = self._pending.find(stop)
            if at >= 0:
                out = self._pending[:at]
                self._pending = ""
                self.stopped = True
                self.text += out
                return out
        keep = 0 if final else self._held_back()
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        self.text += out
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the pending text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest
