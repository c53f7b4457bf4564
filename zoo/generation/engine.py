"""The one generation engine: prefill, then decode steps over a static KV cache, for every model
that keeps the contract of zoo.models.contract (decoder-only and encoder-decoder alike).

A decode step (all layers, token choice, stopping bookkeeping) only touches preallocated device
buffers, so on the GPU it is captured once in a CUDA graph and replayed per token; the host looks at
the device only every few steps to see whether every row has finished. The eager path (CPU, or
`cuda_graph=False`) runs the very same step function.

The engine belongs to one model (`model.engine`) and owns what generations share: the decode
runner (cache, buffers, graph) kept for the next call of the same shape, the text stream still
open on those buffers, and the lock that serializes generations of this model across threads.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from zoo.generation.config import GenerationConfig
from zoo.generation.inputs import Prompt, check_cuda_graph, read_prompt
from zoo.generation.logits import choice_key, choose_tokens

if TYPE_CHECKING:
    from zoo.generation.text import TextStream
    from zoo.models.contract import GenerativeLM, Prefill

# The host checks for "all rows finished" every this many steps (one sync each time); the extra
# steps a batch may run are trimmed from the output.
STOP_CHECK_INTERVAL = 8
# Decode runners are kept per (batch size, cache length rounded up to this).
CACHE_LENGTH_BUCKET = 256
# generate's max_new_tokens when neither the call nor the config sets it
DEFAULT_MAX_NEW_TOKENS = 32


@dataclass
class DecodeBuffers:
    """The static device buffers one decode step reads and writes."""

    tokens: torch.Tensor  # [B, 1] the token fed to the next step
    positions: torch.Tensor  # [B, 1]
    finished: torch.Tensor  # [B] bool
    out: torch.Tensor  # [B, max_new_tokens] generated tokens
    step: torch.Tensor  # [1] int64: column of `out` the next step writes
    eos: torch.Tensor  # [E] eos ids
    pad_token_id: int
    seen: torch.Tensor | None = None  # [B, V] bool: tokens so far (repetition penalty only)


@dataclass
class Generation:
    """One generation under way: `buffers` yields the decode buffers every few steps and at the
    end (see GenerationEngine.decode); eos and pad ids as resolved for it."""

    buffers: Iterator[DecodeBuffers]
    eos: tuple[int, ...]
    pad_token_id: int


class DecodeRunner:
    """A KV cache, the decode buffers, and (on CUDA) the decode step captured as a graph."""

    def __init__(
        self,
        model: GenerativeLM,
        batch: int,
        cache_length: int,
        encoder_length: int,
        max_new_tokens: int,
        cuda_graph: bool,
        eos: tuple[int, ...],
        pad_token_id: int,
        config: GenerationConfig,
    ) -> None:
        device = model.device
        self.model = model
        self.config = config
        # a private generator: `seed` reproduces a run without touching torch's global RNG
        self.generator = torch.Generator(device=device)
        self.cache = model.generation_cache(batch, cache_length, encoder_length)
        self.buffers = DecodeBuffers(
            tokens=torch.zeros(batch, 1, dtype=torch.int64, device=device),
            positions=torch.zeros(batch, 1, dtype=torch.int64, device=device),
            finished=torch.zeros(batch, dtype=torch.bool, device=device),
            out=torch.zeros(batch, max_new_tokens, dtype=torch.int64, device=device),
            step=torch.zeros(1, dtype=torch.int64, device=device),
            eos=torch.tensor(eos, dtype=torch.int64, device=device),
            pad_token_id=pad_token_id,
            seen=(
                torch.zeros(batch, model.config.vocab_size, dtype=torch.bool, device=device)
                if config.repetition_penalty != 1.0
                else None
            ),
        )
        self.use_graph = cuda_graph
        self.graph: torch.cuda.CUDAGraph | None = None

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        return choose_tokens(logits, self.config, self.buffers.seen, self.generator)

    def record(self, chosen: torch.Tensor) -> None:
        """Write the chosen tokens into the output column `step` (pad for finished rows)."""
        b = self.buffers
        if b.seen is not None:
            # before padding: pad_token_id need not be a vocabulary index (a finished row's `seen`
            # no longer matters), the model's choice always is
            b.seen.scatter_(1, chosen[:, None], True)
        chosen = torch.where(b.finished, b.pad_token_id, chosen)
        # a broadcast compare, not torch.isin: isin syncs with the host for long EOS lists, which
        # a CUDA graph capture refuses
        b.finished |= (chosen[:, None] == b.eos).any(-1)
        b.out.index_copy_(1, b.step, chosen[:, None])
        b.tokens.copy_(chosen[:, None])
        b.step.add_(1)

    def _eager_step(self) -> None:
        b = self.buffers
        self.record(self.choose(self.model.decode_step(b.tokens, b.positions, self.cache)))
        b.positions.add_(1)

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
        # decode buffers above, so every replay advances the same cache and outputs.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.generator)  # replays draw fresh random numbers
        mode = self.model.graph_capture_mode
        with (
            torch.cuda.stream(stream),
            torch.cuda.graph(graph, stream=stream, capture_error_mode=mode),
        ):
            self._eager_step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = graph


def tensor_bytes(obj) -> int:
    """Bytes of the tensors among obj's attributes and in its lists (a cache)."""
    values = [t for v in vars(obj).values() for t in (v if isinstance(v, list) else [v])]
    return sum(t.numel() * t.element_size() for t in values if torch.is_tensor(t))


def memory_budget(device: torch.device) -> int:
    """Bytes a generation may allocate on device: CUDA's free memory plus what torch's allocator
    holds unused; on the CPU the physical memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # the nested statistics as torch's allocator returns them: memory_reserved() and
        # memory_allocated() each flatten all of them in Python, on the way to every first token
        stats = torch.cuda.memory_stats_as_nested_dict(device)
        if not stats:  # no allocation on this device yet
            return free
        reserved = stats["reserved_bytes"]["all"]["current"]
        return free + reserved - stats["allocated_bytes"]["all"]["current"]
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 64 * 2**30


class GenerationEngine:
    """Generation for one model (`model.engine`): checks a call's arguments before any kernel
    runs, bounds its memory, prefills, decodes, and keeps the decode runner for the next call.

    Thread safety: `lock` (re-entrant) is held for a whole generate call and for each step of a
    text stream, so generations of one model from several threads run one after the other. A
    stream left open shares the decode buffers: a new generation ends it (reset() does too)."""

    def __init__(self, model: GenerativeLM) -> None:
        self._model = weakref.ref(model)  # the model holds the engine
        self.lock = threading.RLock()
        self._runner: DecodeRunner | None = None
        self._runner_key: tuple | None = None
        self._open_stream: weakref.ref | None = None
        self._slot_bytes: tuple[int, int, int] | None = None

    @property
    def model(self) -> GenerativeLM:
        return self._model()

    def __reduce__(self):
        # a copied or pickled model gets a fresh engine of its own (runners, streams and locks
        # belong to one process and one model)
        return GenerationEngine, (self.model,)

    @property
    def kept_runner(self) -> DecodeRunner | None:
        """The runner kept for the next call (None after reset)."""
        return self._runner

    def reset(self) -> None:
        """End the open stream, if any, free the kept runner (cache, buffers, CUDA graph) and
        drop the model's captured plain-call and prefill graphs (zoo.graphs)."""
        with self.lock:
            self.end_open_stream()
            self._runner = self._runner_key = None
            from zoo.graphs import graph_pool  # zoo.graphs imports this package's input checks

            graph_pool(self.model).clear()

    # ------------------------------------------------------------------ open stream

    def open_stream(self, stream: TextStream) -> None:
        self._open_stream = weakref.ref(stream)

    def close_stream(self, stream: TextStream) -> None:
        if self._open_stream is not None and self._open_stream() is stream:
            self._open_stream = None

    def end_open_stream(self) -> None:
        """End the stream still open, if any: it shares the decode buffers."""
        stream = self._open_stream() if self._open_stream is not None else None
        self._open_stream = None
        if stream is not None:
            stream.close()

    # ------------------------------------------------------------------ one generation

    def start(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        config: GenerationConfig,
        cuda_graph: bool | None,
        check_every: int = STOP_CHECK_INTERVAL,
    ) -> tuple[torch.Tensor, Generation | None]:
        """Check everything now (before any kernel runs); returns the decoder-side ids the new
        tokens follow [B, P] (decoders: the prompt; T5: the start token) and the generation,
        whose `buffers` prefills on its first step. None when max_new_tokens is 0."""
        model = self.model
        max_new_tokens = config.max_new_tokens
        if max_new_tokens is None:
            max_new_tokens = DEFAULT_MAX_NEW_TOKENS
        prompt = read_prompt(
            input_ids, attention_mask, model.padding_side, model.config.vocab_size, model.device
        )
        batch, seq = input_ids.shape
        model.check_length(seq, max_new_tokens)
        prefix = model.decoder_prefix(input_ids, config)
        check_cuda_graph(cuda_graph, model.device)
        if max_new_tokens == 0:
            self.end_open_stream()
            return prefix, None
        eos, pad_token_id = self.stop_ids(config)
        length = self.cache_length(prefix.shape[1] + max_new_tokens)
        encoder_length = model.encoder_length(seq)
        self.check_memory(batch, length, encoder_length, max_new_tokens, config)
        self.end_open_stream()
        if cuda_graph is None:
            cuda_graph = model.device.type == "cuda" and model.cuda_graph
        key = (batch, length, encoder_length, cuda_graph, eos, pad_token_id, choice_key(config))

        def buffers() -> Iterator[DecodeBuffers]:
            runner = self.runner(key, max_new_tokens, config)
            prefill = self.prefill(runner, prompt, prefix)
            yield from self.decode(
                runner, prefill, max_new_tokens, prefix.long(), config.seed, check_every
            )

        return prefix, Generation(buffers(), eos, pad_token_id)

    def stop_ids(self, config: GenerationConfig) -> tuple[tuple[int, ...], int]:
        """EOS ids (config, else config.json) and the pad id (config, else config.json, else the
        first EOS id, as HF does)."""
        model_config = self.model.config
        eos = config.eos_ids
        if eos is None:
            eos = GenerationConfig(eos_token_id=model_config.eos_token_id).eos_ids or ()
        pad = config.pad_token_id
        if pad is None:
            pad = model_config.pad_token_id
        if pad is None:
            pad = eos[0] if eos else 0
        return eos, int(pad)

    def cache_length(self, needed: int) -> int:
        """Decoder cache slots for a call that needs `needed` (decoder prefix + new tokens),
        rounded up to a bucket so runners are reused (at most the model's max_length unless the
        call needs more)."""
        model = self.model
        bucket = -(-needed // CACHE_LENGTH_BUCKET) * CACHE_LENGTH_BUCKET
        return min(bucket, max(model.max_length, needed))

    def check_memory(
        self,
        batch: int,
        length: int,
        encoder_length: int,
        max_new_tokens: int,
        config: GenerationConfig,
    ) -> None:
        """Refuse, before allocating, a generation whose cache and decode buffers would not fit
        the device."""
        per_row, per_slot, per_encoder_slot = self.slot_bytes()
        vocab = self.model.config.vocab_size
        needed = batch * (
            per_row
            + per_slot * length
            + per_encoder_slot * encoder_length
            + 8 * max_new_tokens  # out
            + 4 * 4 * vocab  # logits and the token choice's temporaries (fp32)
            + (vocab if config.repetition_penalty != 1.0 else 0)
        )
        budget = memory_budget(self.model.device)
        if self._runner is not None:  # freed before the new runner is made
            budget += tensor_bytes(self._runner.cache)
        budget = self.model.shared_value(budget, "min")  # every rank refuses alike
        if needed > budget:
            raise ValueError(
                f"max_new_tokens={max_new_tokens}: a batch of {batch} rows x {length} cache "
                f"slots needs {needed / 2**30:.2f} GiB for the KV cache and decode buffers, more "
                f"than the {budget / 2**30:.2f} GiB available on {self.model.device}"
            )

    def slot_bytes(self) -> tuple[int, int, int]:
        """Cache bytes per row: fixed, per decoder slot, per encoder slot (measured once on
        caches of one and two slots)."""
        if self._slot_bytes is None:
            model = self.model
            base = tensor_bytes(model.generation_cache(1, 1, 1))
            per_slot = tensor_bytes(model.generation_cache(1, 2, 1)) - base
            per_encoder_slot = tensor_bytes(model.generation_cache(1, 1, 2)) - base
            self._slot_bytes = (base - per_slot - per_encoder_slot, per_slot, per_encoder_slot)
        return self._slot_bytes

    def runner(self, key: tuple, max_new_tokens: int, config: GenerationConfig) -> DecodeRunner:
        """The kept runner when key matches and its buffers are long enough, else a new one (one
        runner at a time: caches can be large). The EOS and pad ids and the token choice are
        baked into a captured step, so they are part of the key."""
        runner = self._runner
        if self._runner_key != key or runner.buffers.out.shape[1] < max_new_tokens:
            self._runner = self._runner_key = runner = None  # free the old cache first
            batch, length, encoder_length, cuda_graph, eos, pad_token_id, _ = key
            runner = DecodeRunner(
                self.model,
                batch,
                length,
                encoder_length,
                max_new_tokens,
                cuda_graph,
                eos,
                pad_token_id,
                config,
            )
            self._runner, self._runner_key = runner, key
        return runner

    def prefill(self, runner: DecodeRunner, prompt: Prompt, prefix: torch.Tensor) -> Prefill:
        """The prompt into the runner's cache: the one place a prefill runs (replayed from the
        model's graph pool, zoo.graphs, when the runner uses CUDA graphs)."""
        return self.model.prefill(prompt, prefix, runner.cache, runner.use_graph)

    def decode(
        self,
        runner: DecodeRunner,
        prefill: Prefill,
        max_new_tokens: int,
        seen_ids: torch.Tensor,
        seed: int | None,
        check_every: int = STOP_CHECK_INTERVAL,
    ) -> Iterator[DecodeBuffers]:
        """Decode up to max_new_tokens tokens after a prefill. prefill.logits [B, V]: the first
        token is chosen from them; None: the first token is itself a decode step of
        prefill.tokens (T5's decoder start token), so it runs in the CUDA graph too. seen_ids
        [B, P]: the tokens the repetition penalty counts as seen (pads included, as in HF).

        A generator: yields the buffers every check_every steps (the caller may mark rows
        finished before the loop looks at them: stop strings) and once more at the end, when
        generated_tokens(buffers) holds the new tokens."""
        b = runner.buffers
        b.finished.zero_()
        b.step.zero_()
        b.out.fill_(b.pad_token_id)
        if b.seen is not None:
            b.seen.zero_()
            b.seen.scatter_(1, seen_ids, True)
        if seed is None:
            # follows torch.manual_seed
            seed = self.model.shared_value(int(torch.randint(0, 2**62, (1,)).item()))
        runner.generator.manual_seed(seed)
        b.positions.copy_(prefill.positions)
        if prefill.logits is None:
            b.tokens.copy_(prefill.tokens)
            runner.step()
        else:
            runner.record(runner.choose(prefill.logits))
        for step in range(1, max_new_tokens):
            if step % check_every == 0:
                yield b
                if bool(b.finished.all()):
                    break
            runner.step()
        yield b


def generated_tokens(buffers: DecodeBuffers) -> torch.Tensor:
    """The tokens [B, n] a finished decode wrote, without the columns after the step at which
    every row had emitted an EOS."""
    generated = buffers.out[:, : int(buffers.step.item())]
    if buffers.eos.numel() == 0:
        return generated
    hit = torch.isin(generated, buffers.eos)
    if not bool(hit.any(dim=1).all()):
        return generated
    first = hit.int().argmax(dim=1)  # first EOS column of each row
    return generated[:, : int(first.max().item()) + 1]
