"""Llama 3, Granite, Mistral, Qwen2 / Qwen2.5 and Qwen3: one decoder-only model.

Granite 3 is Llama plus four multipliers (embedding, attention scale, residual branch, logits);
Granite Code is Llama with attention and MLP biases and a tied head. Mistral is Llama with an
optional sliding window; Qwen2 adds q/k/v biases and a sliding window on the layers from
max_window_layers on (when use_sliding_window); Qwen3 normalises each q and k head (RMSNorm)
before the rotation. The block:
    h = embed(ids) * embedding_multiplier
    h = h + residual_multiplier * o_proj(attn(rope(qkv(rms_norm(h)))))
    h = h + residual_multiplier * down(silu(gate(x)) * up(x)),  x = rms_norm(h)
    logits = head(rms_norm(h)) / logits_scaling
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from convert.config import (
    read_bool,
    read_count,
    read_float,
    read_int,
    read_size,
    read_str,
    read_token_ids,
    rope_settings,
)
from convert.shard import Shard
from kernels.embedding import embedding
from kernels.matmul import matmul
from zoo.cache import KVCache
from zoo.layers import (
    SUPPORTED_ROPE_TYPES,
    AttentionInputs,
    Linear,
    RMSNorm,
    SelfAttention,
    init_random_,
    output_projection,
    output_rows,
    rope_inv_freq,
)
from zoo.models.contract import DecoderOnlyLM


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    attention_bias: bool = False  # q, k, v and o projections
    mlp_bias: bool = False
    qkv_bias: bool | None = None  # q, k, v only (Qwen2); None: attention_bias
    sliding_window: int | None = None  # keys a query sees, itself included (None: all)
    # per layer "full_attention" or "sliding_attention" (HF layer_types); None: every layer
    # slides when sliding_window is set (Mistral)
    layer_types: tuple[str, ...] | None = None
    qk_norm: bool = False  # RMSNorm of each q and k head before the rotation (Qwen3)
    # Granite's multipliers (1.0 and head_dim**-0.5 reproduce Llama)
    embedding_multiplier: float = 1.0
    attention_multiplier: float | None = None
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.attention_multiplier is None:
            self.attention_multiplier = self.head_dim**-0.5
        if self.qkv_bias is None:
            self.qkv_bias = self.attention_bias
        _check_rope_scaling(self.rope_scaling)
        _check_window(self.sliding_window, self.layer_types, self.num_layers)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads {self.num_heads} is not a multiple of "
                f"num_key_value_heads {self.num_kv_heads}"
            )

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer (None: full attention)."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @classmethod
    def from_hf(cls, hf: dict) -> LlamaConfig:
        """From a `llama`, `granite`, `mistral`, `qwen2` or `qwen3` config.json (transformers 4.x
        `rope_theta`/`rope_scaling` or 5.x `rope_parameters`)."""
        hidden = read_size(hf, "hidden_size")
        heads = read_count(hf, "num_attention_heads")
        theta, scaling = rope_settings(hf)
        model_type = hf.get("model_type")
        if read_str(hf, "hidden_act", "silu") != "silu":
            raise ValueError(
                f"unsupported hidden_act {hf['hidden_act']!r} for {model_type}; supported: silu"
            )
        is_granite = model_type == "granite"
        return cls(
            vocab_size=read_size(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=read_size(hf, "intermediate_size"),
            num_layers=read_count(hf, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=read_count(hf, "num_key_value_heads", heads),
            head_dim=read_size(hf, "head_dim", hidden // heads),
            max_position_embeddings=read_size(hf, "max_position_embeddings", 2048),
            rms_norm_eps=read_float(hf, "rms_norm_eps", 1e-6, min=0.0),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=read_bool(hf, "tie_word_embeddings", False),
            attention_bias=read_bool(hf, "attention_bias", False),
            mlp_bias=read_bool(hf, "mlp_bias", False),
            qkv_bias=True if model_type == "qwen2" else None,
            **_sliding_window_from_hf(hf),
            qk_norm=model_type == "qwen3",
            embedding_multiplier=read_float(hf, "embedding_multiplier", 1.0) if is_granite else 1.0,
            attention_multiplier=read_float(hf, "attention_multiplier", 1.0)
            if is_granite
            else None,
            residual_multiplier=read_float(hf, "residual_multiplier", 1.0) if is_granite else 1.0,
            logits_scaling=read_float(hf, "logits_scaling", 1.0, positive=True)
            if is_granite
            else 1.0,
            initializer_range=read_float(hf, "initializer_range", 0.02, min=0.0),
            bos_token_id=read_token_ids(hf, "bos_token_id"),
            eos_token_id=read_token_ids(hf, "eos_token_id"),
            pad_token_id=read_token_ids(hf, "pad_token_id"),
        )


# the keys rope_inv_freq reads for each rope_type
ROPE_SCALING_KEYS = {
    "default": (),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _check_rope_scaling(scaling: dict | None) -> None:
    """Refuse a rope_scaling the rotary kernels do not implement (yarn, linear, dynamic, ...) when
    the config is read, not after the weights are loaded."""
    if scaling is None:
        return
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope_type {rope_type!r} (config.json rope_scaling / rope_parameters); "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    missing = [key for key in ROPE_SCALING_KEYS.get(rope_type, ()) if key not in scaling]
    if missing:
        raise ValueError(f"rope_type {rope_type!r} needs rope_scaling keys: {', '.join(missing)}")


LAYER_TYPES = ("full_attention", "sliding_attention")


def _sliding_window_from_hf(hf: dict) -> dict:
    """sliding_window and layer_types as HF's Mistral and Qwen2 / Qwen3 read them. Mistral: the
    window (when not null) applies to every layer. Qwen: only with use_sliding_window, and then
    (unless config.json lists layer_types) on the layers i >= max_window_layers."""
    model_type = hf.get("model_type")
    if model_type == "mistral":
        if hf.get("layer_types") is not None:
            raise ValueError(
                "unsupported config.json key 'layer_types' for model_type 'mistral' (alternating "
                "sliding / full attention); Mistral applies sliding_window to every layer"
            )
        return {"sliding_window": read_int(hf, "sliding_window", None)}
    if model_type not in ("qwen2", "qwen3"):
        return {}
    use_window = read_bool(hf, "use_sliding_window", False)
    window = read_int(hf, "sliding_window", None) if use_window else None
    layer_types = hf.get("layer_types")
    if layer_types is None:
        first_sliding = read_int(hf, "max_window_layers", 28, min=0)
        layer_types = [
            "sliding_attention" if window is not None and i >= first_sliding else "full_attention"
            for i in range(read_count(hf, "num_hidden_layers"))
        ]
    if window is None and "sliding_attention" in layer_types:
        raise ValueError(
            "config.json layer_types has 'sliding_attention' layers but no sliding_window "
            "(use_sliding_window is false or sliding_window is null)"
        )
    return {"sliding_window": window, "layer_types": tuple(layer_types)}


def _check_window(window: int | None, layer_types: tuple[str, ...] | None, num_layers: int):
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"sliding_window: expected a positive int or null, got {window!r}")
    if layer_types is None:
        return
    if len(layer_types) != num_layers:
        raise ValueError(
            f"layer_types: {len(layer_types)} entries for num_hidden_layers {num_layers}"
        )
    unknown = sorted(set(layer_types) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(
            f"unsupported layer_types {unknown} (config.json); supported: {', '.join(LAYER_TYPES)}"
        )


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig, shard: Shard, tp=None) -> None:
        super().__init__()
        start, end = shard.split(config.intermediate_size, "intermediate_size")
        inter = end - start  # this rank's MLP rows (all of them without tensor parallelism)
        self.gate_up = Linear(config.hidden_size, 2 * inter, config.mlp_bias)
        self.down = output_projection(inter, config.hidden_size, config.mlp_bias, tp, slot=1)

    def forward(self, x, residual, residual_scale, norm=None):
        # silu(gate) * up of norm(x), (B, T, I)
        hidden = self.gate_up(x, activation="silu_mul", norm=norm)
        return self.down(hidden, residual=residual, alpha=residual_scale)


class LlamaBlock(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int, shard: Shard, tp=None) -> None:
        super().__init__()
        self.residual_multiplier = config.residual_multiplier
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        (q0, q1), (kv0, kv1) = shard.heads(config.num_heads, config.num_kv_heads)
        self.attn = SelfAttention(
            config.hidden_size,
            q1 - q0,
            kv1 - kv0,
            config.head_dim,
            bias=config.qkv_bias,
            scale=config.attention_multiplier,
            causal=True,
            out_bias=config.attention_bias,
            window=config.layer_window(layer),
            qk_norm_eps=config.rms_norm_eps if config.qk_norm else None,
            out=output_projection(
                (q1 - q0) * config.head_dim, config.hidden_size, config.attention_bias, tp, slot=0
            ),
        )
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, shard, tp)

    def forward(self, h, k_cache, v_cache, inputs: AttentionInputs):
        # each norm runs inside the projection that takes it (fused there for FP8 weights)
        h = self.attn(h, k_cache, v_cache, inputs, h, self.residual_multiplier, self.attn_norm)
        return self.mlp(h, h, self.residual_multiplier, self.mlp_norm)


class Llama(DecoderOnlyLM):
    """Llama 3 / Granite / Mistral / Qwen2 / Qwen3 causal LM on our kernels.
    `model(input_ids)` -> logits [B, T, vocab].

    tp (a zoo.parallel.TensorParallel): this process holds one rank's share (see zoo.parallel);
    its calls must be made by every rank alike, and return the same full logits everywhere."""

    def __init__(self, config: LlamaConfig, tp=None) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        shard = Shard(0, 1) if tp is None else tp.shard
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaBlock(config, i, shard, tp) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.num_kv_heads = self.layers[0].attn.num_kv_heads  # this rank's
        # this rank's rows of the LM head (all of them without tensor parallelism)
        self.vocab_rows = self.head_rows(config.vocab_size)
        # a tied head reads the embedding matrix itself (no second parameter to keep in sync)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(config.hidden_size, self.vocab_rows[1] - self.vocab_rows[0], bias=False)
        )
        self.register_buffer("inv_freq", torch.empty(config.head_dim // 2), persistent=False)

    def init_buffers(self) -> None:
        """Fill non-parameter state after the parameters are allocated (or loaded)."""
        c = self.config
        if self.inv_freq.device.type != "meta":
            inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
            self.inv_freq = inv_freq.to(self.inv_freq.device)

    def init_random(self, generator: torch.Generator | None = None) -> None:
        init_random_(self, self.config.initializer_range, generator)

    @property
    def max_length(self) -> int:
        return self.config.max_position_embeddings

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        c = self.config
        return KVCache(
            c.num_layers,
            batch_size,
            self.num_kv_heads,
            max_length,
            c.head_dim,
            self.embed.weight.dtype,
            self.embed.weight.device,
        )

    def forward_cached(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        last_only: bool = False,
        last_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run input_ids [B, T] at `positions` [B, T] after the tokens already in `cache`, append
        their keys and values to it, and return logits ([B, T, V], or [B, 1, V] with last_only,
        or of position last_index[b] (int64 [B]) of each row: a right-padded prompt)."""
        seq = input_ids.shape[1]
        inputs = AttentionInputs.appending(cache, seq, positions, self.inv_freq)
        h = embedding(input_ids, self.embed.weight, scale=self.config.embedding_multiplier)
        for i, layer in enumerate(self.layers):
            h = layer(h, cache.k[i], cache.v[i], inputs)  # (B, T, hidden)
        cache.lengths.add_(seq)
        h = output_rows(h, last_only, last_index)
        if self.lm_head is None:
            head = self.embed.weight[self.vocab_rows[0] : self.vocab_rows[1]]
        else:
            head = self.lm_head.weight
        logits = matmul(self.norm(h), head, alpha=1.0 / self.config.logits_scaling)
        return self.full_logits(logits)
