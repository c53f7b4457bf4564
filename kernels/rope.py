"""Rotary position embedding (HF rotate-half layout) fused with the KV-cache write.

Input is the fused QKV projection qkv [B, T, (Hq + 2 * Hkv) * D] (last dim contiguous, any batch and
token strides): per token the Hq query heads, then Hkv key heads, then Hkv value heads. One program
handles one kv head of one token and the Hq / Hkv query heads that attend to it (all heads where
Hq is not a multiple of Hkv):
  - the query heads are rotated in place (the caller uses the q slice of qkv as the query),
  - the key heads are rotated and written to k_cache[b, :, slot], values copied to v_cache[b, :, slot],
    where slot = cache_lengths[b] + t, so decode steps need no host-side index (CUDA-graph safe).
Caches are [B, Hkv, S, D] with a contiguous last dim. Without inv_freq (GPT-2, T5) nothing is
rotated and the kernel only writes the cache. D must be even; it need not be a power of two.

With q_norm / k_norm weights (Qwen3) each query and key head is RMS-normalised over its D values
before it is rotated, as HF's Qwen3Attention does: statistics in fp32, the normalised head cast
to the activation dtype, then multiplied by the weight and rounded again (Qwen3RMSNorm).

Numerics: angle = position * inv_freq in fp32 (HF computes the same product in fp32); cos and sin
are rounded to the activation dtype before use, as HF's LlamaRotaryEmbedding returns them.
"""

import torch
import triton
import triton.language as tl

from kernels.launch import KernelLaunch, PlanCache, tensor_key
from kernels.utils import (
    check_last_dim_contiguous,
    next_pow2,
    pdl_meta,
    wait_for_previous_grid,
)


@triton.jit
def _head_rms_norm(
    x1, x2, weight_ptr, offs_half, mask_half, eps, HEAD_DIM: tl.constexpr, dtype: tl.constexpr
):
    """RMSNorm of heads given as halves x1, x2 [BLOCK_H, BLOCK_HALF] (fp32, 0 where masked), as
    HF's Qwen3RMSNorm: `weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)`, rounded to dtype."""
    HALF: tl.constexpr = HEAD_DIM // 2
    variance = (tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / HEAD_DIM
    inv_rms = tl.math.rsqrt(variance + eps)[:, None]
    w1 = tl.load(weight_ptr + offs_half, mask=mask_half, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(weight_ptr + HALF + offs_half, mask=mask_half, other=0.0).to(tl.float32)[None, :]
    y1 = (w1 * (x1 * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    y2 = (w2 * (x2 * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    return y1, y2


@triton.jit
def _rope_cache_kernel(
    qkv_ptr,
    positions_ptr,
    inv_freq_ptr,
    cache_lengths_ptr,
    k_cache_ptr,
    v_cache_ptr,
    q_norm_ptr,
    k_norm_ptr,
    qkv_stride_b,
    qkv_stride_t,
    positions_stride_b,
    positions_stride_t,
    cache_stride_b,
    cache_stride_h,
    cache_stride_s,
    T,
    S,
    attention_scaling,
    norm_eps,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    HAS_QK_NORM: tl.constexpr,
    HEAD_GROUPS: tl.constexpr,  # programs per token, each NUM_Q_HEADS / HEAD_GROUPS query heads
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous_grid(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)  # its query heads, and the kv heads they attend to
    Q_HEADS: tl.constexpr = NUM_Q_HEADS // HEAD_GROUPS
    KV_HEADS: tl.constexpr = NUM_KV_HEADS // HEAD_GROUPS
    b = token // T
    t = token % T
    HALF: tl.constexpr = HEAD_DIM // 2
    row_ptr = qkv_ptr + b * qkv_stride_b + t * qkv_stride_t
    slot = tl.load(cache_lengths_ptr + b).to(tl.int64) + t

    offs_h = tl.arange(0, BLOCK_H)
    offs_half = tl.arange(0, BLOCK_HALF)
    mask_half = offs_half < HALF
    q_heads = group * Q_HEADS + offs_h
    kv_heads = group * KV_HEADS + offs_h
    k_heads_ptr = row_ptr + NUM_Q_HEADS * HEAD_DIM
    mask_k = (offs_h[:, None] < KV_HEADS) & mask_half[None, :]
    # a full-tile mask (the interpreter rejects scalar masks mixed into tensor masks)
    slot_ok = (tl.zeros([BLOCK_H, 1], dtype=tl.int64) + slot) < S
    k_in = k_heads_ptr + kv_heads[:, None] * HEAD_DIM + offs_half[None, :]
    k_out = (
        k_cache_ptr
        + b * cache_stride_b
        + kv_heads[:, None] * cache_stride_h
        + slot * cache_stride_s
    )
    k_out += offs_half[None, :]

    if HAS_ROPE:
        position = tl.load(positions_ptr + b * positions_stride_b + t * positions_stride_t)
        inv_freq = tl.load(inv_freq_ptr + offs_half, mask=mask_half, other=0.0)
        angle = position.to(tl.float32) * inv_freq
        dtype = qkv_ptr.dtype.element_ty
        cos = (tl.cos(angle) * attention_scaling).to(dtype).to(tl.float32)[None, :]
        sin = (tl.sin(angle) * attention_scaling).to(dtype).to(tl.float32)[None, :]

        # queries, rotated in place: out = x * cos + rotate_half(x) * sin
        mask_q = (offs_h[:, None] < Q_HEADS) & mask_half[None, :]
        q1_ptr = row_ptr + q_heads[:, None] * HEAD_DIM + offs_half[None, :]
        q1 = tl.load(q1_ptr, mask=mask_q, other=0.0).to(tl.float32)
        q2 = tl.load(q1_ptr + HALF, mask=mask_q, other=0.0).to(tl.float32)
        if HAS_QK_NORM:
            q1, q2 = _head_rms_norm(
                q1, q2, q_norm_ptr, offs_half, mask_half, norm_eps, HEAD_DIM, dtype
            )
        tl.store(q1_ptr, (q1 * cos - q2 * sin).to(dtype), mask=mask_q)
        tl.store(q1_ptr + HALF, (q2 * cos + q1 * sin).to(dtype), mask=mask_q)

        k1 = tl.load(k_in, mask=mask_k, other=0.0).to(tl.float32)
        k2 = tl.load(k_in + HALF, mask=mask_k, other=0.0).to(tl.float32)
        if HAS_QK_NORM:
            k1, k2 = _head_rms_norm(
                k1, k2, k_norm_ptr, offs_half, mask_half, norm_eps, HEAD_DIM, dtype
            )
        k_cache_dtype = k_cache_ptr.dtype.element_ty
        tl.store(k_out, (k1 * cos - k2 * sin).to(k_cache_dtype), mask=mask_k & slot_ok)
        tl.store(k_out + HALF, (k2 * cos + k1 * sin).to(k_cache_dtype), mask=mask_k & slot_ok)
    else:
        k1 = tl.load(k_in, mask=mask_k, other=0.0)
        k2 = tl.load(k_in + HALF, mask=mask_k, other=0.0)
        tl.store(k_out, k1.to(k_cache_ptr.dtype.element_ty), mask=mask_k & slot_ok)
        tl.store(k_out + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=mask_k & slot_ok)

    offs_d = tl.arange(0, BLOCK_D)
    mask_v = (offs_h[:, None] < KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    v_in = k_heads_ptr + NUM_KV_HEADS * HEAD_DIM + kv_heads[:, None] * HEAD_DIM + offs_d[None, :]
    v_out = (
        v_cache_ptr
        + b * cache_stride_b
        + kv_heads[:, None] * cache_stride_h
        + slot * cache_stride_s
    )
    v = tl.load(v_in, mask=mask_v, other=0.0)
    tl.store(v_out + offs_d[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=mask_v & slot_ok)


def rope_cache_write(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lengths: torch.Tensor,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    positions: torch.Tensor | None = None,
    inv_freq: torch.Tensor | None = None,
    attention_scaling: float = 1.0,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """Rotate q and k of a fused QKV projection and append k, v to the cache.

    qkv: [B, T, (Hq + 2 * Hkv) * D]; k_cache, v_cache: [B, Hkv, S, D]; cache_lengths: [B] int32,
    the slot of token t of row b is cache_lengths[b] + t (slots >= S are not written; callers
    check capacity). positions: [B, T] integer positions (needed with inv_freq); inv_freq: [D / 2]
    fp32 (None: no rotation). q_norm_weight, k_norm_weight: [D] (both or neither, with
    inv_freq): RMSNorm (epsilon norm_eps) of every query and key head before the rotation (Qwen3).
    Returns the query view [B, T, Hq, D] of qkv (rotated in place).
    """
    args = (
        qkv, k_cache, v_cache, cache_lengths, positions, inv_freq, q_norm_weight, k_norm_weight,
        num_q_heads, num_kv_heads, head_dim, attention_scaling, norm_eps,
    )  # fmt: skip
    if torch.compiler.is_compiling():
        torch.ops.zoo.rope_cache_write(*args)
        batch, seq, _ = qkv.shape
        return qkv.view(batch, seq, num_q_heads + 2 * num_kv_heads, head_dim)[:, :, :num_q_heads]
    query_view = _rope_cache_write(*args)
    return qkv.as_strided(*query_view)  # one call where view and slice take two


_plans = PlanCache()


def _plan(qkv, k_cache, v_cache, cache_lengths, positions, inv_freq, q_norm_weight,
          k_norm_weight, num_q_heads, num_kv_heads, head_dim) -> tuple:  # fmt: skip
    """Checks the inputs of a new signature and fixes its launch: (KernelLaunch, the integer
    arguments its shapes and strides fix, the query view's size and strides)."""
    if qkv.dim() != 3:
        raise ValueError(f"qkv: expected [B, T, (Hq + 2 * Hkv) * D], got shape {tuple(qkv.shape)}")
    batch, seq, width = qkv.shape
    if width != (num_q_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(
            f"qkv: last dim {width} != (num_q_heads + 2 * num_kv_heads) * head_dim = "
            f"{(num_q_heads + 2 * num_kv_heads) * head_dim}"
        )
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    expected_cache = (batch, num_kv_heads, k_cache.shape[2], head_dim)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if tuple(cache.shape) != expected_cache:
            raise ValueError(f"{name}: expected shape {expected_cache}, got {tuple(cache.shape)}")
        check_last_dim_contiguous(name, cache)
    if k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same strides")
    if cache_lengths.shape != (batch,):
        raise ValueError(
            f"cache_lengths: expected shape ({batch},), got {tuple(cache_lengths.shape)}"
        )
    check_last_dim_contiguous("qkv", qkv)
    has_rope = inv_freq is not None
    if has_rope:
        if positions is None or positions.shape != (batch, seq):
            got = None if positions is None else tuple(positions.shape)
            raise ValueError(f"positions: expected shape ({batch}, {seq}), got {got}")
        if inv_freq.shape != (head_dim // 2,) or inv_freq.dtype != torch.float32:
            raise ValueError(
                f"inv_freq: expected fp32 of shape ({head_dim // 2},), "
                f"got {inv_freq.dtype} {tuple(inv_freq.shape)}"
            )
    has_qk_norm = q_norm_weight is not None or k_norm_weight is not None
    if has_qk_norm:
        for name, weight in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
            if weight is None or weight.shape != (head_dim,) or not weight.is_contiguous():
                got = None if weight is None else tuple(weight.shape)
                raise ValueError(f"{name}: expected a contiguous ({head_dim},) tensor, got {got}")
        if not has_rope:
            raise ValueError("q_norm_weight / k_norm_weight are applied with rotary (inv_freq)")
    # one program per kv head of each token (with its query heads): at batch 1 one program
    # for all heads would leave the rest of the GPU idle
    head_groups = num_kv_heads if num_kv_heads and num_q_heads % num_kv_heads == 0 else 1
    meta = {
        "NUM_Q_HEADS": num_q_heads,
        "NUM_KV_HEADS": num_kv_heads,
        "HEAD_DIM": head_dim,
        "HAS_ROPE": has_rope,
        "HAS_QK_NORM": has_qk_norm,
        "HEAD_GROUPS": head_groups,
        "BLOCK_H": next_pow2(max(num_q_heads, num_kv_heads) // head_groups),
        "BLOCK_HALF": next_pow2(head_dim // 2),
        "BLOCK_D": next_pow2(head_dim),
        "num_warps": 4,
        **pdl_meta(qkv.device, batch * seq),
    }
    positions_strides = positions.stride() if has_rope else (0, 0)
    fixed = (*qkv.stride()[:2], *positions_strides, *k_cache.stride()[:3], seq, k_cache.shape[2])
    query_view = ((batch, seq, num_q_heads, head_dim), (*qkv.stride()[:2], head_dim, 1))
    launch = KernelLaunch(_rope_cache_kernel, (batch * seq, head_groups), meta)
    return launch, fixed, query_view


def _rope_cache_write(qkv, k_cache, v_cache, cache_lengths, positions, inv_freq, q_norm_weight,
                      k_norm_weight, num_q_heads, num_kv_heads, head_dim, attention_scaling,
                      norm_eps) -> tuple:  # fmt: skip
    """Launch; returns the size and strides of the query view of qkv."""
    key = (
        num_q_heads,
        num_kv_heads,
        head_dim,
        tensor_key(qkv),
        tensor_key(k_cache),
        tensor_key(v_cache),
        tensor_key(cache_lengths),
        tensor_key(positions),
        tensor_key(inv_freq),
        tensor_key(q_norm_weight),
        tensor_key(k_norm_weight),
    )
    plan = _plans.get(key)
    if plan is None:
        plan = _plans.put(
            key,
            _plan(qkv, k_cache, v_cache, cache_lengths, positions, inv_freq, q_norm_weight,
                  k_norm_weight, num_q_heads, num_kv_heads, head_dim),
        )  # fmt: skip
    launch, fixed, query_view = plan
    if inv_freq is None:  # pointers the kernel does not read
        positions = inv_freq = cache_lengths
    has_qk_norm = q_norm_weight is not None
    launch(
        qkv,
        positions,
        inv_freq,
        cache_lengths,
        k_cache,
        v_cache,
        q_norm_weight if has_qk_norm else qkv,
        k_norm_weight if has_qk_norm else qkv,
        *fixed,  # qkv, positions and cache strides, T, S
        float(attention_scaling),
        float(norm_eps),
    )
    return query_view


# torch.compile sees the launch as a custom op that rotates q and k in qkv and writes the caches;
# the query view is taken outside it (a custom op may not return a view of its input).
@torch.library.custom_op("zoo::rope_cache_write", mutates_args=("qkv", "k_cache", "v_cache"))
def _rope_cache_write_op(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lengths: torch.Tensor,
    positions: torch.Tensor | None,
    inv_freq: torch.Tensor | None,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    attention_scaling: float,
    norm_eps: float,
) -> None:
    _rope_cache_write(
        qkv, k_cache, v_cache, cache_lengths, positions, inv_freq, q_norm_weight, k_norm_weight,
        num_q_heads, num_kv_heads, head_dim, attention_scaling, norm_eps,
    )  # fmt: skip


@_rope_cache_write_op.register_fake
def _(qkv, k_cache, v_cache, cache_lengths, positions, inv_freq, *weights_sizes_and_scales):
    return None
