"""What a model gives the generation engine: the contract every generative family keeps.

    cache = model.generation_cache(batch, length, encoder_length)   # a static KV cache
    prefill = model.prefill(prompt, prefix, cache, cuda_graph)   # the prompt into the cache
    logits = model.decode_step(tokens, positions, cache)   # one token per row, appended

Decoder-only models (DecoderOnlyLM: GPT-2, Llama 3, Granite) take left-padded prompts, and their
prefill runs the prompt through forward_cached and returns its last logits. Encoder-decoder
models (T5) take right-padded encoder inputs, and their prefill runs the encoder into the cache
and hands the decoder start token to the engine as the first decode step. Everything else
(generate, text, streaming, stop strings) is shared: the engine (zoo.generation) relies on
these calls alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from zoo import graphs
from zoo.cache import KVCache
from zoo.generation import (
    STOP_CHECK_INTERVAL,
    GenerationConfig,
    GenerationEngine,
    TextStream,
    check_input_ids,
    encode_prompts,
    left_padding,
    new_text,
    new_tokens,
    pad_prompts,
    require_tokenizer,
    resolve_config,
)
from zoo.generation.inputs import PaddingSide, Prompt, ValueChecks, check_cuda_graph

# model.chat's default reply length (less where the context ends sooner).
CHAT_MAX_NEW_TOKENS = 512


@dataclass
class Prefill:
    """What a prefill leaves for the first decode step. logits [B, V]: the prompt's last logits,
    the first new token is chosen from them; None: `tokens` [B, 1] are the first decode step's
    input instead (T5's decoder start token). positions [B, 1]: the first decode position."""

    logits: torch.Tensor | None
    positions: torch.Tensor
    tokens: torch.Tensor | None = None


class GenerativeLM(nn.Module, ABC):
    """A model the generation engine can run. `engine` (a GenerationEngine, made with the model)
    holds its decode cache, CUDA graphs and open stream; `generation_config` (a GenerationConfig,
    from generation_config.json when loaded) the default options of generate."""

    padding_side: ClassVar[PaddingSide]  # how prompt batches are padded
    # on CUDA, plain calls and prefills replay CUDA graphs (zoo.graphs); False: eager
    cuda_graph: bool = True
    tokenizer = None
    generation_config: GenerationConfig = GenerationConfig()
    # a zoo.parallel.TensorParallel when this process holds one rank's share of the model
    tp = None
    # torch.cuda.graph's capture_error_mode for the decode step: "thread_local" where another
    # thread makes CUDA calls during a capture (torch.distributed's watchdog, tensor parallel)
    graph_capture_mode: str = "global"

    def __init__(self) -> None:
        super().__init__()
        self.engine = GenerationEngine(self)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def init_buffers(self) -> None:
        """Fill non-parameter state after the parameters are allocated (or loaded); none here."""

    @property
    @abstractmethod
    def max_length(self) -> int:
        """The context length; it also caps the decode cache buckets."""

    def check_length(self, prompt_length: int, max_new_tokens: int) -> None:
        """Refuse a generation beyond the model's context; here none (memory bounds it)."""

    def shared_value(self, value: int, pick: str = "first") -> int:
        """A value every process of the model must agree on (the sampling seed of a generation
        given none, "first": rank 0's draw; the memory a generation may take, "min": the
        tightest device's), so that all of them choose the same tokens and refuse the same
        calls. A model in one process keeps its own value; a tensor-parallel one exchanges it."""
        return value if self.tp is None else self.tp.shared_value(value, pick)

    def encoder_length(self, prompt_length: int) -> int:
        """Encoder slots the cache keeps for a prompt of prompt_length tokens (0: no encoder)."""
        return 0

    @abstractmethod
    def generation_cache(self, batch_size: int, max_length: int, encoder_length: int) -> KVCache:
        """An empty cache for batch_size rows of max_length decoder tokens (and encoder_length
        encoder tokens)."""

    @abstractmethod
    def decoder_prefix(self, input_ids: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
        """The decoder-side ids [B, P] the new tokens follow (returned before them, counted by
        the repetition penalty). Checked here: it runs before any kernel."""

    @abstractmethod
    def prefill(
        self, prompt: Prompt, prefix: torch.Tensor, cache: KVCache, cuda_graph: bool
    ) -> Prefill:
        """Reset cache and run the prompt into it (replayed from a CUDA graph of its bucket when
        cuda_graph is True)."""

    @abstractmethod
    def forward_cached(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None,
        cache: KVCache,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Run input_ids [B, T] after the tokens already in `cache`, append their keys and values
        to it, and return logits ([B, T, V], or [B, 1, V] with last_only)."""

    def decode_step(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache
    ) -> torch.Tensor:
        """Logits [B, V] of one token per row (tokens, positions [B, 1]) after the cache."""
        return self.forward_cached(tokens, positions, cache, last_only=True)[:, -1]

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor | str | list[str],
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        *,
        generation_config: GenerationConfig | None = None,
        stream: bool = False,
        cuda_graph: bool | None = None,
        **options,
    ) -> torch.Tensor | str | list[str] | TextStream:
        """Continue a batch of token ids [B, T] (decoder-only: left-padded, returns [B, T + new];
        encoder-decoder: right-padded encoder input, returns decoder ids [B, 1 + new] starting
        with decoder_start_token_id, as HF's generate does).

        Options are GenerationConfig's fields (do_sample, temperature, top_k, top_p, min_p,
        repetition_penalty, eos_token_id, pad_token_id, decoder_start_token_id, stop, seed), as
        keywords over generation_config (default: the model's, from generation_config.json);
        every value is checked before any kernel runs. Greedy unless do_sample=True. Each row
        stops at any EOS id; rows that finished early are padded with pad_token_id, and
        generation ends when every row has finished or after max_new_tokens (default 32). A call
        whose KV cache and decode buffers would not fit the device is refused up front. On CUDA
        the decode step is replayed from a CUDA graph unless cuda_graph=False.

        A str (or list of str) prompt is encoded with the checkpoint's tokenizer (its special
        tokens added, e.g. Llama 3's BOS) and the new text is returned (str or list), cut before
        the row's EOS, special tokens left out. stop: strings that end a row; the text ends just
        before the first one (with token ids, the row keeps the tokens up to the one completing
        the stop string, then pads, as HF's stop_strings). stream=True (one str prompt) returns a
        TextStream: iterate it for the text pieces as they are produced (never half a UTF-8
        character); joined, they equal the text stream=False returns.

        Threads: generations of one model are serialized by a re-entrant lock (model.engine.lock)
        held for the whole call and for each step of a stream; a new generation ends a stream
        still open on the model.
        """
        config = resolve_config(self.generation_config, generation_config, max_new_tokens, options)
        with self.engine.lock:
            if isinstance(input_ids, str | list):
                if attention_mask is not None:
                    raise ValueError(
                        "attention_mask: only with token ids (text prompts are padded here)"
                    )
                rows = encode_prompts(self.tokenizer, input_ids, self.config.vocab_size)
                return self._generate_text(
                    rows, isinstance(input_ids, str), config, stream, cuda_graph
                )
            if stream:
                raise ValueError("stream=True streams text: pass a str prompt, not token ids")
            prefix, generation = self.engine.start(input_ids, attention_mask, config, cuda_graph)
            if generation is None:  # max_new_tokens == 0
                return prefix.clone()
            tokenizer = require_tokenizer(self.tokenizer, "stop strings") if config.stop else None
            generated = new_tokens(generation, len(input_ids), tokenizer, config.stop)
            return torch.cat([prefix, generated.to(prefix.dtype)], dim=1)

    def _generate_text(
        self,
        rows: list[list[int]],
        single: bool,
        config: GenerationConfig,
        stream: bool,
        cuda_graph: bool | None,
    ) -> str | list[str] | TextStream:
        """The text (str for one prompt, else a list) of the continuations of token-id rows, or
        a TextStream of it."""
        tokenizer = require_tokenizer(self.tokenizer)
        if stream and not single:
            raise ValueError("stream=True takes one prompt (a str), not a list")
        pad = 0 if self.padding_side == "left" else (self.config.pad_token_id or 0)
        ids, mask = pad_prompts(rows, self.padding_side, pad, self.device)
        # streaming looks at every new token as soon as it exists
        check_every = 1 if stream else STOP_CHECK_INTERVAL
        _, generation = self.engine.start(ids, mask, config, cuda_graph, check_every)
        if stream:
            return TextStream(self.engine, tokenizer, generation, config.stop)
        texts = new_text(generation, len(rows), tokenizer, config.stop)
        return texts[0] if single else texts


class DecoderOnlyLM(GenerativeLM):
    """Shared `forward`, prefill and `chat` of the decoder-only families (GPT-2, Llama 3,
    Granite). A subclass provides `config` (vocab_size, eos/pad ids), `max_length`,
    `new_cache(batch, length)` and `forward_cached(input_ids, positions, cache, last_only)`."""

    padding_side = "left"

    @abstractmethod
    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty KV cache for batch_size rows of max_length tokens."""

    def head_rows(self, vocab_size: int) -> tuple[int, int]:
        """[start, end) of the LM head's rows this process computes: all of them, or its
        vocabulary part when tensor parallel (set self.tp first)."""
        return (0, vocab_size) if self.tp is None else self.tp.shard.vocab(vocab_size)

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits [..., V] of this process's head rows [..., rows]: themselves, or, tensor
        parallel, every rank's parts gathered (the same on every rank)."""
        if self.tp is None:
            return logits
        return self.tp.gather_vocab(logits, self.config.vocab_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cuda_graph: bool | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] of a (left-padded) batch of token ids [B, T]. On CUDA the call
        replays a CUDA graph of its shape bucket (bitwise the eager result) unless
        cuda_graph=False (or model.cuda_graph = False)."""
        checks = ValueChecks()  # the value checks below, read back with one sync
        check_input_ids(input_ids, self.config.vocab_size, self.device, checks=checks)
        positions, kv_start = left_padding(attention_mask, input_ids, checks)
        checks.run()
        batch, seq = input_ids.shape
        if seq > self.max_length:
            raise ValueError(
                f"input_ids: {seq} tokens exceed the model's context of {self.max_length} tokens"
            )
        check_cuda_graph(cuda_graph, self.device)
        with torch.inference_mode(not torch.compiler.is_compiling()):
            if graphs.use_graphs(self, cuda_graph):
                return graphs.decoder_forward(self, input_ids, positions, kv_start)
            cache = self.new_cache(batch, seq)
            cache.reset(kv_start)
            return self.forward_cached(input_ids, positions, cache)

    def check_length(self, prompt_length: int, max_new_tokens: int) -> None:
        if prompt_length + max_new_tokens > self.max_length:
            raise ValueError(
                f"prompt length {prompt_length} plus max_new_tokens {max_new_tokens} is "
                f"{prompt_length + max_new_tokens}, beyond the model's context of "
                f"{self.max_length} tokens"
            )

    def generation_cache(self, batch_size: int, max_length: int, encoder_length: int) -> KVCache:
        return self.new_cache(batch_size, max_length)

    def decoder_prefix(self, input_ids: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
        return input_ids

    def prefill(
        self, prompt: Prompt, prefix: torch.Tensor, cache: KVCache, cuda_graph: bool
    ) -> Prefill:
        logits = graphs.prefill(
            self, cache, prompt.input_ids, prompt.positions, prompt.kv_start, cuda_graph
        )
        return Prefill(logits, prompt.positions[:, -1:] + 1)

    @torch.inference_mode()
    def chat(
        self,
        messages: list[dict] | str,
        max_new_tokens: int | None = None,
        *,
        generation_config: GenerationConfig | None = None,
        stream: bool = False,
        cuda_graph: bool | None = None,
        template_kwargs: dict | None = None,
        **options,
    ) -> str | TextStream:
        """The assistant's reply to a conversation ([{"role": "user", "content": ...}, ...], or a
        str for one user message), as text (or a TextStream with stream=True).

        The conversation is rendered with the checkpoint's chat template as transformers'
        apply_chat_template(..., add_generation_prompt=True) renders it (template_kwargs: extra
        template variables, e.g. tools, enable_thinking) and encoded without the tokenizer's own
        special tokens, so the template's BOS is the only one. EOS ids default to every id of
        generation_config.json (Llama 3 instruct ends turns with <|eot_id|>, not
        <|end_of_text|>) plus the tokenizer's eos_token. max_new_tokens defaults to what the
        context leaves after the prompt, at most CHAT_MAX_NEW_TOKENS. Other options as in
        generate.
        """
        config = resolve_config(self.generation_config, generation_config, max_new_tokens, options)
        tokenizer = require_tokenizer(self.tokenizer)
        if not hasattr(tokenizer, "apply_chat_template"):
            raise ValueError("chat needs a zoo.tokenizer.Tokenizer (with the chat template)")
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, **(template_kwargs or {})
        )
        if config.max_new_tokens is None:
            default = max(1, min(CHAT_MAX_NEW_TOKENS, self.max_length - len(ids)))
            config = config.updated(max_new_tokens=default)
        if options.get("eos_token_id") is None and (
            generation_config is None or generation_config.eos_token_id is None
        ):
            eos = list(self.engine.stop_ids(config)[0])
            if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
                eos.append(tokenizer.eos_token_id)
            config = config.updated(eos_token_id=eos)
        with self.engine.lock:
            return self._generate_text([ids], True, config, stream, cuda_graph)
