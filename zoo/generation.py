"""The one generation loop: prefill, then decode steps over a static KV cache.

A decode step (all layers, token choice, stopping bookkeeping) only touches preallocated device
buffers, so on the GPU it is captured once in a CUDA graph and replayed per token; the host looks at
the device only every few steps to see whether every row has finished. The eager path (CPU, or
`cuda_graph=False`) runs the very same step function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# The host checks for "all rows finished" every this many steps (one sync each time); the extra
# steps a batch may run are trimmed from the output.
STOP_CHECK_INTERVAL = 8
# Decode graphs are kept per (batch size, cache length rounded up to this).
CACHE_LENGTH_BUCKET = 256


def check_input_ids(input_ids: torch.Tensor, vocab_size: int, device: torch.device) -> None:
    """Reject ids the kernels must never see: wrong type, shape, device, or outside the vocab."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids: expected a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids: expected int64 or int32 token ids, got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected shape [batch, seq], got {tuple(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids: empty input of shape {tuple(input_ids.shape)}")
    if input_ids.device != device:
        raise ValueError(f"input_ids: on {input_ids.device}, but the model is on {device}")
    low, high = input_ids.min().item(), input_ids.max().item()
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"input_ids: token id {bad} is outside the vocabulary [0, {vocab_size})")


def left_padding(
    attention_mask: torch.Tensor | None, input_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [B, T] (int64) and first real slot [B] (int32) of a left-padded batch."""
    batch, seq = input_ids.shape
    if attention_mask is None:
        positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        return positions, torch.zeros(batch, dtype=torch.int32, device=input_ids.device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask: shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}"
        )
    if attention_mask.device != input_ids.device:
        raise ValueError(
            f"attention_mask: on {attention_mask.device}, input_ids on {input_ids.device}"
        )
    mask = attention_mask.to(torch.int64)
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("attention_mask: values must be 0 or 1")
    if (mask[:, 1:] < mask[:, :-1]).any():
        raise ValueError(
            "attention_mask: decoder-only batches must be left-padded (each row: zeros, then ones)"
        )
    if (mask[:, -1] == 0).any():
        raise ValueError("attention_mask: a row has no real token")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kv_start = (mask == 0).sum(-1).to(torch.int32)
    return positions, kv_start


def eos_list(eos_token_id: int | list[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(e) for e in eos_token_id]


@dataclass
class DecodeState:
    """The static device buffers one decode step reads and writes."""

    tokens: torch.Tensor  # [B, 1] the token fed to the next step
    positions: torch.Tensor  # [B, 1]
    finished: torch.Tensor  # [B] bool
    out: torch.Tensor  # [B, max_new_tokens] generated tokens
    step: torch.Tensor  # [1] int64: column of `out` the next step writes
    eos: torch.Tensor  # [E] eos ids
    pad_token_id: int


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def _record(state: DecodeState, chosen: torch.Tensor) -> None:
    """Write the chosen tokens into the output column `step` (pad for rows already finished)."""
    chosen = torch.where(state.finished, state.pad_token_id, chosen)
    state.finished |= torch.isin(chosen, state.eos)
    state.out.index_copy_(1, state.step, chosen[:, None])
    state.tokens.copy_(chosen[:, None])
    state.step.add_(1)


class DecoderOnlyLM(nn.Module):
    """Shared `forward` and `generate` of the decoder-only families (GPT-2, Llama 3, Granite).

    A subclass provides `config` (vocab_size, eos/pad ids), `max_length`, `new_cache(batch, length)`
    and `forward_cached(input_ids, positions, cache, last_only)`.
    """

    tokenizer = None
    generation_config: dict = {}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, T, vocab] of a (left-padded) batch of token ids [B, T]."""
        check_input_ids(input_ids, self.config.vocab_size, self.device)
        positions, kv_start = left_padding(attention_mask, input_ids)
        batch, seq = input_ids.shape
        self._check_length(seq)
        cache = self.new_cache(batch, seq)
        cache.reset(kv_start)
        with torch.inference_mode():
            return self.forward_cached(input_ids, positions, cache)

    def _check_length(self, total: int) -> None:
        if total > self.max_length:
            raise ValueError(
                f"prompt length plus max_new_tokens is {total}, beyond the model's context of "
                f"{self.max_length} tokens (max_position_embeddings)"
            )

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor | str | list[str],
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        cuda_graph: bool | None = None,
    ) -> torch.Tensor | str | list[str]:
        """Greedy continuation of a left-padded batch: returns [B, T + new] token ids.

        Each row stops at any of the EOS ids (default: generation_config.json, else config.json);
        rows that finished early are padded with pad_token_id (default: the first EOS id), and
        generation ends when every row has finished or after max_new_tokens. On CUDA the decode
        step is replayed from a CUDA graph unless cuda_graph=False. A str (or list of str) prompt
        is encoded with the checkpoint's tokenizer and the new text is returned (str or list).
        """
        if isinstance(input_ids, str | list):
            return self._generate_text(
                input_ids,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                cuda_graph=cuda_graph,
            )
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
        check_input_ids(input_ids, self.config.vocab_size, self.device)
        positions, kv_start = left_padding(attention_mask, input_ids)
        batch, seq = input_ids.shape
        self._check_length(seq + max_new_tokens)
        if max_new_tokens == 0:
            return input_ids.clone()
        eos, pad_token_id = stop_ids(self, eos_token_id, pad_token_id)
        runner = decode_runner(
            self, batch, seq + max_new_tokens, max_new_tokens, cuda_graph, eos, pad_token_id
        )
        runner.cache.reset(kv_start)
        first_logits = self.forward_cached(input_ids, positions, runner.cache, last_only=True)
        generated = decode(runner, first_logits[:, -1], positions[:, -1:] + 1, max_new_tokens)
        return torch.cat([input_ids, generated.to(input_ids.dtype)], dim=1)

    def _generate_text(self, prompts: str | list[str], **kwargs) -> str | list[str]:
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer (tokenizer.json beside the checkpoint)")
        texts = [prompts] if isinstance(prompts, str) else prompts
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("prompt: expected a str or a non-empty list of str")
        encoded = [self.tokenizer.encode(t).ids for t in texts]
        if not all(encoded):
            raise ValueError("prompt: a prompt encodes to no tokens")
        longest = max(len(e) for e in encoded)
        ids = torch.zeros(len(texts), longest, dtype=torch.int64)
        mask = torch.zeros(len(texts), longest, dtype=torch.int64)
        for row, tokens in enumerate(encoded):  # left padding
            ids[row, longest - len(tokens) :] = torch.tensor(tokens)
            mask[row, longest - len(tokens) :] = 1
        out = self.generate(ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        new = out[:, longest:].tolist()
        decoded = self.tokenizer.decode_batch(new, skip_special_tokens=True)
        return decoded[0] if isinstance(prompts, str) else decoded


def stop_ids(model, eos_token_id, pad_token_id) -> tuple[tuple[int, ...], int]:
    """EOS ids (argument, else generation_config.json, else config.json) and the pad id (argument,
    else those files, else the first EOS id, as HF does)."""
    if eos_token_id is None:
        eos_token_id = model.generation_config.get("eos_token_id", model.config.eos_token_id)
    eos = tuple(eos_list(eos_token_id))
    if pad_token_id is None:
        pad_token_id = model.generation_config.get("pad_token_id", model.config.pad_token_id)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    return eos, int(pad_token_id)


def decode_runner(
    model, batch: int, length: int, max_new_tokens: int, cuda_graph: bool | None, eos, pad_token_id
) -> DecodeRunner:
    """A runner (cache + captured step) for this batch size and cache-length bucket, kept on the
    model and reused across calls; the EOS and pad ids are baked into the captured step, so they
    are part of the key. cuda_graph=None means: on CUDA devices."""
    if cuda_graph is None:
        cuda_graph = model.device.type == "cuda"
    bucket = -(-length // CACHE_LENGTH_BUCKET) * CACHE_LENGTH_BUCKET
    bucket = min(bucket, max(model.max_length, length))
    key = (batch, bucket, cuda_graph, eos, pad_token_id)
    runners = model.__dict__.setdefault("_decode_runners", {})
    runner = runners.get(key)
    if runner is None or runner.state.out.shape[1] < max_new_tokens:
        runners.clear()  # one cached runner at a time: caches can be large
        runner = DecodeRunner(model, batch, bucket, max_new_tokens, cuda_graph, eos, pad_token_id)
        runners[key] = runner
    return runner


def decode(
    runner: DecodeRunner,
    first_logits: torch.Tensor,
    next_positions: torch.Tensor,
    max_new_tokens: int,
) -> torch.Tensor:
    """Greedy tokens [B, n <= max_new_tokens] after a prefill whose last logits are first_logits
    [B, V]; the runner's cache holds the prompt. next_positions [B, 1]: the first decode position.
    """
    state = runner.state
    state.finished.zero_()
    state.step.zero_()
    state.out.fill_(state.pad_token_id)
    _record(state, runner.select(first_logits))
    state.positions.copy_(next_positions)
    for step in range(1, max_new_tokens):
        if step % STOP_CHECK_INTERVAL == 0 and bool(state.finished.all()):
            break
        runner.step()
    generated = state.out[:, : int(state.step.item())]
    # trim the columns after the step at which every row had finished
    all_done_at = _first_all_finished(generated, state.eos)
    if all_done_at is not None:
        generated = generated[:, :all_done_at]
    return generated


def _first_all_finished(generated: torch.Tensor, eos: torch.Tensor) -> int | None:
    """Number of columns up to and including the step where the last row emitted an EOS."""
    if eos.numel() == 0:
        return None
    hit = torch.isin(generated, eos)
    if not bool(hit.any(dim=1).all()):
        return None
    first = hit.int().argmax(dim=1)  # first EOS column of each row
    return int(first.max().item()) + 1


class DecodeRunner:
    """A KV cache, the decode-step buffers, and (on CUDA) the step captured as a graph."""

    def __init__(
        self,
        model: DecoderOnlyLM,
        batch: int,
        cache_length: int,
        max_new_tokens: int,
        cuda_graph: bool,
        eos: tuple[int, ...],
        pad_token_id: int,
        select: Callable[[torch.Tensor], torch.Tensor] = greedy,
    ) -> None:
        device = model.device
        self.model = model
        self.select = select
        self.cache = model.new_cache(batch, cache_length)
        self.state = DecodeState(
            tokens=torch.zeros(batch, 1, dtype=torch.int64, device=device),
            positions=torch.zeros(batch, 1, dtype=torch.int64, device=device),
            finished=torch.zeros(batch, dtype=torch.bool, device=device),
            out=torch.zeros(batch, max_new_tokens, dtype=torch.int64, device=device),
            step=torch.zeros(1, dtype=torch.int64, device=device),
            eos=torch.tensor(eos, dtype=torch.int64, device=device),
            pad_token_id=pad_token_id,
        )
        self.use_graph = cuda_graph
        self.graph: torch.cuda.CUDAGraph | None = None

    def _eager_step(self) -> None:
        s = self.state
        logits = self.model.forward_cached(s.tokens, s.positions, self.cache, last_only=True)
        _record(s, self.select(logits[:, -1]))
        s.positions.add_(1)

    def step(self) -> None:
        if not self.use_graph:
            self._eager_step()
            return
        if self.graph is None:
            # The first step runs eagerly: it compiles (and autotunes) every kernel at these
            # shapes, which must not happen during capture. Then the step is captured.
            self._eager_step()
            self._capture()
            return
        self.graph.replay()

    def _capture(self) -> None:
        # Capture records the step without running it; the buffers it reads and writes are the
        # state tensors above, so every replay advances the same cache and outputs.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            self._eager_step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = graph
