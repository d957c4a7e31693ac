"""How a pair runs its one-token steps: the models one after the other with every thread each (sequential), or
at once in two threads with half the threads each (overlapped), chosen by timing both on the pair's own steps.

Which wins depends on the models and the machine. A small model gains little from a second thread (each
operation ends at a barrier of all threads), so two small models side by side beat two turns on both cores;
a large base alone on one thread is almost twice as slow as on two, so beside it the turns win. Measured with
`bench/decode.py` at 2 threads on an AVX2 machine: SmolLM2-135M + the shipped decoder 17.76 ms a token in turns,
14.17 ms overlapped. Both ways give the same logits (ggml splits each product by rows, not by thread count; a
test compares every logit), so choosing between them changes only the speed.

`auto` (the default) times `TIMED` steps each way after `WARM` untimed ones, skipping the first step after the
switch (the idle OpenMP workers of the turns still spin then), and keeps the faster by median for the pair's
life: `WARM + 2 * TIMED + 1` steps, ~0.4 s spent once where overlapping loses beside a 1.7B base.
`TimedChoice` is that measurement for any two ways of the same work; the batched server also uses it to choose,
for each number of sequences, between one call for all of them and a call each (batch.py).
"""

from __future__ import annotations

import statistics

from edge_memdec.errors import UserError

AUTO = "auto"
WARM = 2  # untimed first steps (the caches and OpenMP's workers starting)
TIMED = 6  # timed steps each way


class TimedChoice:
    """Two ways of doing the same work (False / True), tried on its first steps and the faster kept: `WARM`
    untimed steps the False way, `TIMED` timed ones, one untimed step the True way (the switch), then `TIMED`
    timed ones; once both have their `TIMED` times the way with the lower median wins for good. `chosen` fixes
    the way from the start (None: measure)."""

    def __init__(self, chosen: bool | None = None) -> None:
        self.chosen = chosen
        self.times: dict[bool, list[float]] = {False: [], True: []}  # seconds per timed step, by way
        self._steps = 0

    def next_step(self) -> tuple[bool, bool]:
        """(the way, timed) for the next step."""
        if self.chosen is not None:
            return self.chosen, False
        i = self._steps
        self._steps += 1
        if i < WARM + TIMED:
            return False, i >= WARM
        return True, i > WARM + TIMED

    def record(self, way: bool, seconds: float) -> None:
        """A timed step's wall time (or any cost of it that is comparable between the ways)."""
        self.times[way].append(seconds)
        if len(self.times[True]) >= TIMED:
            self.chosen = statistics.median(self.times[True]) < statistics.median(self.times[False])


class OverlapChoice(TimedChoice):
    """Sequential (False) or overlapped (True) for each one-token step: `setting` True / False fixes it (where the
    pair can overlap at all: `eligible`), "auto" measures both on the first steps and keeps the faster."""

    def __init__(self, setting: bool | str, eligible: bool) -> None:
        if setting not in (True, False, AUTO):
            raise UserError(f"overlap takes True, False or {AUTO!r}, got {setting!r}")
        self.setting = setting
        super().__init__(None if setting == AUTO and eligible else bool(setting) and eligible)
