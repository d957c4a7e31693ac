"""Batched decoding for the server: up to `pair.n_parallel` generations advance together, with one llama_decode
per model per step for all the decoding sequences.

Each running generation owns one sequence (a slot) of the pair's contexts: its own KV stream of `n_ctx`
cells. A step evaluates the last sampled token of every decoding sequence in one call (or in one call each,
where that measured faster for that many sequences: on some CPUs llama.cpp computes 2-4 rows barely faster than
one, and a one-sequence step can run the two models side by side, overlap.py), then the next piece
of each waiting prompt (arrival order, at most n_batch prompt tokens a step, so a long prompt never stalls the
others for more than a piece), each piece in a call of its own: llama.cpp would split it from the decodes
into a micro-batch of its own anyway (per-sequence streams), and alone its rows get the kernels the
sequential loop gives them. Every sequence whose logits came out then takes `Generation.step`, the per-token
code the sequential driver runs too.

What another sequence does never reaches a sequence's numbers: it attends to its own stream; weight products
are row by row for quantized weights; attention is llama.cpp's exact one (flash attention is off for
n_parallel > 1 unless asked for: its CPU kernel depends on the micro-batch's rows and cells); no prompt piece
is a single row (another kernel). So a greedy answer is the one the sequential loop gives from an empty cache.

A slot keeps its tokens when its generation ends: the next generation placed there (the free slot with the
longest shared prefix, as llama-server picks one, else the lowest id) keeps the prefix they share.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from edge_memdec.decode import Generation
from edge_memdec.errors import UserError
from edge_memdec.overlap import AUTO, TimedChoice
from edge_memdec.pair import ModelPair

N_NEW = 2  # prompt tokens evaluated at least, as from an empty cache: no one-row piece (see the module's text)


@dataclass
class Output:
    """What one step did for one generation: the text pieces to hand out; `done` once it ended (`error` set
    when it failed)."""

    generation: Generation
    pieces: list[str]
    done: bool = False
    error: Exception | None = None


@dataclass
class _Slot:
    seq: int  # the sequence id in both contexts
    generation: Generation
    pending: list[int]  # tokens to evaluate before its next logits: the prompt's rest, then each sampled token
    prompting: bool = True  # the prompt is not fully evaluated yet


class BatchDecoder:
    """The batched driver: `add` generations while `free` > 0, call `step` while `active` > 0.

    Driven from one thread, which holds `pair.lock` while any generation is active (a sequential generation
    elsewhere, e.g. a Python API call on the same pair, waits until the batch is empty, and the other way
    round)."""

    def __init__(self, pair: ModelPair, split: bool | str = AUTO) -> None:
        """`split`: whether a step decodes its sequences in one call each (True) or all in one call (False);
        "auto" times both ways for each number of decoding sequences and keeps the faster (the same tokens
        either way: a sequence's numbers do not depend on what else is in the call)."""
        if pair.n_batch < pair.n_parallel:
            raise UserError(
                f"a batch of {pair.n_batch} tokens cannot hold {pair.n_parallel} parallel sequences; raise the "
                "batch size or lower --parallel"
            )
        if split not in (True, False, AUTO):
            raise ValueError(f"split takes True, False or {AUTO!r}, got {split!r}")
        self.pair = pair
        self.split = split
        self.split_choices: dict[int, TimedChoice] = {}  # by the number of decoding sequences (auto)
        self._slots: dict[int, _Slot] = {}  # by sequence id, in the order the generations came

    @property
    def active(self) -> int:
        return len(self._slots)

    @property
    def free(self) -> int:
        return self.pair.n_parallel - len(self._slots)

    def add(self, generation: Generation) -> int:
        """Start `generation` in a free sequence (the one whose cache shares most of its prompt); returns the
        sequence id. Its prompt is evaluated by the next steps."""
        if generation.pair is not self.pair:
            raise ValueError("the generation belongs to another model pair")
        if not self.free:
            raise RuntimeError("every sequence is busy; wait for one to end")
        if not self._slots:
            self.pair.lock.acquire()
        try:
            prompt = generation.prompt_tokens
            free = [s for s in range(self.pair.n_parallel) if s not in self._slots]
            seq = max(free, key=lambda s: (self.pair.common_prefix(prompt, s, N_NEW), -s))
            generation.begin()
            generation.n_cached = self.pair.reuse_prefix(prompt, seq, N_NEW)
        except BaseException:
            if not self._slots:
                self.pair.lock.release()
            raise
        self._slots[seq] = _Slot(seq, generation, list(prompt[generation.n_cached :]))
        return seq

    def step(self) -> list[Output]:
        """One token for every decoding sequence (one llama_decode per model for all of them, or one each: see
        `split`), and the next piece of each waiting prompt (one llama_decode each, at most n_batch prompt tokens
        in all)."""
        outputs = [
            self._close(slot, slot.generation.finish("cancelled"))  # nothing more evaluated for a client gone
            for slot in list(self._slots.values())
            if slot.generation.cancel.is_set()
        ]
        # ascending ids: llama.cpp puts consecutive sequences of one call into one micro-batch
        decoding = sorted((s for s in self._slots.values() if not s.prompting), key=lambda s: s.seq)
        pieces = self._prompt_pieces()
        if decoding:
            split, choice = self._split(len(decoding))
            entries = [(slot, slot.pending, True) for slot in decoding]
            t0 = time.perf_counter()
            for call in [[entry] for entry in entries] if split else [entries]:
                outputs += self._evaluate(call)
            if choice is not None:
                choice.record(split, time.perf_counter() - t0)
        for piece in pieces:
            outputs += self._evaluate([piece])
        return outputs

    def _split(self, n: int) -> tuple[bool, TimedChoice | None]:
        """Whether this step decodes its `n` sequences in a call each, and the choice to time it for (None:
        untimed). While the pair still times its one-sequence steps (overlapped or in turns) the calls are split
        untimed, so that choice settles first."""
        if n == 1 or self.split != AUTO:
            return n > 1 and self.split is True, None
        if self.pair.overlap.chosen is None:
            return True, None
        choice = self.split_choices.setdefault(n, TimedChoice())
        split, timed = choice.next_step()
        return split, choice if timed else None

    def _prompt_pieces(self) -> list[tuple[_Slot, list[int], bool]]:
        """(slot, tokens, last piece) of the waiting prompts, in arrival order, while n_batch tokens last.

        No piece is a single token: llama.cpp computes a one-row micro-batch with other kernels than a longer
        one, and the sequential loop evaluates a fresh prompt in pieces of n_batch."""
        room = self.pair.n_batch
        pieces = []
        for slot in self._slots.values():
            n_left = len(slot.pending)
            if not slot.prompting or room < 2:
                continue
            take = n_left if n_left <= room else room - (n_left - room == 1)
            if take < 2 and take < n_left:
                continue
            pieces.append((slot, slot.pending[:take], take == n_left))
            room -= take
        return pieces

    def _evaluate(self, entries: list[tuple[_Slot, list[int], bool]]) -> list[Output]:
        """One llama_decode per model for `entries`, then a step of each generation that got logits."""
        outputs = []
        seqs, chunks, wanted = zip(*((slot.seq, chunk, want) for slot, chunk, want in entries), strict=True)
        try:
            last = self.pair.eval_seqs(seqs, chunks, wanted)
        except Exception as err:  # llama.cpp failed the call: its sequences end, their cells are freed
            for slot, _, _ in entries:
                self.pair.clear(slot.seq)
                outputs.append(self._close(slot, [], err))
            return outputs
        base, memdecs = self.pair.base, self.pair.memdecs
        for (slot, chunk, want), i in zip(entries, last, strict=True):
            del slot.pending[: len(chunk)]
            if not want:
                continue
            generation = slot.generation
            if slot.prompting:
                slot.prompting = False
                generation.prompt_evaluated()
            try:
                pieces = generation.step(base.logits_at(i), [memdec.logits_at(i) for memdec in memdecs])
            except Exception as err:
                outputs.append(self._close(slot, [], err))
                continue
            if generation.finish_reason is not None:
                outputs.append(self._close(slot, pieces))
            else:
                slot.pending.append(generation.tokens[-1])
                if pieces:
                    outputs.append(Output(generation, pieces))
        return outputs

    def abandon(self, error: Exception) -> list[Output]:
        """End every active generation with `error` and free their cells (after an unexpected failure)."""
        outputs = []
        for slot in list(self._slots.values()):
            self.pair.clear(slot.seq)
            outputs.append(self._close(slot, [], error))
        return outputs

    def _close(self, slot: _Slot, pieces: list[str], error: Exception | None = None) -> Output:
        slot.generation.end()
        del self._slots[slot.seq]
        if not self._slots:
            self.pair.lock.release()
        return Output(slot.generation, pieces, True, error)
