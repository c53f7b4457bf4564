"""Flash-attention forward (online softmax): causal or bidirectional, key-range mask, GQA, bias.

Layout: q is [B, Tq, Hq, D], k and v are [B, S, Hkv, D], each with any strides except a
contiguous last dim (q may be a slice of a fused QKV output, k/v a [B, Hkv, S, D] cache passed as
`.transpose(1, 2)`). Hq % Hkv == 0 and query head h reads kv head h // (Hq // Hkv). D may be any
size (12, 24, 80, ...): the head dim is padded to a power of two >= 16 and masked.

Mask, per batch row b: key j is visible to query i iff kv_start[b] <= j < kv_end[b] and, when
causal, j <= i + (kv_end[b] - Tq): the causal mask is aligned bottom-right, i.e. the queries are
the last Tq positions of the valid keys (prefill into a cache that already holds tokens). With a
sliding window W (Mistral, Qwen2), also j > i + (kv_end[b] - Tq) - W: a query sees itself and
the W - 1 keys before it. A query row with no visible key outputs exactly 0. The optional
additive bias (T5 relative positions) is [B, Hq, Tq, S] with any strides (broadcast dims get
stride 0) and is added to scale * q.k.

Softmax and accumulation are fp32 (exp2 with log2(e) folded into the scale); the output is in q's
dtype. One program handles BLOCK_M queries of one (batch, head); key blocks entirely outside
[kv_start, kv_end), above the causal diagonal or below the window are skipped, and blocks
entirely visible run without the element-wise mask.
"""

import torch
import triton
import triton.language as tl

from kernels.launch import KernelLaunch, PlanCache, tensor_key
from kernels.softmax import LOG2E, online_softmax_step
from kernels.utils import (
    INTERPRET,
    check_attention_inputs,
    check_last_dim_contiguous,
    check_window,
    dot_precision,
    max_shared_memory,
    next_pow2,
    pdl_meta,
    wait_for_previous_grid,
)


@triton.jit
def _attn_block_loop(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    bias_base,
    offs_m,
    offs_d,
    mask_m,
    mask_d,
    start,
    end,
    kv_lo,
    kv_hi,
    causal_shift,
    window_shift,
    k_stride_s,
    v_stride_s,
    bias_stride_m,
    bias_stride_n,
    qk_scale,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update over key blocks [start, end) (start a multiple of BLOCK_N).

    MASKED blocks apply the key-range, causal and window masks element-wise; unmasked blocks are
    known to be fully visible to every query row of this program."""
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            mask_n = (offs_n >= kv_lo) & (offs_n < kv_hi)
        else:
            mask_n = offs_n < kv_hi
        # K loaded transposed, [BLOCK_D, BLOCK_N]; keys outside [kv_lo, kv_hi) read as 0
        k = tl.load(
            k_base + offs_n[None, :] * k_stride_s + offs_d[:, None],
            mask=mask_d[:, None] & mask_n[None, :],
            other=0.0,
        )
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:
            bias = tl.load(
                bias_base + offs_m[:, None] * bias_stride_m + offs_n[None, :] * bias_stride_n,
                mask=mask_m[:, None] & mask_n[None, :],
                other=0.0,
            )
            s += bias.to(tl.float32) * LOG2E
        if MASKED:
            visible = mask_n[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
            if HAS_WINDOW:
                visible = visible & (offs_n[None, :] > offs_m[:, None] + window_shift)
            s = tl.where(visible, s, float("-inf"))
        acc, m_i, l_i = online_softmax_step(
            acc,
            m_i,
            l_i,
            s,
            v_base + offs_n[:, None] * v_stride_s + offs_d[None, :],
            mask_n[:, None] & mask_d[None, :],
            DOT_PRECISION,
        )
    return acc, m_i, l_i


# The bias strides are not specialized: Triton would mark a row stride divisible by 16 (a
# padded, bucket-sized call) and vectorize the bias load, and the layout of that load decides
# the layout of the row max and row sum after `s += bias`, so their summation order, and the
# last bits of the output, would differ from the unpadded call's (odd lengths). One compiled
# variant keeps a CUDA graph's padded call bitwise equal to the eager one.
@triton.jit(do_not_specialize=["bias_stride_b", "bias_stride_h", "bias_stride_m"])
def _attn_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    bias_ptr,
    kv_start_ptr,
    kv_end_ptr,
    seq_offsets_ptr,
    q_stride_b,
    q_stride_t,
    q_stride_h,
    k_stride_b,
    k_stride_s,
    k_stride_h,
    v_stride_b,
    v_stride_s,
    v_stride_h,
    out_stride_b,
    out_stride_t,
    out_stride_h,
    bias_stride_b,
    bias_stride_h,
    bias_stride_m,
    bias_stride_n,
    Tq,
    S,
    Hq,
    GROUP,
    D,
    qk_scale,
    window,
    TQ_BUCKET,  # autotune key only
    S_BUCKET,  # autotune key only
    BH_BUCKET,  # autotune key only
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_KV_START: tl.constexpr,
    HAS_KV_END: tl.constexpr,
    HAS_SEQ_OFFSETS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous_grid(USE_PDL)
    # one grid axis over (query block, batch * head): no 65535 limit on either count
    pid = tl.program_id(0).to(tl.int64)
    num_m = tl.cdiv(Tq, BLOCK_M)
    if CAUSAL:
        # the heads' last query blocks first, their first blocks last: the programs that visit
        # the most keys start first and the shortest fill the SMs' last round
        num_bh = tl.num_programs(0) // num_m
        pid_bh = pid % num_bh
        pid_m = num_m - 1 - pid // num_bh
    else:
        # a head's query blocks side by side: they read its keys and values while L2 holds them
        pid_m = pid % num_m
        pid_bh = pid // num_m
    b = pid_bh // Hq
    h = pid_bh % Hq
    h_kv = h // GROUP

    # visible key range of this batch row, clipped to [0, S]
    kv_lo = 0
    kv_hi = S
    if HAS_KV_START:
        kv_lo = tl.maximum(tl.load(kv_start_ptr + b).to(tl.int32), 0)
    if HAS_KV_END:
        kv_hi = tl.minimum(tl.load(kv_end_ptr + b).to(tl.int32), S)
    causal_shift = kv_hi - Tq

    m_start = pid_m * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < Tq
    mask_d = offs_d < D
    # packed sequences: row b's tokens start at token seq_offsets[b] of q, k, v and out, and
    # its queries are its kv_end[b] tokens; a block past them has no key to visit
    first_token = 0
    if HAS_SEQ_OFFSETS:
        first_token = tl.load(seq_offsets_ptr + b).to(tl.int64)
        mask_m = offs_m < kv_hi
        kv_hi = tl.where(m_start < kv_hi, kv_hi, kv_lo)

    q = tl.load(
        q_ptr + b * q_stride_b + h * q_stride_h + (first_token + offs_m[:, None]) * q_stride_t
        + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )  # fmt: skip
    k_base = k_ptr + b * k_stride_b + h_kv * k_stride_h + first_token * k_stride_s
    v_base = v_ptr + b * v_stride_b + h_kv * v_stride_h + first_token * v_stride_s
    bias_base = bias_ptr + b * bias_stride_b + h * bias_stride_h

    # key blocks to visit: [start, end); of those, [full_lo, full_hi) are visible to every row
    start = (kv_lo // BLOCK_N) * BLOCK_N
    end = kv_hi
    full_lo = tl.cdiv(kv_lo, BLOCK_N) * BLOCK_N
    full_hi = kv_hi
    window_shift = causal_shift  # with a window, key j is in query i's iff j > i + window_shift
    if CAUSAL:
        m_last = tl.minimum(m_start + BLOCK_M, Tq)  # one past this block's last real row
        end = tl.minimum(end, m_last + causal_shift).to(tl.int32)
        full_hi = tl.minimum(full_hi, m_start + 1 + causal_shift).to(tl.int32)
        if HAS_WINDOW:
            # blocks below the first row's window are skipped; blocks inside the last row's
            # window are visible to every row
            window_shift = causal_shift - window
            first_key = tl.maximum(kv_lo, m_start + 1 + window_shift)
            start = ((first_key // BLOCK_N) * BLOCK_N).to(tl.int32)
            full_lo = tl.maximum(kv_lo, m_last + window_shift)
            full_lo = (tl.cdiv(full_lo, BLOCK_N) * BLOCK_N).to(tl.int32)
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    mid_lo = tl.maximum(tl.minimum(full_lo, end), start)
    mid_hi = tl.maximum(full_hi, mid_lo)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # leading blocks: kv_start not block aligned, or the window's lower edge
    acc, m_i, l_i = _attn_block_loop(
        acc, m_i, l_i, q, k_base, v_base, bias_base, offs_m, offs_d, mask_m, mask_d,
        start, mid_lo, kv_lo, kv_hi, causal_shift, window_shift, k_stride_s, v_stride_s,
        bias_stride_m, bias_stride_n, qk_scale,
        True, CAUSAL, HAS_WINDOW, HAS_BIAS, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    # interior blocks: no element-wise mask
    acc, m_i, l_i = _attn_block_loop(
        acc, m_i, l_i, q, k_base, v_base, bias_base, offs_m, offs_d, mask_m, mask_d,
        mid_lo, mid_hi, kv_lo, kv_hi, causal_shift, window_shift, k_stride_s, v_stride_s,
        bias_stride_m, bias_stride_n, qk_scale,
        False, CAUSAL, HAS_WINDOW, HAS_BIAS, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    # trailing blocks: kv_end boundary, the causal diagonal and the window's lower edge
    acc, m_i, l_i = _attn_block_loop(
        acc, m_i, l_i, q, k_base, v_base, bias_base, offs_m, offs_d, mask_m, mask_d,
        mid_hi, end, kv_lo, kv_hi, causal_shift, window_shift, k_stride_s, v_stride_s,
        bias_stride_m, bias_stride_n, qk_scale,
        True, CAUSAL, HAS_WINDOW, HAS_BIAS, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip

    # rows with no visible key have l = 0 and acc = 0: output exactly 0
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(
        out_ptr + b * out_stride_b + h * out_stride_h + (first_token + offs_m[:, None]) * out_stride_t
        + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )  # fmt: skip


def _smem_bytes(config, block_d: int, elem_size: int) -> int:
    """Rough shared memory of a config: the Q tile plus `num_stages` K and V tiles."""
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    return elem_size * block_d * (bm + 2 * config.num_stages * bn)


def _prune_configs(configs, named_args, **kwargs):
    """Drop blocks larger than the (bucketed) problem and configs that cannot fit in shared
    memory (fp32 or D=256 with big blocks): fewer compilations per autotune key."""
    tq_bucket, s_bucket = named_args["TQ_BUCKET"], named_args["S_BUCKET"]
    block_d = kwargs["BLOCK_D"]
    elem_size = named_args["q_ptr"].element_size()
    smem_limit = max_shared_memory(named_args["q_ptr"].device)
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] <= max(16, tq_bucket)
        and c.kwargs["BLOCK_N"] <= max(32, s_bucket)
        and _smem_bytes(c, block_d, elem_size) <= smem_limit
    ]
    return kept or [min(configs, key=lambda c: _smem_bytes(c, block_d, elem_size))]


def _gpu_configs():
    shapes = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
        (128, 64, 8, 3),
        (128, 128, 8, 3),
        (128, 64, 4, 3),
        (128, 64, 4, 4),
        (128, 128, 8, 4),
        (64, 64, 4, 4),
        (64, 64, 4, 3),
        (64, 128, 4, 3),
        (64, 32, 4, 2),
        (32, 64, 4, 3),
        (16, 64, 4, 3),
        (16, 32, 4, 2),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in shapes
    ]


if INTERPRET:
    _attn_fwd = _attn_fwd_kernel
else:
    _attn_fwd = triton.autotune(
        configs=_gpu_configs(),
        key=[
            "TQ_BUCKET",
            "S_BUCKET",
            "BH_BUCKET",
            "BLOCK_D",
            "CAUSAL",
            "HAS_WINDOW",
            "HAS_BIAS",
            "HAS_SEQ_OFFSETS",
        ],  # fmt: skip
        prune_configs_by={"early_config_prune": _prune_configs},
    )(_attn_fwd_kernel)


def _bucket(n: int) -> int:
    return min(max(next_pow2(n), 16), 4096)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    window: int | None = None,
    seq_offsets: torch.Tensor | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """softmax(scale * q k^T + bias, masked) v, per batch row and head.

    q: [B, Tq, Hq, D]; k, v: [B, S, Hkv, D] (any strides, contiguous last dim; Hq % Hkv == 0).
    kv_start / kv_end: int32 [B] on q's device (None: 0 and S); key j is visible to query i iff
    kv_start[b] <= j < kv_end[b] and, if causal, j <= i + kv_end[b] - Tq. bias: broadcastable to
    [B, Hq, Tq, S], fp32 or q's dtype. window (causal only; None: unlimited): a sliding window
    of that many keys, the query's own included: key j is visible to query i only if
    j > i + kv_end[b] - Tq - window (HF's sliding_window). Returns [B, Tq, Hq, D] in q's dtype (or
    fills `out`); queries that see no key get 0.

    Packed sequences (seq_offsets int32 [B], with max_length): q, k, v are [1, N, H, D], the
    tokens of B rows one after another; row b's are the kv_end[b] <= max_length tokens from
    token seq_offsets[b], and each sees its own row's (not causal; no kv_start, bias or window).
    Returns [1, N, Hq, D] (or fills `out`); tokens of no row are not written.
    """
    if torch.compiler.is_compiling():
        result = torch.ops.zoo.attention(
            q, k, v, causal, scale, kv_start, kv_end, bias, window, seq_offsets, max_length
        )
        return result if out is None else out.copy_(result)
    packed_out = None
    if seq_offsets is not None:
        q, k, v, out, packed_out = _row_views(q, k, v, causal, kv_start, kv_end, bias, out,
                                              window, seq_offsets, max_length)  # fmt: skip
    key = (
        bool(causal),
        window,
        tensor_key(q),
        tensor_key(k),
        tensor_key(v),
        tensor_key(kv_start),
        tensor_key(kv_end),
        tensor_key(bias),
        tensor_key(out),
        tensor_key(seq_offsets),
    )
    plan = _plans.get(key)
    if plan is None:
        plan = _plans.put(
            key, _plan(q, k, v, causal, kv_start, kv_end, bias, out, window, seq_offsets)
        )
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if plan is not _EMPTY:
        _launch(plan, q, k, v, scale, kv_start, kv_end, bias, out, window, seq_offsets)
    return out if packed_out is None else packed_out


def _row_views(q, k, v, causal, kv_start, kv_end, bias, out, window, seq_offsets, max_length):
    """Packed [1, N, H, D] operands as [B, max_length, H, D] views of batch stride 0 (the kernel
    adds each row's first token), and the packed output with its view."""
    if causal or kv_start is not None or bias is not None or window is not None:
        raise ValueError("seq_offsets: packed rows take neither causal, kv_start, bias nor window")
    if kv_end is None:
        raise ValueError("seq_offsets: packed rows need their lengths (kv_end)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4 or t.shape[0] != 1 or t.shape[1] != q.shape[1]:
            raise ValueError(
                f"{name}: packed rows expected [1, {q.shape[1]}, H, D], got {tuple(t.shape)}"
            )
    batch, tokens = seq_offsets.shape[0], q.shape[1]
    if (
        seq_offsets.dim() != 1
        or seq_offsets.dtype != torch.int32
        or not seq_offsets.is_contiguous()
    ):
        raise ValueError("seq_offsets: expected a contiguous int32 tensor of shape [B]")
    if seq_offsets.device != q.device:
        raise ValueError(f"seq_offsets: on {seq_offsets.device}, q on {q.device}")
    if (
        isinstance(max_length, bool)
        or not isinstance(max_length, int)
        or not 1 <= max_length <= tokens
    ):
        raise ValueError(
            f"max_length: expected an int in [1, {tokens}] (the packed tokens), got {max_length!r}"
        )
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape:
        raise ValueError(f"out: expected {tuple(q.shape)}, got {tuple(out.shape)}")

    def rows(t):
        return t.as_strided((batch, max_length, *t.shape[2:]), (0, *t.stride()[1:]))

    return rows(q), rows(k), rows(v), rows(out), out


# Launch plans (see kernels/launch.py): the checks, blocks and config of one input signature.
_plans = PlanCache()
_EMPTY = object()  # the plan of an empty output: nothing to launch


class _Plan:
    __slots__ = ("meta", "grid", "launch", "no_lengths", "sizes", "buckets")

    def __init__(self, meta, grid, launch, no_lengths, sizes, buckets) -> None:
        self.meta = meta  # constexprs and launch options (without the tuned config)
        self.grid = grid  # grid(config meta)
        self.launch = launch  # KernelLaunch once the config is known
        # int32 stand-in for an absent kv_start / kv_end (never read): the autotuner's key holds
        # every tensor argument's dtype, so a call without lengths shares the config of a call
        # with them (a graphed call passes kv_end where the eager one had none)
        self.no_lengths = no_lengths
        self.sizes = sizes  # the strides and sizes the signature fixes, in the kernel's order
        self.buckets = buckets  # the autotune key's length buckets


def _plan(q, k, v, causal, kv_start, kv_end, bias, out, window, seq_offsets):
    """Checks the inputs of a new signature and fixes its launch."""
    check_attention_inputs(q, k, v, kv_start, kv_end, bias)
    check_window(window, causal)
    B, Tq, Hq, D = q.shape
    if out is not None:
        if out.shape != (B, Tq, Hq, D) or out.dtype != q.dtype:
            raise ValueError(
                f"out: expected {(B, Tq, Hq, D)} {q.dtype}, got {tuple(out.shape)} {out.dtype}"
            )
        check_last_dim_contiguous("out", out)
    if q.numel() == 0:
        return _EMPTY
    meta = dict(
        CAUSAL=bool(causal),
        HAS_WINDOW=window is not None,
        HAS_BIAS=bias is not None,
        HAS_KV_START=kv_start is not None,
        HAS_KV_END=kv_end is not None,
        HAS_SEQ_OFFSETS=seq_offsets is not None,
        BLOCK_D=max(next_pow2(D), 16),
        DOT_PRECISION=dot_precision(q.dtype),
        **pdl_meta(q.device, B * Tq),
    )
    no_lengths = torch.zeros(1, dtype=torch.int32, device=q.device)
    _, S, Hkv, _ = k.shape
    out_strides = out.stride() if out is not None else (Tq * Hq * D, Hq * D, D)  # empty_like
    bias_strides = bias.expand(B, Hq, Tq, S).stride() if bias is not None else (0, 0, 0, 0)
    sizes = (
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out_strides[:3], *bias_strides,
        Tq, S, Hq, Hq // Hkv, D,
    )  # fmt: skip
    # the grid spans B * Hq heads: blocks tuned for one sequence leave SMs idle at 32
    buckets = (_bucket(Tq), _bucket(S), _bucket(B * Hq))
    if INTERPRET:
        # few, large programs: the interpreter pays per program instance
        block_m = min(max(next_pow2(Tq), 16), 32)
        block_n = 32
        grid = (triton.cdiv(Tq, block_m) * B * Hq,)
        launch = KernelLaunch(
            _attn_fwd_kernel, grid, {**meta, "BLOCK_M": block_m, "BLOCK_N": block_n}
        )
        return _Plan(meta, None, launch, no_lengths, sizes, buckets)
    grid = lambda m: (triton.cdiv(Tq, m["BLOCK_M"]) * B * Hq,)  # noqa: E731
    return _Plan(meta, grid, None, no_lengths, sizes, buckets)


def _launch(plan: _Plan, q, k, v, scale, kv_start, kv_end, bias, out, window, seq_offsets) -> None:
    args = (
        q, k, v, out,
        bias if bias is not None else q,
        kv_start if kv_start is not None else plan.no_lengths,
        kv_end if kv_end is not None else plan.no_lengths,
        seq_offsets if seq_offsets is not None else plan.no_lengths,
        *plan.sizes,
        float(scale) * LOG2E.value,
        window or 0,
        *plan.buckets,
    )  # fmt: skip
    if plan.launch is not None:
        plan.launch(*args)
        return
    # the signature's first call: the autotuner picks (or recalls) the config and runs it
    _attn_fwd[plan.grid](*args, **plan.meta)
    config = _attn_fwd.best_config
    plan.launch = KernelLaunch(
        _attn_fwd_kernel, plan.grid(config.kwargs), {**plan.meta, **config.all_kwargs()}
    )


# torch.compile sees the launcher as a custom op (Triton's launch is not traceable).
@torch.library.custom_op("zoo::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    kv_start: torch.Tensor | None,
    kv_end: torch.Tensor | None,
    bias: torch.Tensor | None,
    window: int | None,
    seq_offsets: torch.Tensor | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    return attention(
        q,
        k,
        v,
        causal=causal,
        scale=scale,
        kv_start=kv_start,
        kv_end=kv_end,
        bias=bias,
        window=window,
        seq_offsets=seq_offsets,
        max_length=max_length,
    )


@_attention_op.register_fake
def _(q, k, v, causal, scale, kv_start, kv_end, bias, window, seq_offsets=None, max_length=None):
    return q.new_empty(q.shape)
