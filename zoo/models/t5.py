"""T5 (v1.0) and Flan-T5 (T5 v1.1): one encoder-decoder model.

    encoder:  h = shared(ids);  per layer: h += attn(norm(h), bias_enc);  h += ff(norm(h))
              enc = norm(h)
    decoder:  h = shared(dec_ids); per layer: h += self_attn(norm(h), bias_dec, causal, KV cache)
              h += cross_attn(norm(h), K/V of enc);  h += ff(norm(h))
    logits = head(norm(h) * d_model**-0.5 when the head is the tied embedding)

Norms are T5 LayerNorm (RMS, no bias, variance in fp32). Attention scores are not scaled by
1/sqrt(d); instead a relative position bias, looked up in layer 0's table of each stack and
shared by all its layers, is added to them (bidirectional buckets in the encoder, causal in the
decoder; cross-attention has none). The feed-forward is relu (v1.0) or gated-gelu (v1.1:
gelu_tanh(wi_0 x) * wi_1 x, one fused gate-up matmul). bf16 is the GPU default: T5 overflows fp16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from convert.config import read_bool, read_count, read_float, read_size, read_str, read_token_ids
from kernels.attention import attention
from kernels.decode import decode_attention
from kernels.embedding import embedding
from kernels.matmul import matmul
from kernels.relative_bias import relative_position_bias
from kernels.rope import rope_cache_write
from zoo import graphs
from zoo.cache import KVCache
from zoo.generation import GenerationConfig, check_input_ids, right_padding_lengths
from zoo.generation.inputs import Prompt, ValueChecks, check_cuda_graph
from zoo.layers import Linear, RMSNorm, init_random_, output_rows
from zoo.models.contract import GenerativeLM, Prefill

# feed_forward_proj -> our matmul activation; "gated-gelu" is gelu_new (tanh), as HF's T5Config
# sets dense_act_fn for it
FEED_FORWARD = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gated-gelu": "gelu_tanh_mul",
    "gated-gelu_new": "gelu_tanh_mul",
    "gated-silu": "silu_mul",
}
# Cross-attention K/V buffers of generate are kept per encoder length rounded up to this.
ENCODER_LENGTH_BUCKET = 128


@dataclass
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    relative_attention_num_buckets: int
    relative_attention_max_distance: int
    layer_norm_epsilon: float
    feed_forward_proj: str
    tie_word_embeddings: bool  # the head is the shared embedding matrix
    scale_decoder_outputs: bool  # decoder output * d_model**-0.5 before the head
    n_positions: int = 512  # nominal (relative positions have no limit): sizes cache buckets
    decoder_start_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.feed_forward_proj not in FEED_FORWARD:
            raise ValueError(
                f"unsupported feed_forward_proj {self.feed_forward_proj!r} for t5; supported: "
                f"{', '.join(FEED_FORWARD)}"
            )
        # the causal half uses max_exact = num_buckets // 2; the bucket table of
        # relative_position_buckets is exact beyond +-max_distance only if max_distance exceeds it
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 2:
            raise ValueError(
                f"relative_attention_max_distance ({self.relative_attention_max_distance}) must "
                f"exceed relative_attention_num_buckets // 2 "
                f"({self.relative_attention_num_buckets // 2})"
            )

    @property
    def activation(self) -> str:
        return FEED_FORWARD[self.feed_forward_proj]

    @property
    def gated(self) -> bool:
        return self.activation.endswith("_mul")

    @classmethod
    def from_hf(cls, hf: dict) -> T5Config:
        """From a `t5` config.json. `tie_word_embeddings` (default true) makes the head the shared
        embedding and turns on the d_model**-0.5 output scaling; transformers 5.x also writes
        `scale_decoder_outputs`, which then sets the scaling."""
        tied = read_bool(hf, "tie_word_embeddings", True)
        num_layers = read_count(hf, "num_layers")
        return cls(
            vocab_size=read_size(hf, "vocab_size"),
            d_model=read_size(hf, "d_model"),
            d_kv=read_size(hf, "d_kv"),
            d_ff=read_size(hf, "d_ff"),
            num_layers=num_layers,
            num_decoder_layers=read_count(hf, "num_decoder_layers", num_layers),
            num_heads=read_count(hf, "num_heads"),
            relative_attention_num_buckets=read_count(hf, "relative_attention_num_buckets", 32),
            relative_attention_max_distance=read_size(hf, "relative_attention_max_distance", 128),
            layer_norm_epsilon=read_float(hf, "layer_norm_epsilon", 1e-6, min=0.0),
            feed_forward_proj=read_str(hf, "feed_forward_proj", "relu"),
            tie_word_embeddings=tied,
            scale_decoder_outputs=read_bool(hf, "scale_decoder_outputs", tied),
            n_positions=read_size(hf, "n_positions", 512),
            decoder_start_token_id=read_token_ids(hf, "decoder_start_token_id"),
            eos_token_id=read_token_ids(hf, "eos_token_id", 1),
            pad_token_id=read_token_ids(hf, "pad_token_id", 0),
        )


def relative_position_buckets(
    bidirectional: bool, num_buckets: int, max_distance: int, device: torch.device | str
) -> torch.Tensor:
    """int32 [2 * max_distance + 1]: the bucket of relative position r (memory - query position)
    at index r + max_distance, computed by HF's `T5Attention._relative_position_bucket` (same ops,
    so the same float rounding at bucket edges, on the model's device). Every |r| >= max_distance
    falls in the last bucket of its side, so positions beyond the table clamp to its ends."""
    relative_position = torch.arange(-max_distance, max_distance + 1, device=device)
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    relative_position_if_large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    relative_position_if_large = torch.min(
        relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1)
    )
    relative_buckets += torch.where(is_small, relative_position, relative_position_if_large)
    return relative_buckets.to(torch.int32)


@dataclass
class CrossInputs:
    """The encoder side of the decoder's cross-attention (device tensors)."""

    kv: torch.Tensor  # [L, B, S_enc, 2 * H * D]: per layer, K then V of the encoder output
    lengths: torch.Tensor  # [B] int32: real encoder tokens of each row (right padding)


class T5Cache(KVCache):
    """The decoder's self-attention KV cache (k[layer], v[layer]: [B, H, max_length, D]) plus the
    cross-attention K/V of the encoder output, computed once per generation and kept here:
    cross_kv [L, B, encoder_length, 2 * H * D] and encoder_lengths [B] int32."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        max_length: int,
        head_dim: int,
        encoder_length: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__(num_layers, batch_size, num_heads, max_length, head_dim, dtype, device)
        width = 2 * num_heads * head_dim
        shape = (num_layers, batch_size, encoder_length, width)
        self.cross_kv = torch.zeros(shape, dtype=dtype, device=device)
        self.encoder_lengths = torch.zeros(batch_size, dtype=torch.int32, device=device)

    @property
    def cross(self) -> CrossInputs:
        return CrossInputs(self.cross_kv, self.encoder_lengths)


class T5SelfAttention(nn.Module):
    """Fused QKV -> attention with the relative position bias (scale 1) -> output projection with
    the residual add fused into its epilogue. Encoder: bidirectional over the row's real tokens.
    Decoder: K/V appended to the cache, causal, over the cached tokens."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.d_kv
        inner = config.num_heads * config.d_kv
        self.qkv = Linear(config.d_model, 3 * inner, bias=False)
        self.out = Linear(inner, config.d_model, bias=False)

    def forward(self, x, bias, residual, kv_end, k_cache=None, v_cache=None, cache_lengths=None):
        batch, seq, _ = x.shape
        qkv = self.qkv(x)  # (B, T, 3 * H * D)
        if k_cache is None:  # encoder: keys are this forward's tokens
            q, k, v = qkv.view(batch, seq, 3, self.num_heads, self.head_dim).unbind(2)
            o = attention(q, k, v, causal=False, scale=1.0, kv_end=kv_end, bias=bias)
        else:
            q = rope_cache_write(
                qkv,
                k_cache,
                v_cache,
                cache_lengths,
                num_q_heads=self.num_heads,
                num_kv_heads=self.num_heads,
                head_dim=self.head_dim,
            )  # (B, T, H, D); K/V written at slots cache_lengths + t
            k, v = k_cache.transpose(1, 2), v_cache.transpose(1, 2)  # (B, S, H, D)
            if seq == 1:
                o = decode_attention(q, k, v, scale=1.0, kv_end=kv_end, bias=bias)
            else:
                o = attention(q, k, v, causal=True, scale=1.0, kv_end=kv_end, bias=bias)
        o = o.view(batch, seq, self.num_heads * self.head_dim)
        return self.out(o, residual=residual)


class T5CrossAttention(nn.Module):
    """Queries from the decoder, keys and values from the encoder output (projected once, by
    `kv`, into the cache); no position bias, the encoder's padding masked by its lengths."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.d_kv
        inner = config.num_heads * config.d_kv
        self.q = Linear(config.d_model, inner, bias=False)
        self.kv = Linear(config.d_model, 2 * inner, bias=False)
        self.out = Linear(inner, config.d_model, bias=False)

    def forward(self, x, residual, kv, encoder_lengths):
        batch, seq, _ = x.shape
        q = self.q(x).view(batch, seq, self.num_heads, self.head_dim)  # (B, T, H, D)
        kv = kv.view(batch, kv.shape[1], 2, self.num_heads, self.head_dim)
        k, v = kv.unbind(2)  # (B, S_enc, H, D)
        if seq == 1:
            o = decode_attention(q, k, v, scale=1.0, kv_end=encoder_lengths)
        else:
            o = attention(q, k, v, causal=False, scale=1.0, kv_end=encoder_lengths)
        o = o.view(batch, seq, self.num_heads * self.head_dim)
        return self.out(o, residual=residual)


class T5FeedForward(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.activation = config.activation
        width = 2 * config.d_ff if config.gated else config.d_ff  # gated: [wi_0; wi_1]
        self.wi = Linear(config.d_model, width, bias=False)
        self.wo = Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x, residual):
        hidden = self.wi(x, activation=self.activation)  # (B, T, d_ff)
        return self.wo(hidden, residual=residual)


class T5EncoderBlock(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.attn = T5SelfAttention(config)
        self.ff_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.ff = T5FeedForward(config)

    def forward(self, h, bias, lengths):
        h = self.attn(self.attn_norm(h), bias, h, lengths)
        return self.ff(self.ff_norm(h), h)


class T5DecoderBlock(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.attn = T5SelfAttention(config)
        self.cross_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.cross = T5CrossAttention(config)
        self.ff_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.ff = T5FeedForward(config)

    def forward(self, h, bias, kv_end, k_cache, v_cache, cache_lengths, cross_kv, encoder_lengths):
        h = self.attn(self.attn_norm(h), bias, h, kv_end, k_cache, v_cache, cache_lengths)
        h = self.cross(self.cross_norm(h), h, cross_kv, encoder_lengths)
        return self.ff(self.ff_norm(h), h)


class T5Stack(nn.Module):
    """Blocks, the relative position bias table (layer 0's, shared by every layer) and the final
    norm of the encoder or the decoder."""

    def __init__(self, config: T5Config, decoder: bool) -> None:
        super().__init__()
        block = T5DecoderBlock if decoder else T5EncoderBlock
        num_layers = config.num_decoder_layers if decoder else config.num_layers
        self.relative_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
        self.layers = nn.ModuleList(block(config) for _ in range(num_layers))
        self.norm = RMSNorm(config.d_model, config.layer_norm_epsilon)


class T5(GenerativeLM):
    """T5 / Flan-T5 on our kernels.

    `model(input_ids, decoder_input_ids=d, attention_mask=mask)` -> logits [B, Td, vocab];
    `model.generate(input_ids, attention_mask=mask, max_new_tokens=n)` -> decoder ids [B, 1 + n']
    starting with decoder_start_token_id. Encoder batches are right-padded (mask: ones, then zeros).
    """

    padding_side = "right"
    # on CUDA, plain calls and the encoder pass replay CUDA graphs (zoo.graphs); False: eager
    cuda_graph: bool = True

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, decoder=False)
        self.decoder = T5Stack(config, decoder=True)
        # a tied head reads the embedding matrix itself (no second parameter to keep in sync)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(config.d_model, config.vocab_size, bias=False)
        )
        n = 2 * config.relative_attention_max_distance + 1
        self.register_buffer("encoder_buckets", torch.empty(n, dtype=torch.int32), persistent=False)
        self.register_buffer("decoder_buckets", torch.empty(n, dtype=torch.int32), persistent=False)

    def init_buffers(self) -> None:
        """Fill non-parameter state after the parameters are allocated (or loaded)."""
        c = self.config
        device = self.encoder_buckets.device
        if device.type == "meta":
            return
        for name, bidirectional in (("encoder_buckets", True), ("decoder_buckets", False)):
            buckets = relative_position_buckets(
                bidirectional,
                c.relative_attention_num_buckets,
                c.relative_attention_max_distance,
                device,
            )
            setattr(self, name, buckets)

    def init_random(self, generator: torch.Generator | None = None) -> None:
        init_random_(self, 0.02, generator)

    @property
    def device(self) -> torch.device:
        return self.shared.weight.device

    @property
    def max_length(self) -> int:
        """Nominal decoder length (n_positions); it only bounds the cache-length buckets."""
        return self.config.n_positions

    def new_cache(
        self, batch_size: int, max_length: int, encoder_length: int | None = None
    ) -> T5Cache:
        """Decoder KV cache for max_length tokens and cross K/V for encoder_length encoder tokens
        (default: max_length of the model)."""
        c = self.config
        return T5Cache(
            c.num_decoder_layers,
            batch_size,
            c.num_heads,
            max_length,
            c.d_kv,
            encoder_length or self.max_length,
            self.shared.weight.dtype,
            self.shared.weight.device,
        )

    def encoder_length(self, prompt_length: int) -> int:
        return -(-prompt_length // ENCODER_LENGTH_BUCKET) * ENCODER_LENGTH_BUCKET

    def generation_cache(self, batch_size: int, max_length: int, encoder_length: int) -> T5Cache:
        return self.new_cache(batch_size, max_length, encoder_length)

    def decoder_prefix(self, input_ids: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
        """The decoder start ids [B, 1] (decoder_start_token_id)."""
        start = self.decoder_start_token_id(config.decoder_start_token_id)
        return torch.full(
            (input_ids.shape[0], 1), start, dtype=input_ids.dtype, device=input_ids.device
        )

    def prefill(
        self, prompt: Prompt, prefix: torch.Tensor, cache: T5Cache, cuda_graph: bool
    ) -> Prefill:
        """The encoder into the cache; the decoder start token is the first decode step, so it
        runs in the CUDA graph too (positions are unused: the cache knows the step)."""
        cache.reset()
        self.encode_into(cache, prompt.input_ids, prompt.lengths, cuda_graph)
        positions = torch.zeros(prefix.shape[0], 1, dtype=torch.int64, device=prefix.device)
        return Prefill(logits=None, positions=positions, tokens=prefix)

    def encode_into(
        self,
        cache: T5Cache,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        cuda_graph: bool | None = None,
    ) -> None:
        """Run the encoder over input_ids [B, T] (right-padded; lengths [B] int32 real tokens) and
        store every decoder layer's cross-attention K/V of its output, and the lengths, in cache.
        On CUDA it replays a CUDA graph of its shape bucket unless cuda_graph=False."""
        batch, seq = input_ids.shape
        if seq > cache.cross_kv.shape[2]:
            raise ValueError(f"encoder length {seq} > the cache's {cache.cross_kv.shape[2]}")
        if graphs.use_graphs(self, cuda_graph):
            graphs.t5_encode_into(self, cache, input_ids, lengths)
            return
        bias = relative_position_bias(
            self.encoder.relative_bias.weight, self.encoder_buckets, seq, seq
        )  # (1, H, T, T)
        h = embedding(input_ids, self.shared.weight)
        for layer in self.encoder.layers:
            h = layer(h, bias, lengths)  # (B, T, d_model)
        h = self.encoder.norm(h)
        for i, layer in enumerate(self.decoder.layers):
            cache.cross_kv[i, :, :seq].copy_(layer.cross.kv(h))  # (B, T, 2 * H * D)
        cache.encoder_lengths.copy_(lengths)

    def forward_cached(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None,
        cache: T5Cache,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Run decoder tokens input_ids [B, T] after the tokens already in `cache` (whose cross K/V
        encode_into filled), append their keys and values to it, and return logits ([B, T, V], or
        [B, 1, V] with last_only). Query positions come from cache.lengths (positions is unused:
        the relative bias needs no absolute positions), so a decode step is CUDA-graph safe."""
        seq = input_ids.shape[1]
        kv_end = cache.lengths + seq
        bias = relative_position_bias(
            self.decoder.relative_bias.weight,
            self.decoder_buckets,
            seq,
            cache.max_length,
            query_offset=cache.lengths,
        )  # (B, H, T, S_max): query t of row b sits at position lengths[b] + t
        h = embedding(input_ids, self.shared.weight)
        cross = cache.cross
        for i, layer in enumerate(self.decoder.layers):
            h = layer(
                h, bias, kv_end, cache.k[i], cache.v[i], cache.lengths, cross.kv[i], cross.lengths
            )  # (B, T, d_model)
        cache.lengths.add_(seq)
        h = output_rows(h, last_only)
        head = self.shared.weight if self.lm_head is None else self.lm_head.weight
        # HF scales the decoder output before the head; here the scale is the matmul's alpha
        scale = self.config.d_model**-0.5 if self.config.scale_decoder_outputs else 1.0
        return matmul(self.decoder.norm(h), head, alpha=scale)

    def forward(
        self,
        input_ids: torch.Tensor,
        decoder_input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cuda_graph: bool | None = None,
    ) -> torch.Tensor:
        """Logits [B, Td, vocab] of decoder_input_ids [B, Td] (teacher forcing: HF's decoder
        inputs start with decoder_start_token_id) given the right-padded encoder batch
        input_ids [B, T] and its attention_mask (1 for tokens, 0 for padding). On CUDA the call
        replays a CUDA graph of its shape bucket (bitwise the eager result) unless
        cuda_graph=False."""
        if decoder_input_ids is None:
            raise ValueError(
                "decoder_input_ids is required (it starts with decoder_start_token_id); "
                "use generate() to produce decoder ids"
            )
        checks = ValueChecks()  # the value checks below, read back with one sync
        check_input_ids(input_ids, self.config.vocab_size, self.device, checks=checks)
        check_input_ids(
            decoder_input_ids,
            self.config.vocab_size,
            self.device,
            name="decoder_input_ids",
            checks=checks,
        )
        if decoder_input_ids.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"decoder_input_ids: batch {decoder_input_ids.shape[0]} != input_ids batch "
                f"{input_ids.shape[0]}"
            )
        batch, seq = input_ids.shape
        lengths = right_padding_lengths(attention_mask, input_ids, "T5 encoder batches", checks)
        checks.run()
        if lengths is None:
            lengths = torch.full((batch,), seq, dtype=torch.int32, device=input_ids.device)
        check_cuda_graph(cuda_graph, self.device)
        with torch.inference_mode():
            if graphs.use_graphs(self, cuda_graph):
                return graphs.t5_forward(self, input_ids, lengths, decoder_input_ids)
            cache = self.new_cache(batch, decoder_input_ids.shape[1], encoder_length=seq)
            self.encode_into(cache, input_ids, lengths, cuda_graph=False)
            return self.forward_cached(decoder_input_ids, None, cache)

    def decoder_start_token_id(self, decoder_start_token_id: int | None = None) -> int:
        """The argument, else generation_config.json, else config.json, else the pad id (T5's
        convention)."""
        if decoder_start_token_id is None:
            decoder_start_token_id = self.generation_config.decoder_start_token_id
        if decoder_start_token_id is None:
            decoder_start_token_id = self.config.decoder_start_token_id
        if decoder_start_token_id is None:
            decoder_start_token_id = self.config.pad_token_id
        if decoder_start_token_id is None:
            raise ValueError("no decoder_start_token_id (nor pad_token_id) in the config")
        start = int(decoder_start_token_id)
        if not 0 <= start < self.config.vocab_size:  # it is the decoder's first input id
            raise ValueError(
                f"decoder_start_token_id: {start} is outside the vocabulary "
                f"[0, {self.config.vocab_size})"
            )
        return start
