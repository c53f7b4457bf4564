"""Input checks of every family (token ids, attention masks, padding on either side, text prompts),
written once.

Type, shape, dtype and device checks always run. Checks that read values (ids in the vocabulary,
mask values and layout) must read the device, so a call gathers them in one ValueChecks and reads
them all back with a single host sync; they are skipped while torch.compile traces
(`torch.compiler.is_compiling()`); padding, positions and lengths are tensor ops either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

PaddingSide = Literal["left", "right"]


def _tracing() -> bool:
    return torch.compiler.is_compiling()


Test = Callable[[list[int]], str | None]  # values read back -> error message, or None


class ValueChecks:
    """The value checks of one call, read back together: each adds a few device scalars and a
    test of their values that returns an error message (or None); run() copies every scalar to
    the host at once (one sync, where a check on its own would sync each time) and raises the
    first failure, in the order the checks were added. enabled=False: structure checks only (a
    CUDA graph computes the values itself, zoo.graphs)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._values: list[torch.Tensor] = []
        self._tests: list[tuple[int, Test]] = []

    def add(self, make_values: Callable[[], list[torch.Tensor]], test: Test) -> None:
        """make_values() computes the device scalars (only when the checks are on)."""
        if not self.enabled or _tracing():
            return
        values = make_values()
        self._tests.append((len(values), test))
        self._values.extend(v.reshape(1).to(torch.int64) for v in values)

    def gather(self) -> GatheredChecks:
        """The values so far in one device tensor (no sync: it may be captured in a CUDA graph)
        with their tests; read back by GatheredChecks.run()."""
        values = torch.cat(self._values) if self._values else None
        gathered = GatheredChecks(values, self._tests)
        self._values, self._tests = [], []
        return gathered

    def run(self) -> None:
        self.gather().run()


@dataclass
class GatheredChecks:
    values: torch.Tensor | None  # int64 [n]
    tests: list[tuple[int, Test]]

    def run(self) -> None:
        """Read the values back (one sync) and raise the first failed test's message."""
        if self.values is None:
            return
        values = self.values.tolist()
        start = 0
        for count, test in self.tests:
            message = test(values[start : start + count])
            if message is not None:
                raise ValueError(message)
            start += count


def _checked(run: Callable[[ValueChecks], object], checks: ValueChecks | None):
    """run(checks) with the caller's ValueChecks, or with its own, read back at once."""
    if checks is not None:
        return run(checks)
    own = ValueChecks()
    result = run(own)
    own.run()
    return result


def _in_range(size: int, message: Callable[[int], str]) -> Callable[[list[int]], str | None]:
    """The test of (min, max) values that must lie in [0, size); message(bad value)."""

    def test(values: list[int]) -> str | None:
        low, high = values
        return message(low if low < 0 else high) if low < 0 or high >= size else None

    return test


def check_input_ids(
    input_ids: torch.Tensor,
    vocab_size: int,
    device: torch.device,
    name: str = "input_ids",
    checks: ValueChecks | None = None,
) -> None:
    """Reject ids the kernels must never see: wrong type, shape, device, or outside the vocab.
    `name` is the argument named in the message (e.g. decoder_input_ids). With `checks`, the
    range check is added there (read back by its run()) instead of syncing here."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: expected int64 or int32 token ids, got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"{name}: expected shape [batch, seq], got {tuple(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise ValueError(f"{name}: empty input of shape {tuple(input_ids.shape)}")
    if input_ids.device != device:
        raise ValueError(f"{name}: on {input_ids.device}, but the model is on {device}")
    _checked(
        lambda c: c.add(
            lambda: list(torch.aminmax(input_ids)),
            _in_range(
                vocab_size,
                lambda bad: f"{name}: token id {bad} is outside the vocabulary [0, {vocab_size})",
            ),
        ),
        checks,
    )


def check_attention_mask(
    attention_mask: torch.Tensor, input_ids: torch.Tensor, checks: ValueChecks | None = None
) -> torch.Tensor:
    """The mask as int64 0/1 [B, T], after rejecting what would silently mean something else: not
    a tensor, a floating-point mask (an additive -inf mask, or 0.5 that a cast turns into 0),
    another shape or device than input_ids, values other than 0 and 1."""
    _check_beside_ids(
        "attention_mask",
        attention_mask,
        input_ids,
        lambda dtype: not (dtype.is_floating_point or dtype.is_complex),
        "an integer or bool tensor of 0 and 1",
    )
    mask = attention_mask.to(torch.int64)
    _checked(
        lambda c: c.add(
            lambda: [(mask.clamp(0, 1) != mask).any()],
            lambda bad: "attention_mask: values must be 0 or 1" if bad[0] else None,
        ),
        checks,
    )
    return mask


def _check_beside_ids(
    name: str,
    tensor,
    input_ids: torch.Tensor,
    accepts: Callable[[torch.dtype], bool],
    expected_dtype: str,
) -> None:
    """A per-token tensor given with input_ids: a tensor of a dtype `accepts` takes, of
    input_ids' shape and device."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if not accepts(tensor.dtype):
        raise ValueError(f"{name}: expected {expected_dtype}, got {tensor.dtype}")
    if tensor.shape != input_ids.shape:
        raise ValueError(
            f"{name}: shape {tuple(tensor.shape)} != input_ids {tuple(input_ids.shape)}"
        )
    if tensor.device != input_ids.device:
        raise ValueError(f"{name}: on {tensor.device}, input_ids on {input_ids.device}")


def _padding_test(side: str, batches: str) -> Callable[[list[int]], str | None]:
    def test(values: list[int]) -> str | None:
        wrong_side, empty_row = values
        if wrong_side:
            layout = "zeros, then ones" if side == "left" else "ones, then zeros"
            return f"attention_mask: {batches} must be {side}-padded (each row: {layout})"
        if empty_row:
            return "attention_mask: a row has no real token"
        return None

    return test


def left_padding(
    attention_mask: torch.Tensor | None,
    input_ids: torch.Tensor,
    checks: ValueChecks | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [B, T] (int64) and first real slot [B] (int32) of a left-padded batch."""
    batch, seq = input_ids.shape
    if attention_mask is None:
        positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        return positions, torch.zeros(batch, dtype=torch.int32, device=input_ids.device)

    def check(c: ValueChecks) -> torch.Tensor:
        mask = check_attention_mask(attention_mask, input_ids, c)
        c.add(
            lambda: [(mask[:, 1:] < mask[:, :-1]).any(), (mask[:, -1] == 0).any()],
            _padding_test("left", "decoder-only batches"),
        )
        return mask

    mask = _checked(check, checks)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kv_start = (mask == 0).sum(-1).to(torch.int32)
    return positions, kv_start


def right_padding_lengths(
    attention_mask: torch.Tensor | None,
    input_ids: torch.Tensor,
    batches: str,
    checks: ValueChecks | None = None,
) -> torch.Tensor | None:
    """Real tokens per row [B] (int32) of a right-padded batch (each mask row: ones, then zeros;
    at least one token), or None without a mask. `batches` names them in the message (e.g.
    "Bert batches", "T5 encoder batches")."""
    if attention_mask is None:
        return None
    mask = _checked(lambda c: check_right_padding(attention_mask, input_ids, batches, c), checks)
    return mask.sum(-1).to(torch.int32)


def check_right_padding(
    attention_mask: torch.Tensor, input_ids: torch.Tensor, batches: str, checks: ValueChecks
) -> torch.Tensor:
    """Add the checks of a right-padded batch's mask to `checks` (0/1 values, each row ones then
    zeros, at least one token); returns the mask as int64."""
    mask = check_attention_mask(attention_mask, input_ids, checks)
    checks.add(
        lambda: [(mask[:, 1:] > mask[:, :-1]).any(), (mask[:, 0] == 0).any()],
        _padding_test("right", batches),
    )
    return mask


def check_token_type_ids(
    token_type_ids: torch.Tensor | None,
    input_ids: torch.Tensor,
    type_vocab_size: int,
    checks: ValueChecks | None = None,
) -> torch.Tensor:
    """Bert's segment ids [B, T] in [0, type_vocab_size) (None: all 0)."""
    if token_type_ids is None:
        return torch.zeros_like(input_ids)
    _check_beside_ids(
        "token_type_ids",
        token_type_ids,
        input_ids,
        lambda dtype: dtype in (torch.int64, torch.int32),
        "int64 or int32",
    )
    _checked(
        lambda c: c.add(
            lambda: list(torch.aminmax(token_type_ids)),
            _in_range(
                type_vocab_size,
                lambda bad: f"token_type_ids: {bad} is outside [0, {type_vocab_size})",
            ),
        ),
        checks,
    )
    return token_type_ids


@dataclass
class Prompt:
    """A checked batch of prompt ids and what its padding means to the model: left padding gives
    positions and the first real slot of each row, right padding the real length of each row."""

    input_ids: torch.Tensor  # [B, T]
    positions: torch.Tensor | None = None  # [B, T] int64 (left padding)
    kv_start: torch.Tensor | None = None  # [B] int32 (left padding)
    lengths: torch.Tensor | None = None  # [B] int32 (right padding)


def read_prompt(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    side: PaddingSide,
    vocab_size: int,
    device: torch.device,
) -> Prompt:
    """input_ids [B, T] and their mask, checked, as a Prompt padded on `side`."""
    checks = ValueChecks()
    check_input_ids(input_ids, vocab_size, device, checks=checks)
    if side == "left":
        positions, kv_start = left_padding(attention_mask, input_ids, checks)
        checks.run()
        return Prompt(input_ids, positions=positions, kv_start=kv_start)
    lengths = right_padding_lengths(attention_mask, input_ids, "encoder batches", checks)
    checks.run()
    if lengths is None:
        batch, seq = input_ids.shape
        lengths = torch.full((batch,), seq, dtype=torch.int32, device=input_ids.device)
    return Prompt(input_ids, lengths=lengths)


def pad_prompts(
    rows: list[list[int]], side: PaddingSide, pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and attention mask [B, T] (int64) of token-id rows padded on `side`."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.int64)
    mask = torch.zeros(len(rows), longest, dtype=torch.int64)
    for row, tokens in enumerate(rows):
        span = slice(longest - len(tokens), longest) if side == "left" else slice(0, len(tokens))
        ids[row, span] = torch.tensor(tokens)
        mask[row, span] = 1
    return ids.to(device), mask.to(device)


def check_prompts(prompts: str | list[str]) -> list[str]:
    """A str or non-empty list of str prompts as a list; a list of token ids (not a tensor) is
    named as such rather than taken for text."""
    texts = [prompts] if isinstance(prompts, str) else prompts
    if not texts:
        raise ValueError("input_ids: empty list of prompts")
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(
            "input_ids: expected a torch.Tensor of token ids [batch, seq], or a str or list of "
            f"str prompts; got a list holding {type(bad).__name__}"
        )
    return texts


def require_tokenizer(tokenizer, what: str = "text prompts"):
    if tokenizer is None:
        raise ValueError(f"{what} need a tokenizer (tokenizer.json beside the checkpoint)")
    return tokenizer


def encode_prompts(tokenizer, prompts: str | list[str], vocab_size: int) -> list[list[int]]:
    """Token ids of each prompt. An id outside the model's vocabulary is the tokenizer's fault
    (a tokenizer.json of another checkpoint), so the message names the tokenizer and the prompt."""
    texts = check_prompts(prompts)
    tokenizer = require_tokenizer(tokenizer)
    encoded = [tokenizer.encode(t).ids for t in texts]
    if not all(encoded):
        raise ValueError("prompt: a prompt encodes to no tokens")
    for text, ids in zip(texts, encoded, strict=True):
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(
                f"prompt {text[:40]!r}: the tokenizer produced token id {bad}, outside the "
                f"model's vocabulary [0, {vocab_size}) (does tokenizer.json belong to this "
                "checkpoint?)"
            )
    return encoded


def check_cuda_graph(cuda_graph: bool | None, device: torch.device) -> None:
    """cuda_graph=True asks for CUDA graph capture, which only a model on a CUDA device has."""
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise ValueError(f"cuda_graph: expected True, False or None, got {cuda_graph!r}")
    if cuda_graph and device.type != "cuda":
        raise ValueError(
            f"cuda_graph=True: CUDA graphs need a model on a CUDA device, this one is on {device}"
        )
