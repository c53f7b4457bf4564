"""Input checks of every family (token ids, attention masks, padding on either side, text prompts),
written once.

Type, shape, dtype and device checks always run. Checks that read values (ids in the vocabulary,
mask values and layout) sync with the host, so they are skipped while torch.compile traces
(`torch.compiler.is_compiling()`); padding, positions and lengths are tensor ops either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

PaddingSide = Literal["left", "right"]


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def check_input_ids(
    input_ids: torch.Tensor, vocab_size: int, device: torch.device, name: str = "input_ids"
) -> None:
    """Reject ids the kernels must never see: wrong type, shape, device, or outside the vocab.
    `name` is the argument named in the message (e.g. decoder_input_ids)."""
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
    if _tracing():
        return
    low, high = input_ids.min().item(), input_ids.max().item()
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab_size})")


def check_attention_mask(attention_mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The mask as int64 0/1 [B, T], after rejecting what would silently mean something else: not
    a tensor, a floating-point mask (an additive -inf mask, or 0.5 that a cast turns into 0),
    another shape or device than input_ids, values other than 0 and 1."""
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"attention_mask: expected a torch.Tensor, got {type(attention_mask).__name__}"
        )
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise ValueError(
            f"attention_mask: expected an integer or bool tensor of 0 and 1, got {attention_mask.dtype}"
        )
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask: shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}"
        )
    if attention_mask.device != input_ids.device:
        raise ValueError(
            f"attention_mask: on {attention_mask.device}, input_ids on {input_ids.device}"
        )
    mask = attention_mask.to(torch.int64)
    if not _tracing() and ((mask != 0) & (mask != 1)).any():
        raise ValueError("attention_mask: values must be 0 or 1")
    return mask


def left_padding(
    attention_mask: torch.Tensor | None, input_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [B, T] (int64) and first real slot [B] (int32) of a left-padded batch."""
    batch, seq = input_ids.shape
    if attention_mask is None:
        positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        return positions, torch.zeros(batch, dtype=torch.int32, device=input_ids.device)
    mask = check_attention_mask(attention_mask, input_ids)
    if not _tracing():
        if (mask[:, 1:] < mask[:, :-1]).any():
            raise ValueError(
                "attention_mask: decoder-only batches must be left-padded (each row: zeros, then ones)"
            )
        if (mask[:, -1] == 0).any():
            raise ValueError("attention_mask: a row has no real token")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kv_start = (mask == 0).sum(-1).to(torch.int32)
    return positions, kv_start


def right_padding_lengths(
    attention_mask: torch.Tensor | None, input_ids: torch.Tensor, batches: str
) -> torch.Tensor | None:
    """Real tokens per row [B] (int32) of a right-padded batch (each mask row: ones, then zeros;
    at least one token), or None without a mask. `batches` names them in the message (e.g.
    "Bert batches", "T5 encoder batches")."""
    if attention_mask is None:
        return None
    mask = check_attention_mask(attention_mask, input_ids)
    if not _tracing():
        if (mask[:, 1:] > mask[:, :-1]).any():
            raise ValueError(
                f"attention_mask: {batches} must be right-padded (each row: ones, then zeros)"
            )
        if (mask[:, 0] == 0).any():
            raise ValueError("attention_mask: a row has no real token")
    return mask.sum(-1).to(torch.int32)


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
    check_input_ids(input_ids, vocab_size, device)
    if side == "left":
        positions, kv_start = left_padding(attention_mask, input_ids)
        return Prompt(input_ids, positions=positions, kv_start=kv_start)
    lengths = right_padding_lengths(attention_mask, input_ids, "encoder batches")
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
