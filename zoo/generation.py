"""The one generation loop: prefill, then decode steps over a static KV cache.

A decode step (all layers, token choice, stopping bookkeeping) only touches preallocated device
buffers, so on the GPU it is captured once in a CUDA graph and replayed per token; the host looks at
the device only every few steps to see whether every row has finished. The eager path (CPU, or
`cuda_graph=False`) runs the very same step function.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

# The host checks for "all rows finished" every this many steps (one sync each time); the extra
# steps a batch may run are trimmed from the output.
STOP_CHECK_INTERVAL = 8
# model.chat's default reply length (less where the context ends sooner).
CHAT_MAX_NEW_TOKENS = 512
# Decode graphs are kept per (batch size, cache length rounded up to this).
CACHE_LENGTH_BUCKET = 256


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
    if ((mask != 0) & (mask != 1)).any():
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
    if (mask[:, 1:] < mask[:, :-1]).any():
        raise ValueError(
            "attention_mask: decoder-only batches must be left-padded (each row: zeros, then ones)"
        )
    if (mask[:, -1] == 0).any():
        raise ValueError("attention_mask: a row has no real token")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kv_start = (mask == 0).sum(-1).to(torch.int32)
    return positions, kv_start


def check_cuda_graph(cuda_graph: bool | None, device: torch.device) -> None:
    """cuda_graph=True asks for CUDA graph capture, which only a model on a CUDA device has."""
    if cuda_graph and device.type != "cuda":
        raise ValueError(
            f"cuda_graph=True: CUDA graphs need a model on a CUDA device, this one is on {device}"
        )


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
    seen: torch.Tensor | None = None  # [B, V] bool: tokens so far (repetition penalty only)


@dataclass(frozen=True)
class SamplingParams:
    """Token choice, with HF `generate`'s meaning of each keyword. The processors run in HF's order:
    repetition penalty, then (when sampling) temperature, top-k, top-p."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, int | float) or self.temperature < 0:
            raise ValueError(f"temperature: expected a number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k: expected an int >= 0 (0 disables it), got {self.top_k!r}")
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        if not isinstance(self.repetition_penalty, int | float) or self.repetition_penalty <= 0:
            raise ValueError(
                f"repetition_penalty: expected a number > 0, got {self.repetition_penalty!r}"
            )

    @property
    def samples(self) -> bool:
        return self.do_sample and self.temperature > 0


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float):
    """HF RepetitionPenaltyLogitsProcessor: seen tokens' scores are divided by the penalty when
    positive and multiplied by it when negative."""
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


def top_k_filter(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """HF TopKLogitsWarper: keep the scores >= the k-th largest (ties at the boundary kept)."""
    top_k = min(top_k, scores.shape[-1])
    kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """HF TopPLogitsWarper: drop the least likely tokens whose total probability is <= 1 - top_p,
    always keeping the most likely one."""
    sorted_scores, sorted_index = torch.sort(scores, descending=False, dim=-1)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, sorted_index, remove_sorted)
    return scores.masked_fill(remove, float("-inf"))


def choose_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next tokens [B] from logits [B, V]: greedy, or a sample from the filtered distribution."""
    scores = logits.float()
    if params.repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, seen, params.repetition_penalty)
    if not params.samples:
        return scores.argmax(dim=-1)
    if params.temperature != 1.0:
        scores = scores / params.temperature
    if params.top_k > 0:
        scores = top_k_filter(scores, params.top_k)
    if params.top_p < 1.0:
        scores = top_p_filter(scores, params.top_p)
    probs = scores.softmax(dim=-1)
    # argmax(p / E) with E ~ Exp(1) draws from p exactly, without multinomial's host sync
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1)


def _record(state: DecodeState, chosen: torch.Tensor) -> None:
    """Write the chosen tokens into the output column `step` (pad for rows already finished)."""
    if state.seen is not None:
        # before padding: pad_token_id need not be a vocabulary index (a finished row's `seen`
        # no longer matters), the model's choice always is
        state.seen.scatter_(1, chosen[:, None], True)
    chosen = torch.where(state.finished, state.pad_token_id, chosen)
    # a broadcast compare, not torch.isin: isin syncs with the host for long EOS lists, which a
    # CUDA graph capture refuses
    state.finished |= (chosen[:, None] == state.eos).any(-1)
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
        if seq > self.max_length:
            raise ValueError(
                f"input_ids: {seq} tokens exceed the model's context of {self.max_length} tokens"
            )
        cache = self.new_cache(batch, seq)
        cache.reset(kv_start)
        with torch.inference_mode(not torch.compiler.is_compiling()):
            return self.forward_cached(input_ids, positions, cache)

    def _check_length(self, prompt: int, max_new_tokens: int) -> None:
        if prompt + max_new_tokens > self.max_length:
            raise ValueError(
                f"prompt length {prompt} plus max_new_tokens {max_new_tokens} is "
                f"{prompt + max_new_tokens}, beyond the model's context of {self.max_length} tokens"
            )

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor | str | list[str],
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        stop: str | list[str] | None = None,
        stream: bool = False,
        cuda_graph: bool | None = None,
    ) -> torch.Tensor | str | list[str] | TextStream:
        """Continue a left-padded batch of token ids [B, T]: returns [B, T + new] token ids.

        Greedy unless do_sample=True (then temperature, top_k, top_p as in HF; seed makes a run
        reproducible on the same device); repetition_penalty as HF's. Each row stops at any of the
        EOS ids (default: generation_config.json, else config.json); rows that finished early are
        padded with pad_token_id (default: the first EOS id), and generation ends when every row
        has finished or after max_new_tokens. On CUDA the decode step is replayed from a CUDA
        graph unless cuda_graph=False.

        A str (or list of str) prompt is encoded with the checkpoint's tokenizer (its special
        tokens added, e.g. Llama 3's BOS) and the new text is returned (str or list), cut before
        the row's EOS, special tokens left out. stop: strings that end a row; the text ends just
        before the first one (with token ids, the row keeps the tokens up to the one completing
        the stop string, then pads, as HF's stop_strings). stream=True (one str prompt) returns a
        TextStream: iterate it for the text pieces as they are produced (never half a UTF-8
        character); joined, they equal the text stream=False returns.
        """
        options = dict(
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            cuda_graph=cuda_graph,
        )
        stops = stop_strings(stop)
        if isinstance(input_ids, str | list):
            if attention_mask is not None:
                raise ValueError(
                    "attention_mask: only with token ids (text prompts are padded here)"
                )
            encoded = self._encode_prompts(input_ids)
            return self._generate_text(
                encoded, isinstance(input_ids, str), max_new_tokens, stops, stream, options
            )
        if stream:
            raise ValueError("stream=True streams text: pass a str prompt, not token ids")
        run = self._decode_states(input_ids, attention_mask, max_new_tokens, **options)
        if run is None:  # max_new_tokens == 0
            return input_ids.clone()
        generated = run_tokens(self, run, len(input_ids), stops)
        return torch.cat([input_ids, generated.to(input_ids.dtype)], dim=1)

    @torch.inference_mode()
    def chat(
        self,
        messages: list[dict] | str,
        max_new_tokens: int | None = None,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        stop: str | list[str] | None = None,
        stream: bool = False,
        cuda_graph: bool | None = None,
        template_kwargs: dict | None = None,
    ) -> str | TextStream:
        """The assistant's reply to a conversation ([{"role": "user", "content": ...}, ...], or a
        str for one user message), as text (or a TextStream with stream=True).

        The conversation is rendered with the checkpoint's chat template as transformers'
        apply_chat_template(..., add_generation_prompt=True) renders it (template_kwargs: extra
        template variables, e.g. tools, enable_thinking) and encoded without the tokenizer's own
        special tokens, so the template's BOS is the only one. EOS ids default to every id of
        generation_config.json (Llama 3 instruct ends turns with <|eot_id|>, not
        <|end_of_text|>) plus the tokenizer's eos_token. max_new_tokens defaults to what the
        context leaves after the prompt, at most CHAT_MAX_NEW_TOKENS. Other keywords as in
        generate.
        """
        tokenizer = require_tokenizer(self)
        if not hasattr(tokenizer, "apply_chat_template"):
            raise ValueError("chat needs a zoo.tokenizer.Tokenizer (with the chat template)")
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, **(template_kwargs or {})
        )
        if max_new_tokens is None:
            max_new_tokens = max(1, min(CHAT_MAX_NEW_TOKENS, self.max_length - len(ids)))
        if eos_token_id is None:
            eos = list(stop_ids(self, None, 0)[0])
            if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
                eos.append(tokenizer.eos_token_id)
            eos_token_id = eos
        options = dict(
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            cuda_graph=cuda_graph,
        )
        return self._generate_text([ids], True, max_new_tokens, stop_strings(stop), stream, options)

    def _encode_prompts(self, prompts: str | list[str]) -> list[list[int]]:
        texts = check_prompts(prompts)
        tokenizer = require_tokenizer(self)
        encoded = [tokenizer.encode(t).ids for t in texts]
        if not all(encoded):
            raise ValueError("prompt: a prompt encodes to no tokens")
        return encoded

    def _generate_text(
        self,
        encoded: list[list[int]],
        single: bool,
        max_new_tokens: int,
        stops: tuple[str, ...],
        stream: bool,
        options: dict,
    ) -> str | list[str] | TextStream:
        """Text (or a TextStream) of the continuations of a batch of prompts' token ids."""
        longest = max(len(e) for e in encoded)
        ids = torch.zeros(len(encoded), longest, dtype=torch.int64)
        mask = torch.zeros(len(encoded), longest, dtype=torch.int64)
        for row, tokens in enumerate(encoded):  # left padding
            ids[row, longest - len(tokens) :] = torch.tensor(tokens)
            mask[row, longest - len(tokens) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        return run_text(
            self,
            lambda check_every: self._decode_states(
                ids, mask, max_new_tokens, check_every, **options
            ),
            len(encoded),
            single,
            stops,
            stream,
        )

    def _decode_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        max_new_tokens: int,
        check_every: int = STOP_CHECK_INTERVAL,
        *,
        do_sample: bool,
        temperature: float,
        top_k: int,
        top_p: float,
        repetition_penalty: float,
        seed: int | None,
        eos_token_id: int | list[int] | None,
        pad_token_id: int | None,
        cuda_graph: bool | None,
    ) -> DecodeRun | None:
        """Check the arguments now; the returned run's `states` prefills on its first step, then
        yields the decode state every check_every steps and at the end (see decode_steps). None
        when max_new_tokens == 0."""
        sampling = SamplingParams(do_sample, temperature, top_k, top_p, repetition_penalty)
        check_max_new_tokens(max_new_tokens)
        check_input_ids(input_ids, self.config.vocab_size, self.device)
        positions, kv_start = left_padding(attention_mask, input_ids)
        batch, seq = input_ids.shape
        self._check_length(seq, max_new_tokens)
        check_cuda_graph(cuda_graph, self.device)
        TextStream.end_open(self)
        if max_new_tokens == 0:
            return None
        eos, pad_token_id = stop_ids(self, eos_token_id, pad_token_id)

        def states() -> Iterator[DecodeState]:
            runner = decode_runner(
                self,
                batch,
                seq + max_new_tokens,
                max_new_tokens,
                cuda_graph,
                eos,
                pad_token_id,
                sampling=sampling,
            )
            runner.cache.reset(kv_start)
            first_logits = self.forward_cached(input_ids, positions, runner.cache, last_only=True)
            yield from decode_steps(
                runner,
                first_logits[:, -1],
                positions[:, -1:] + 1,
                max_new_tokens,
                input_ids,
                seed,
                check_every=check_every,
            )

        return DecodeRun(states(), eos, pad_token_id)


@dataclass
class DecodeRun:
    states: Iterator[DecodeState]
    eos: tuple[int, ...]
    pad_token_id: int


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


def check_max_new_tokens(max_new_tokens) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")


def require_tokenizer(model, what: str = "text prompts"):
    if model.tokenizer is None:
        raise ValueError(f"{what} need a tokenizer (tokenizer.json beside the checkpoint)")
    return model.tokenizer


def run_tokens(model, run: DecodeRun, batch: int, stops: tuple[str, ...]) -> torch.Tensor:
    """The new tokens [B, n] of a run. With stop strings, a row that meets one keeps its ids up
    to the token completing it, then pads (as HF's stop_strings)."""
    rows = (
        TextRows(require_tokenizer(model, "stop strings"), batch, run.eos, stops) if stops else None
    )
    for state in run.states:
        if rows is not None:
            rows.update(state)
    generated = generated_tokens(state)
    if rows is not None:
        generated = rows.trim_ids(generated, run.pad_token_id)
    return generated


def run_text(
    model,
    start_run: Callable[[int], DecodeRun | None],
    batch: int,
    single: bool,
    stops: tuple[str, ...],
    stream: bool,
) -> str | list[str] | TextStream:
    """The text of a generation (a str for one prompt, else a list), or a TextStream of it.
    start_run(check_every) checks the arguments and returns the run (None: no new tokens)."""
    tokenizer = require_tokenizer(model)
    if stream:
        if not single:
            raise ValueError("stream=True takes one prompt (a str), not a list")
        # a decode step per check: every new token is looked at as soon as it exists
        return TextStream(model, tokenizer, start_run(1), stops)
    run = start_run(STOP_CHECK_INTERVAL)
    rows = TextRows(tokenizer, batch, run.eos if run else (), stops)
    if run is not None:
        for state in run.states:
            rows.update(state)
    return rows.text[0] if single else rows.text


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    """The `stop` argument as a tuple of non-empty strings."""
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop: expected a non-empty str or a list of them, got {stop!r}")
    return stops


class TextRows:
    """The text of each row's new tokens while generation runs: cut before the row's first EOS
    and before the first stop string. `update(state)` (each time decode_steps yields) decodes every unfinished row again and marks rows finished in the decode
    state when a stop string shows.

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

    def update(self, state: DecodeState) -> None:
        step = int(state.step.item())
        rows = state.out[:, :step].tolist()
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
                state.finished[row] = True
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


class TextStream:
    """Text pieces of one prompt's continuation, as the tokens are produced (`for piece in
    stream`). A piece never ends inside a UTF-8 character or inside what may become a stop
    string, so the pieces join to exactly the text generate(..., stream=False) returns.
    `tokens` holds the new token ids so far (EOS excluded); close() ends generation early."""

    def __init__(self, model: nn.Module, tokenizer, run: DecodeRun | None, stops) -> None:
        self.tokens: list[int] = []
        self._rows = TextRows(tokenizer, 1, run.eos if run else (), stops)
        self._model = model
        self._pieces = self._produce(run)
        if run is not None:  # one generation at a time: streams share the model's decode buffers
            model.__dict__["_open_stream"] = weakref.ref(self)

    def _produce(self, run: DecodeRun | None) -> Iterator[str]:
        try:
            if run is not None:
                for state in run.states:
                    self._rows.update(state)
                    self.tokens = self._rows.tokens[0]
                    if piece := self._rows.take_piece():
                        yield piece
            if piece := self._rows.take_piece(final=True):
                yield piece
        finally:
            if self._model.__dict__.get("_open_stream", lambda: None)() is self:
                del self._model.__dict__["_open_stream"]

    @staticmethod
    def end_open(model) -> None:
        """End the stream still open on model, if any: it shares the model's decode buffers, so
        a new generation ends it."""
        open_stream = model.__dict__.pop("_open_stream", lambda: None)()
        if open_stream is not None:
            open_stream.close()

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        # each step runs in inference mode; the caller's code between pieces does not
        with torch.inference_mode():
            return next(self._pieces)

    def close(self) -> None:
        """Stop generating (the rest of the text is not produced)."""
        self._pieces.close()

    @property
    def text(self) -> str:
        """The text so far (all of it once the stream is exhausted)."""
        return self._rows.text[0]


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
    model,
    batch: int,
    length: int,
    max_new_tokens: int,
    cuda_graph: bool | None,
    eos,
    pad_token_id,
    cache_kwargs: dict | None = None,
    sampling: SamplingParams = SamplingParams(),
) -> DecodeRunner:
    """A runner (cache + captured step) for this batch size and cache-length bucket, kept on the
    model and reused across calls; the EOS and pad ids are baked into the captured step, so they
    are part of the key. cuda_graph=None means: on CUDA devices. cache_kwargs: extra keyword
    arguments of model.new_cache (e.g. T5's encoder length bucket), also part of the key."""
    if cuda_graph is None:
        cuda_graph = model.device.type == "cuda"
    bucket = -(-length // CACHE_LENGTH_BUCKET) * CACHE_LENGTH_BUCKET
    bucket = min(bucket, max(model.max_length, length))
    cache_kwargs = cache_kwargs or {}
    key = (
        batch,
        bucket,
        cuda_graph,
        eos,
        pad_token_id,
        tuple(sorted(cache_kwargs.items())),
        sampling,
    )
    runners = model.__dict__.setdefault("_decode_runners", {})
    runner = runners.get(key)
    if runner is None or runner.state.out.shape[1] < max_new_tokens:
        runners.clear()  # one cached runner at a time: caches can be large
        runner = DecodeRunner(
            model,
            batch,
            bucket,
            max_new_tokens,
            cuda_graph,
            eos,
            pad_token_id,
            cache_kwargs=cache_kwargs,
            sampling=sampling,
        )
        runners[key] = runner
    return runner


def decode_steps(
    runner: DecodeRunner,
    first_logits: torch.Tensor | None,
    next_positions: torch.Tensor,
    max_new_tokens: int,
    prompt_ids: torch.Tensor | None = None,
    seed: int | None = None,
    check_every: int = STOP_CHECK_INTERVAL,
) -> Iterator[DecodeState]:
    """Decode up to max_new_tokens tokens after a prefill whose last logits are first_logits
    [B, V]; the runner's cache holds the prompt. first_logits=None: the first token is itself a
    decode step of the runner's state.tokens (set by the caller; T5's decoder start token), so
    it runs in the CUDA graph too. next_positions [B, 1]: the first decode position; prompt_ids
    [B, T]: the tokens the repetition penalty counts as seen (pads included, as in HF).

    A generator: yields the state every check_every steps (the caller may mark rows finished
    before the loop looks at them: stop strings) and once more at the end, when
    generated_tokens(state) holds the new tokens. Streaming reads the new tokens between steps
    this way, without threads."""
    if not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every: expected an int >= 1, got {check_every!r}")
    state = runner.state
    state.finished.zero_()
    state.step.zero_()
    state.out.fill_(state.pad_token_id)
    if state.seen is not None:
        state.seen.zero_()
        if prompt_ids is not None:
            state.seen.scatter_(1, prompt_ids, True)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())  # follows torch.manual_seed
    runner.generator.manual_seed(seed)
    state.positions.copy_(next_positions)
    if first_logits is None:
        runner.step()
    else:
        _record(state, runner.select(first_logits))
    for step in range(1, max_new_tokens):
        if step % check_every == 0:
            yield state
            if bool(state.finished.all()):
                break
        runner.step()
    yield state


def generated_tokens(state: DecodeState) -> torch.Tensor:
    """The tokens [B, n] a finished decode wrote, without the columns after the step at which
    every row had emitted an EOS."""
    generated = state.out[:, : int(state.step.item())]
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
        cache_kwargs: dict | None = None,
        sampling: SamplingParams = SamplingParams(),
    ) -> None:
        device = model.device
        self.model = model
        self.sampling = sampling
        # a private generator: `seed` reproduces a run without touching torch's global RNG
        self.generator = torch.Generator(device=device)
        self.cache = model.new_cache(batch, cache_length, **(cache_kwargs or {}))
        self.state = DecodeState(
            tokens=torch.zeros(batch, 1, dtype=torch.int64, device=device),
            positions=torch.zeros(batch, 1, dtype=torch.int64, device=device),
            finished=torch.zeros(batch, dtype=torch.bool, device=device),
            out=torch.zeros(batch, max_new_tokens, dtype=torch.int64, device=device),
            step=torch.zeros(1, dtype=torch.int64, device=device),
            eos=torch.tensor(eos, dtype=torch.int64, device=device),
            pad_token_id=pad_token_id,
            seen=(
                torch.zeros(batch, model.config.vocab_size, dtype=torch.bool, device=device)
                if sampling.repetition_penalty != 1.0
                else None
            ),
        )
        self.use_graph = cuda_graph
        self.graph: torch.cuda.CUDAGraph | None = None

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        return choose_tokens(logits, self.sampling, self.state.seen, self.generator)

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
        graph.register_generator_state(self.generator)  # replays draw fresh random numbers
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            self._eager_step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = graph
