"""Batched decoding for the server: up to `pair.n_parallel` generations advance together, with one llama_decode
per model per step for all the decoding sequences.

Each running generation owns one sequence (a slot) of the pair's contexts: its own KV stream of `n_ctx`
cells. A step evaluates the last sampled token of every decoding sequence in one call, then the next piece
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

from dataclasses import dataclass

from edge_memdec.decode import Generation
from edge_memdec.errors import UserError
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

    def __init__(self, pair: ModelPair) -> None:
        if pair.n_batch < pair.n_parallel:
            raise UserError(
                f"a batch of {pair.n_batch} tokens cannot hold {pair.n_parallel} parallel sequences; raise the "
                "batch size or lower --parallel"
            )
        self.pair = pair
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
        """One token for every decoding sequence (one llama_decode per model for all of them), and the next
        piece of each waiting prompt (one llama_decode each, at most n_batch prompt tokens in all)."""
        outputs = [
            self._close(slot, slot.generation.finish("cancelled"))  # nothing more evaluated for a client gone
            for slot in list(self._slots.values())
            if slot.generation.cancel.is_set()
        ]
        # ascending ids: llama.cpp puts consecutive sequences of one call into one micro-batch
        decoding = sorted((s for s in self._slots.values() if not s.prompting), key=lambda s: s.seq)
        calls = [[(slot, slot.pending, True) for slot in decoding]] if decoding else []
        calls += [[piece] for piece in self._prompt_pieces()]
        for entries in calls:
            outputs += self._evaluate(entries)
        return outputs

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
