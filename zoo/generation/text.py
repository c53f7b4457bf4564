"""Text out of a generation: each row's text while it runs (cut at EOS and stop strings), token
ids trimmed after stop strings, and streaming."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from zoo.generation.engine import DecodeBuffers, Generation, generated_tokens

if TYPE_CHECKING:
    from zoo.generation.engine import GenerationEngine


class TextRows:
    """The text of each row's new tokens while generation runs: cut before the row's first EOS
    and before the first stop string. `update(buffers)` (each time the decode yields) decodes
    every unfinished row again and marks rows finished in the buffers when a stop string shows.

    Each row is decoded whole each time (not token by token): byte-level tokens of one
    character and decoders that look at neighbours (Metaspace, cleanup) then give exactly the
    text a single decode of the final ids gives."""

    def __init__(self, tokenizer, batch: int, eos: tuple[int, ...], stops: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.eos = set(eos)
        self.stops = stops
        self.text = [""] * batch
        self.done = [False] * batch  # the row's text is final (EOS or stop string)
        self.stopped = [False] * batch  # ended by a stop string
        self.tokens: list[list[int]] = [[] for _ in range(batch)]  # new ids before any EOS
        self.emitted = 0  # streaming (row 0): characters already handed out

    def update(self, buffers: DecodeBuffers) -> None:
        step = int(buffers.step.item())
        rows = buffers.out[:, :step].tolist()
        for row, ids in enumerate(rows):
            if self.done[row]:
                continue
            eos_at = next((i for i, t in enumerate(ids) if t in self.eos), None)
            if eos_at is not None:
                ids = ids[:eos_at]
                self.done[row] = True
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            cut = self.find_stop(text)
            if cut is not None:
                text = text[:cut]
                self.done[row] = self.stopped[row] = True
                buffers.finished[row] = True
            self.text[row], self.tokens[row] = text, ids

    def find_stop(self, text: str) -> int | None:
        """Where the first stop string in text begins (None: nowhere)."""
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def take_piece(self, final: bool = False) -> str:
        """Streaming, row 0: the text not handed out yet, short of what may still change (a
        trailing U+FFFD that the next token may complete; a tail that may begin a stop string)."""
        text = self.text[0]
        end = len(text)
        if not (final or self.done[0]):
            end = len(text.rstrip("\ufffd"))
            held = 0
            for stop in self.stops:
                for k in range(min(len(stop) - 1, end), held, -1):
                    if text.endswith(stop[:k], 0, end):
                        held = k
                        break
            end -= held
        piece = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece

    def trim_ids(self, generated: torch.Tensor, pad_token_id: int) -> torch.Tensor:
        """Token ids [B, n] after stop strings: a stopped row keeps its ids up to the one that
        completes the stop string, then pads; columns after every row's end are dropped."""
        generated = generated.clone()
        ends = []
        for row, ids in enumerate(generated.tolist()):
            if self.stopped[row]:
                low, high = 1, len(self.tokens[row])  # the shortest prefix holding a stop string
                while low < high:
                    mid = (low + high) // 2
                    text = self.tokenizer.decode(ids[:mid], skip_special_tokens=True)
                    low, high = (low, mid) if self.find_stop(text) is not None else (mid + 1, high)
                generated[row, low:] = pad_token_id
                ends.append(low)
            else:
                eos_at = next((i for i, t in enumerate(ids) if t in self.eos), None)
                ends.append(len(ids) if eos_at is None else eos_at + 1)
        return generated[:, : max(ends)]


def new_tokens(
    generation: Generation, batch: int, tokenizer, stops: tuple[str, ...]
) -> torch.Tensor:
    """The new tokens [B, n] of a generation. With stop strings, a row that meets one keeps its
    ids up to the token completing it, then pads (as HF's stop_strings)."""
    rows = TextRows(tokenizer, batch, generation.eos, stops) if stops else None
    for buffers in generation.buffers:
        if rows is not None:
            rows.update(buffers)
    generated = generated_tokens(buffers)
    if rows is not None:
        generated = rows.trim_ids(generated, generation.pad_token_id)
    return generated


def new_text(
    generation: Generation | None, batch: int, tokenizer, stops: tuple[str, ...]
) -> list[str]:
    """The new text of each row of a generation (None: no new tokens)."""
    rows = TextRows(tokenizer, batch, generation.eos if generation else (), stops)
    if generation is not None:
        for buffers in generation.buffers:
            rows.update(buffers)
    return rows.text


class TextStream:
    """Text pieces of one prompt's continuation, as the tokens are produced (`for piece in
    stream`). A piece never ends inside a UTF-8 character or inside what may become a stop
    string, so the pieces join to exactly the text generate(..., stream=False) returns.
    `tokens` holds the new token ids so far (EOS excluded); close() ends generation early.
    Each step holds the engine's lock; a new generation of the model ends the stream."""

    def __init__(
        self,
        engine: GenerationEngine,
        tokenizer,
        generation: Generation | None,
        stops: tuple[str, ...],
    ) -> None:
        self.tokens: list[int] = []
        self._rows = TextRows(tokenizer, 1, generation.eos if generation else (), stops)
        self._engine = engine
        self._pieces = self._produce(generation)
        if generation is not None:  # it shares the engine's decode buffers
            engine.open_stream(self)

    def _produce(self, generation: Generation | None) -> Iterator[str]:
        try:
            if generation is not None:
                for buffers in generation.buffers:
                    self._rows.update(buffers)
                    self.tokens = self._rows.tokens[0]
                    if piece := self._rows.take_piece():
                        yield piece
            if piece := self._rows.take_piece(final=True):
                yield piece
        finally:
            self._engine.close_stream(self)

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        # each step runs in inference mode; the caller's code between pieces does not
        with self._engine.lock, torch.inference_mode():
            return next(self._pieces)

    def close(self) -> None:
        """Stop generating (the rest of the text is not produced)."""
        with self._engine.lock:
            self._pieces.close()

    @property
    def text(self) -> str:
        """The text so far (all of it once the stream is exhausted)."""
        return self._rows.text[0]
