"""GPT-2: learned positions, pre-LayerNorm blocks, fused QKV (HF's c_attn is already fused),
tanh-GELU fused into the MLP matmul, tied head.
    h = wte[ids] + wpe[positions]
    h = h + c_proj(attn(c_attn(ln_1(h))))
    h = h + c_proj(gelu_new(c_fc(ln_2(h))))
    logits = ln_f(h) @ wte.T
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from convert.config import (
    check_divisible,
    read_count,
    read_float,
    read_size,
    read_str,
    read_token_ids,
)
from convert.shard import Shard
from kernels.embedding import embedding
from kernels.matmul import matmul
from zoo.cache import KVCache
from zoo.layers import (
    AttentionInputs,
    LayerNorm,
    Linear,
    SelfAttention,
    init_random_,
    output_projection,
    output_rows,
)
from zoo.models.contract import DecoderOnlyLM

# HF GPT-2 activation names -> our matmul epilogues
ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}


@dataclass
class GPT2Config:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    activation: str  # our epilogue name
    layer_norm_epsilon: float
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_hf(cls, hf: dict) -> GPT2Config:
        activation = read_str(hf, "activation_function", "gelu_new")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unsupported activation_function {activation!r} for gpt2; supported: "
                f"{', '.join(ACTIVATIONS)}"
            )
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(flag, False):
                raise ValueError(f"unsupported gpt2 option {flag}=True")
        if not hf.get("scale_attn_weights", True):
            raise ValueError("unsupported gpt2 option scale_attn_weights=False")
        n_embd, n_head = read_size(hf, "n_embd"), read_count(hf, "n_head")
        check_divisible("n_embd", n_embd, "n_head", n_head)
        return cls(
            vocab_size=read_size(hf, "vocab_size"),
            n_positions=read_size(hf, "n_positions", 1024),
            n_embd=n_embd,
            n_layer=read_count(hf, "n_layer"),
            n_head=n_head,
            n_inner=read_size(hf, "n_inner", 4 * n_embd),
            activation=ACTIVATIONS[activation],
            layer_norm_epsilon=read_float(hf, "layer_norm_epsilon", 1e-5, min=0.0),
            initializer_range=read_float(hf, "initializer_range", 0.02, min=0.0),
            bos_token_id=read_token_ids(hf, "bos_token_id"),
            eos_token_id=read_token_ids(hf, "eos_token_id"),
            pad_token_id=read_token_ids(hf, "pad_token_id"),
        )


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, shard: Shard, tp=None) -> None:
        super().__init__()
        c = config
        h0, h1 = shard.split(c.n_head, "n_head")  # this rank's heads (all without tp)
        i0, i1 = shard.split(c.n_inner, "n_inner")  # and MLP columns
        self.activation = c.activation
        self.ln_1 = LayerNorm(c.n_embd, c.layer_norm_epsilon)
        self.attn = SelfAttention(
            c.n_embd,
            h1 - h0,
            h1 - h0,
            c.head_dim,
            bias=True,
            scale=c.head_dim**-0.5,
            out=output_projection((h1 - h0) * c.head_dim, c.n_embd, True, tp, slot=0),
        )
        self.ln_2 = LayerNorm(c.n_embd, c.layer_norm_epsilon)
        self.fc = Linear(c.n_embd, i1 - i0, bias=True)
        self.proj = output_projection(i1 - i0, c.n_embd, True, tp, slot=1)

    def forward(self, h, k_cache, v_cache, inputs: AttentionInputs):
        h = self.attn(self.ln_1(h), k_cache, v_cache, inputs, h)
        hidden = self.fc(self.ln_2(h), activation=self.activation)  # (B, T, n_inner)
        return self.proj(hidden, residual=h)


class GPT2(DecoderOnlyLM):
    """GPT-2 causal LM on our kernels. `model(input_ids)` -> logits [B, T, vocab].

    tp (a zoo.parallel.TensorParallel): this process holds one rank's share (see zoo.parallel);
    its calls must be made by every rank alike, and return the same full logits everywhere."""

    def __init__(self, config: GPT2Config, tp=None) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        shard = Shard(0, 1) if tp is None else tp.shard
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.blocks = nn.ModuleList(GPT2Block(config, shard, tp) for _ in range(config.n_layer))
        self.ln_f = LayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.num_heads = self.blocks[0].attn.num_heads  # this rank's
        self.vocab_rows = self.head_rows(config.vocab_size)  # of the tied head

    def init_random(self, generator: torch.Generator | None = None) -> None:
        init_random_(self, self.config.initializer_range, generator)

    @property
    def max_length(self) -> int:
        return self.config.n_positions

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        c = self.config
        weight = self.wte.weight
        return KVCache(
            c.n_layer,
            batch_size,
            self.num_heads,
            max_length,
            c.head_dim,
            weight.dtype,
            weight.device,
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
        inputs = AttentionInputs.appending(cache, seq)
        h = embedding(
            input_ids, self.wte.weight, positions=positions, position_weight=self.wpe.weight
        )
        for i, block in enumerate(self.blocks):
            h = block(h, cache.k[i], cache.v[i], inputs)  # (B, T, n_embd)
        cache.lengths.add_(seq)
        h = output_rows(h, last_only, last_index)
        head = self.wte.weight[self.vocab_rows[0] : self.vocab_rows[1]]  # tied head
        return self.full_logits(matmul(self.ln_f(h), head))
