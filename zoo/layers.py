"""Small modules shared by the families: fused linear, norms, rotary frequencies, attention block.

Each module holds parameters and calls one of our kernels explicitly in forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kernels.attention import attention
from kernels.decode import decode_attention
from kernels.matmul import matmul
from kernels.norm import layer_norm, rms_norm
from kernels.rope import rope_cache_write


class Linear(nn.Module):
    """y = residual + alpha * act(x @ weight.T + bias), in one matmul kernel.

    A fused layer (QKV, gate-up) is one Linear whose rows are the concatenated projections.
    norm: an RMSNorm applied to x first (a separate kernel here; FP8 layers fuse it, zoo/quant.py).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(
        self,
        x: torch.Tensor,
        activation: str | None = None,
        residual: torch.Tensor | None = None,
        alpha: float = 1.0,
        norm: RMSNorm | None = None,
    ) -> torch.Tensor:
        if norm is not None:
            x = norm(x)
        return matmul(
            x, self.weight, self.bias, activation=activation, residual=residual, alpha=alpha
        )


def output_projection(
    in_features: int, out_features: int, bias: bool, tp=None, slot: int = 0
) -> nn.Module:
    """A projection back to the hidden size (attention out, MLP down): a Linear, or, tensor
    parallel (tp: a zoo.parallel.TensorParallel), split along its input features over the ranks
    (in_features: this rank's; slot: its symmetric-memory buffer, one per kind)."""
    if tp is None:
        return Linear(in_features, out_features, bias)
    return tp.row_linear(in_features, out_features, bias, slot)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, residual=residual)


class LayerNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.bias = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return layer_norm(x, self.weight, self.bias, self.eps, residual=residual)


SUPPORTED_ROPE_TYPES = ("default", "llama3")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in fp32, as HF's `_compute_default_rope_parameters` and
    `_compute_llama3_parameters` compute them (same op order, on the CPU)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type != "llama3":
        raise ValueError(
            f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # wavelengths longer than the original context are slowed by `factor`, short ones kept, and
    # the band between is interpolated smoothly
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed, inv_freq_llama)


@dataclass
class AttentionInputs:
    """Per-forward state shared by every attention layer (all device tensors, no host values
    derived from data, so a decode step can be captured in a CUDA graph)."""

    cache_lengths: torch.Tensor  # [B] int32: slots already in the cache before this forward
    kv_start: torch.Tensor  # [B] int32: first real slot (left padding)
    kv_end: torch.Tensor  # [B] int32: cache_lengths + T
    positions: torch.Tensor | None = None  # [B, T] rotary positions
    inv_freq: torch.Tensor | None = None  # [D / 2] fp32; None: no rotary embedding
    decode: bool = False  # T == 1 over a cache: the split-KV decode kernel

    @classmethod
    def appending(cls, cache, seq: int, positions=None, inv_freq=None) -> AttentionInputs:
        """Inputs of a forward that appends `seq` tokens to `cache` (a zoo.cache.KVCache)."""
        return cls(
            cache_lengths=cache.lengths,
            kv_start=cache.kv_start,
            kv_end=cache.lengths + seq,
            positions=positions,
            inv_freq=inv_freq,
            decode=seq == 1,
        )


# Packing a right-padded encoder batch: its padding rows leave the matmuls, norms and attention.
PACK_MIN_TOKENS = 1024  # smaller batches run padded (packing reads the real token count back)
PACK_TOKEN_MULTIPLE = 128  # packed tokens are rounded up to this (fewer shapes, graph buckets)
PACK_MAX_FILL = 0.9  # pack only when the packed tokens are at most this share of the batch


@dataclass
class PackedRows:
    """The rows of a right-padded batch [B, T] packed one after another: row b's lengths[b]
    real tokens from token first[b], then at least one spare token, up to `tokens`. The spare
    tokens form a row of their own (row B: they attend among themselves, so every packed token
    holds finite values); the last one's output is set to 0 and read back at every padded
    position."""

    tokens: int  # packed tokens: the real ones plus one, rounded up to PACK_TOKEN_MULTIPLE
    max_length: int  # the attention's row length bound (>= every row's length, <= tokens)
    # int64 [2 * tokens + B * row length]: where each packed token comes from in the flattened
    # batch (spare: 0), its position in its row (spare: 0), then for each position of the
    # flattened batch the packed token it reads back (padded: the last, zeroed, token)
    index: torch.Tensor
    # int32 [3, B + 1]: each row's first packed token, its length, and the packed token its
    # pooler reads (the first, kept inside the packed tokens for an empty row); the spare row
    # last
    rows: torch.Tensor

    def token_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(source [tokens], position [tokens], inverse [B * row length]) views of index."""
        t = self.tokens
        return self.index[:t], self.index[t : 2 * t], self.index[2 * t :]


def may_pack(batch: int, seq: int) -> bool:
    """Whether a [batch, seq] batch is large enough to run packed at all: callers ask before
    reading its real token count back (a host sync), packed_tokens decides from it."""
    return batch > 1 and batch * seq >= PACK_MIN_TOKENS


def packed_tokens(batch: int, seq: int, real: int) -> int | None:
    """The tokens a [batch, seq] batch holding `real` real tokens runs packed: the real ones plus
    one spare, rounded up to PACK_TOKEN_MULTIPLE. None where packing does not pay: fewer than
    PACK_MIN_TOKENS tokens, one row, or padding too little."""
    if not may_pack(batch, seq):
        return None
    tokens = -(-(real + 1) // PACK_TOKEN_MULTIPLE) * PACK_TOKEN_MULTIPLE
    return None if tokens > PACK_MAX_FILL * batch * seq else tokens


def pack_rows(lengths: torch.Tensor, tokens: int, padded: int, row_length: int) -> PackedRows:
    """The packing of a batch with these row lengths [B] (each in [0, seq], summing to fewer than
    `tokens`, packed_tokens), held in rows of row_length >= seq tokens, whose graphs pad it to
    `padded` (zoo.graphs.padded_length). Computed where lengths lie, in ops of fixed shapes (a
    CUDA graph captures it and replays it for new lengths). Eager and graphed calls of one batch
    get the same tokens and max_length, so their kernels run the same configs."""
    batch = lengths.numel()
    lengths = lengths.to(torch.int64)
    ends = torch.cumsum(lengths, 0)
    first = ends - lengths
    real = ends[-1:]
    token = torch.arange(tokens, device=lengths.device)
    is_real = token < real
    # each packed token's row: the first whose end lies past it (B for the spare tokens)
    row = torch.searchsorted(ends, token, right=True).clamp_(max=batch - 1)
    position = torch.where(is_real, token - first[row], 0)
    source = torch.where(is_real, row * row_length + position, 0)
    column = torch.arange(row_length, device=lengths.device)
    inverse = torch.where(column < lengths[:, None], first[:, None] + column, tokens - 1)
    index = torch.cat([source, position, inverse.view(-1)])
    first = torch.cat([first, real])
    lengths = torch.cat([lengths, tokens - real])
    rows = torch.stack([first, lengths, first.clamp(max=tokens - 1)]).to(torch.int32)
    # the spare row (at most PACK_TOKEN_MULTIPLE tokens) fits the row length bound too
    max_length = min(max(padded, PACK_TOKEN_MULTIPLE), tokens)
    return PackedRows(tokens, max_length, index, rows)


class SelfAttention(nn.Module):
    """Fused QKV projection -> (q/k norm + rotary + cache write) -> attention -> output projection
    with the residual add fused into its epilogue.

    out_bias: the output projection's bias (None: same as `bias`; Qwen2 has q/k/v biases only).
    window: sliding-window attention over that many keys (None: all). qk_norm_eps: per-head
    RMSNorm of q and k before the rotation, with weights q_norm / k_norm (Qwen3; None: none).
    out: the output projection (None: a Linear; a tensor-parallel model passes its row-split
    projection, and num_heads / num_kv_heads are then this rank's). forward's norm: the RMSNorm
    of x, done by the QKV projection (which may fuse it), with x the un-normalised hidden state.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        bias: bool,
        scale: float,
        causal: bool = True,
        out_bias: bool | None = None,
        window: int | None = None,
        qk_norm_eps: float | None = None,
        out: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.causal = causal
        self.window = window
        self.qkv = Linear(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias)
        if out is None:
            out_bias = bias if out_bias is None else out_bias
            out = Linear(num_heads * head_dim, hidden_size, out_bias)
        self.out = out
        # weight holders: the rotary kernel applies them
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None

    def forward(
        self,
        x: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        inputs: AttentionInputs,
        residual: torch.Tensor,
        residual_scale: float = 1.0,
        norm: RMSNorm | None = None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        qkv = self.qkv(x, norm=norm)  # (B, T, (H + 2 * Hkv) * D)
        q = rope_cache_write(
            qkv,
            k_cache,
            v_cache,
            inputs.cache_lengths,
            num_q_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            positions=inputs.positions,
            inv_freq=inputs.inv_freq,
            **self._qk_norm_args(),
        )  # (B, T, H, D), a view of qkv
        k, v = k_cache.transpose(1, 2), v_cache.transpose(1, 2)  # (B, S, Hkv, D)
        if inputs.decode:
            o = decode_attention(
                q,
                k,
                v,
                scale=self.scale,
                kv_start=inputs.kv_start,
                kv_end=inputs.kv_end,
                window=self.window,
            )
        else:
            o = attention(
                q,
                k,
                v,
                causal=self.causal,
                scale=self.scale,
                kv_start=inputs.kv_start,
                kv_end=inputs.kv_end,
                window=self.window,
            )
        o = o.view(batch, seq, self.num_heads * self.head_dim)
        return self.out(o, residual=residual, alpha=residual_scale)

    def _qk_norm_args(self) -> dict:
        if self.q_norm is None:
            return {}
        return dict(
            q_norm_weight=self.q_norm.weight,
            k_norm_weight=self.k_norm.weight,
            norm_eps=self.q_norm.eps,
        )


def init_random_(model: nn.Module, std: float, generator: torch.Generator | None = None) -> None:
    """Random weights for benchmarks (pretrained=False): N(0, std) matrices and embeddings, unit
    norm weights, zero biases."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, std, generator=generator)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)


def output_rows(
    h: torch.Tensor, last_only: bool, last_index: torch.Tensor | None = None
) -> torch.Tensor:
    """The hidden states [B, T, H] a forward computes logits of: all, the last position ([B, 1,
    H], last_only), or each row's position last_index[b] (int64 [B]: a right-padded prompt)."""
    if last_index is not None:
        return h.gather(1, last_index.view(-1, 1, 1).expand(-1, 1, h.shape[2]))
    return h[:, -1:] if last_only else h
