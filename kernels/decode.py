"""Decode attention over a KV cache (one new query per row): split-KV / flash-decoding.

Layout: q is [B, 1, Hq, D], k and v are [B, S_max, Hkv, D] (any strides, contiguous last dim; the
cache is usually stored [B, Hkv, S_max, D] and passed as `.transpose(1, 2)`). Hq % Hkv == 0; D may
be any size (padded to a power of two >= 16 and masked). Key j is visible iff
kv_start[b] <= j < kv_end[b] (and, with a sliding window W, j >= kv_end[b] - W); kv_start /
kv_end are int32 [B] tensors read by the kernel.
The optional bias is [B, Hq, 1, S_max] with any strides, added to the scaled scores.

CUDA-graph safe: the grid (B * Hkv, num_splits) and num_splits depend only on shapes and the
device, never on the values in kv_start / kv_end; each split takes its share of the row's actual
range [kv_start, kv_end) (possibly empty) inside the kernel. One program handles all Hq / Hkv
query heads of a kv head ([GROUP_PAD >= 16, BLOCK_D] query tile), so K and V are read once per
group. A second kernel merges the splits' partial (max, sum, acc); with one split the first
kernel writes the output directly. Rows with no visible key output 0.
"""

import torch
import triton
import triton.language as tl

import kernels.utils
from kernels.launch import KernelLaunch, PlanCache, tensor_key
from kernels.softmax import LOG2E, online_softmax_step
from kernels.utils import (
    INTERPRET,
    check_attention_inputs,
    check_last_dim_contiguous,
    check_window,
    dot_precision,
    next_pow2,
    num_sms,
    pdl_meta,
    wait_for_previous_grid,
)


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bias_ptr,
    kv_start_ptr,
    kv_end_ptr,
    out_ptr,
    part_ptr,
    part_rows,
    q_stride_b,
    q_stride_h,
    k_stride_b,
    k_stride_s,
    k_stride_h,
    v_stride_b,
    v_stride_s,
    v_stride_h,
    bias_stride_b,
    bias_stride_h,
    bias_stride_n,
    out_stride_b,
    out_stride_h,
    S,
    Hq,
    Hkv,
    GROUP,
    D,
    qk_scale,
    window,
    NUM_SPLITS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_KV_START: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous_grid(USE_PDL)
    pid_bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hkv
    h_kv = pid_bh % Hkv

    kv_lo = 0
    if HAS_KV_START:
        kv_lo = tl.maximum(tl.load(kv_start_ptr + b).to(tl.int32), 0)
    kv_hi = tl.minimum(tl.load(kv_end_ptr + b).to(tl.int32), S)
    if HAS_WINDOW:
        # the query sits at slot kv_hi - 1 and sees the window keys j > kv_hi - 1 - window
        kv_lo = tl.maximum(kv_lo, kv_hi - window)
    # this split's share of [kv_lo, kv_hi), in whole blocks; trailing splits may be empty
    n_keys = tl.maximum(kv_hi - kv_lo, 0)
    chunk = tl.cdiv(tl.cdiv(n_keys, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = kv_lo + split * chunk
    hi = tl.minimum(lo + chunk, kv_hi)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    mask_d = offs_d < D
    heads = h_kv * GROUP + offs_g  # query heads of this kv head
    q = tl.load(
        q_ptr + b * q_stride_b + heads[:, None] * q_stride_h + offs_d[None, :],
        mask=mask_g[:, None] & mask_d[None, :],
        other=0.0,
    )
    k_base = k_ptr + b * k_stride_b + h_kv * k_stride_h
    v_base = v_ptr + b * v_stride_b + h_kv * v_stride_h
    bias_base = bias_ptr + b * bias_stride_b + heads * bias_stride_h

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        k = tl.load(
            k_base + offs_n[None, :] * k_stride_s + offs_d[:, None],
            mask=mask_d[:, None] & mask_n[None, :],
            other=0.0,
        )
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:
            bias = tl.load(
                bias_base[:, None] + offs_n[None, :] * bias_stride_n,
                mask=mask_g[:, None] & mask_n[None, :],
                other=0.0,
            )
            s += bias.to(tl.float32) * LOG2E
        s = tl.where(mask_n[None, :], s, float("-inf"))
        acc, m_i, l_i = online_softmax_step(
            acc,
            m_i,
            l_i,
            s,
            v_base + offs_n[:, None] * v_stride_s + offs_d[None, :],
            mask_n[:, None] & mask_d[None, :],
            DOT_PRECISION,
        )

    if NUM_SPLITS == 1:
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        tl.store(
            out_ptr + b * out_stride_b + heads[:, None] * out_stride_h + offs_d[None, :],
            (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty),
            mask=mask_g[:, None] & mask_d[None, :],
        )
    else:
        # partials of row (b * Hq + h) * NUM_SPLITS + split in one buffer: acc [rows, D], then
        # the running max [rows], then the sum [rows]
        row = (b * Hq + heads) * NUM_SPLITS + split
        tl.store(
            part_ptr + row[:, None] * D + offs_d[None, :],
            acc,
            mask=mask_g[:, None] & mask_d[None, :],
        )
        tl.store(part_ptr + part_rows * D + row, m_i, mask=mask_g)
        tl.store(part_ptr + part_rows * (D + 1) + row, l_i, mask=mask_g)


@triton.jit
def _decode_combine_kernel(
    part_ptr,
    part_rows,
    out_ptr,
    out_stride_b,
    out_stride_h,
    Hq,
    D,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous_grid(USE_PDL)
    pid = tl.program_id(0).to(tl.int64)  # b * Hq + h
    b = pid // Hq
    h = pid % Hq
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < NUM_SPLITS
    mask_d = offs_d < D
    rows = pid * NUM_SPLITS + offs_s
    m_split = tl.load(part_ptr + part_rows * D + rows, mask=mask_s, other=float("-inf"))
    l_split = tl.load(part_ptr + part_rows * (D + 1) + rows, mask=mask_s, other=0.0)
    acc = tl.load(
        part_ptr + rows[:, None] * D + offs_d[None, :],
        mask=mask_s[:, None] & mask_d[None, :],
        other=0.0,
    )
    m_max = tl.max(m_split, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m_split - m_safe)  # 0 for empty splits
    l_sum = tl.sum(w * l_split, 0)
    o = tl.sum(w[:, None] * acc, 0)
    o = o / tl.where(l_sum > 0.0, l_sum, 1.0)
    tl.store(
        out_ptr + b * out_stride_b + h * out_stride_h + offs_d,
        o.to(out_ptr.dtype.element_ty),
        mask=mask_d,
    )


def _launch_config(block_d: int, elem_size: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the split kernel. Blocks of 32 keys: a program's three
    stages take 48 KB of shared memory (bf16, D=128), so four programs share an SM and keep more of
    the cache's loads in flight. On an H200 (Llama-3-8B, context 544, 32 layers) against 64-key
    blocks: batch 32 unsplit 643 us against 870 (84% of the KV-read floor against 62%), batch 64
    1162 against 1339, batch 128 2200 against 2256, batch 8 (3 splits) 305 against 309; batch 1
    (17 splits) 164 against 148-169 for 64-key blocks in 12 and 8 splits
    (benchmarks/results/nvidia-h200_decode_attention_sweep.log)."""
    if INTERPRET:
        return 32, 4, 1
    if block_d * elem_size <= 256:  # bf16/fp16 up to D=128, fp32 up to D=64
        return 32, 4, 3
    return 32, 4, 2


def _default_num_splits(B: int, Hkv: int, S_max: int, block_n: int, device: torch.device) -> int:
    """From shapes only (CUDA graphs): about one wave of programs, >= one block of keys each
    (on an H200 in bf16, B=32 x Hkv=8 ran faster unsplit than in 2 splits; B=1 x Hkv=8 best at
    16). With the kernel option decode_split_table: _table_num_splits."""
    max_splits = triton.cdiv(S_max, block_n)
    if INTERPRET:
        return min(max_splits, 2)
    sms = num_sms(device)
    if kernels.utils.KERNEL_OPTIONS["decode_split_table"]:
        return _table_num_splits(B * Hkv, S_max, block_n, sms)
    return max(1, min(triton.cdiv(sms, B * Hkv), max_splits, 128))


# Split-KV table for decode batches (kernel option decode_split_table): programs enough for
# several per SM at every batch, so that more of the cache's loads are in flight at once.
_TABLE_PROGRAMS_PER_SM = 4


def _table_num_splits(kv_rows: int, S_max: int, block_n: int, sms: int) -> int:
    """Splits of the table for kv_rows = B * Hkv (cache rows, one program each per split): up to
    _TABLE_PROGRAMS_PER_SM programs per SM, each split at least one block of keys, <= 128."""
    wanted = triton.cdiv(_TABLE_PROGRAMS_PER_SM * sms, kv_rows)
    return max(1, min(wanted, triton.cdiv(S_max, block_n), 128))


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor,
    bias: torch.Tensor | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """One-query attention over a KV cache: softmax(scale * q k^T + bias) v over visible keys.

    q: [B, 1, Hq, D]; k, v: [B, S_max, Hkv, D] (any strides, contiguous last dim). kv_start
    (optional) and kv_end: int32 [B] on q's device; key j is visible iff kv_start[b] <= j <
    kv_end[b]. bias: broadcastable to [B, Hq, 1, S_max], fp32 or q's dtype. num_splits: split-KV
    factor (default from shapes and the SM count only, so the launch is CUDA-graph safe).
    window (None: unlimited): the query at slot kv_end[b] - 1 sees only keys j > kv_end[b] - 1 -
    window (HF's sliding_window); the splits share that windowed range. Returns [B, 1, Hq, D] in
    q's dtype (or fills `out`); rows that see no key get 0.
    """
    if torch.compiler.is_compiling():
        result = torch.ops.zoo.decode_attention(
            q, k, v, scale, kv_start, kv_end, bias, num_splits, window
        )
        return result if out is None else out.copy_(result)
    key = (
        num_splits,
        window,
        tensor_key(q),
        tensor_key(k),
        tensor_key(v),
        tensor_key(kv_start),
        tensor_key(kv_end),
        tensor_key(bias),
        tensor_key(out),
    )
    plan = _plans.get(key)
    if plan is None:
        plan = _plans.put(key, _plan(q, k, v, kv_start, kv_end, bias, num_splits, out, window))
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if plan is not None:
        _launch(plan, q, k, v, scale, kv_start, kv_end, bias, out, window)
    return out


# Launch plans (see kernels/launch.py): the checks, split and blocks of one input signature.
_plans = PlanCache()


def _plan(q, k, v, kv_start, kv_end, bias, num_splits, out, window):
    """Checks the inputs of a new signature and fixes its launches (None: empty output)."""
    if q.dim() == 4 and q.shape[1] != 1:
        raise ValueError(f"q: decode takes one query per row, got Tq={q.shape[1]}")
    check_attention_inputs(q, k, v, kv_start, kv_end, bias)
    check_window(window)
    B, _, Hq, D = q.shape
    _, S_max, Hkv, _ = k.shape
    if out is not None:
        if out.shape != (B, 1, Hq, D) or out.dtype != q.dtype:
            raise ValueError(
                f"out: expected {(B, 1, Hq, D)} {q.dtype}, got {tuple(out.shape)} {out.dtype}"
            )
        check_last_dim_contiguous("out", out)
    if q.numel() == 0:
        return None
    block_d = max(next_pow2(D), 16)
    block_n, num_warps, num_stages = _launch_config(block_d, q.element_size())
    if num_splits is None:
        num_splits = _default_num_splits(B, Hkv, S_max, block_n, q.device)
    num_splits = max(int(num_splits), 1)
    pdl = pdl_meta(q.device, B)  # both kernels
    split = KernelLaunch(
        _decode_split_kernel,
        (B * Hkv, num_splits),
        dict(
            NUM_SPLITS=num_splits,
            HAS_WINDOW=window is not None,
            HAS_BIAS=bias is not None,
            HAS_KV_START=kv_start is not None,
            GROUP_PAD=max(next_pow2(Hq // Hkv), 16),
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            DOT_PRECISION=dot_precision(q.dtype),
            num_warps=num_warps,
            num_stages=num_stages,
            **pdl,
        ),
    )
    # the strides and sizes the signature fixes, in the split kernel's order
    bias_strides = bias.expand(B, Hq, 1, S_max).stride() if bias is not None else (0, 0, 0, 0)
    out_strides = out.stride() if out is not None else (Hq * D, Hq * D, D, 1)  # empty_like
    sizes = (
        q.stride(0), q.stride(2), *k.stride()[:3], *v.stride()[:3],
        bias_strides[0], bias_strides[1], bias_strides[3], out_strides[0], out_strides[2],
        S_max, Hq, Hkv, Hq // Hkv, D,
    )  # fmt: skip
    part_rows = B * Hq * num_splits  # the splits' partial rows (see _launch)
    if num_splits == 1:
        return split, None, sizes, part_rows, None
    combine = KernelLaunch(
        _decode_combine_kernel,
        (B * Hq,),
        dict(
            NUM_SPLITS=num_splits,
            SPLITS_PAD=next_pow2(num_splits),
            BLOCK_D=block_d,
            num_warps=1 if block_d * next_pow2(num_splits) <= 2048 else 4,
            **pdl,
        ),
    )
    return split, combine, sizes, part_rows, (out_strides[0], out_strides[2], Hq, D)


def _launch(plan, q, k, v, scale, kv_start, kv_end, bias, out, window) -> None:
    split, combine, sizes, part_rows, combine_sizes = plan
    # the splits' partials, one allocation: acc [rows, D], max [rows], sum [rows] in fp32
    parts = (
        out if combine is None else q.new_empty(part_rows * (q.shape[3] + 2), dtype=torch.float32)
    )
    split(
        q, k, v,
        bias if bias is not None else q,
        kv_start if kv_start is not None else kv_end,
        kv_end,
        out, parts, part_rows,
        *sizes,
        float(scale) * LOG2E.value,
        window or 0,
    )  # fmt: skip
    if combine is not None:
        combine(parts, part_rows, out, *combine_sizes)


# torch.compile sees the launcher as a custom op (Triton's launch is not traceable).
@torch.library.custom_op("zoo::decode_attention", mutates_args=())
def _decode_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    kv_start: torch.Tensor | None,
    kv_end: torch.Tensor,
    bias: torch.Tensor | None,
    num_splits: int | None,
    window: int | None,
) -> torch.Tensor:
    return decode_attention(
        q,
        k,
        v,
        scale=scale,
        kv_start=kv_start,
        kv_end=kv_end,
        bias=bias,
        num_splits=num_splits,
        window=window,
    )


@_decode_attention_op.register_fake
def _(q, k, v, scale, kv_start, kv_end, bias, num_splits, window):
    return q.new_empty(q.shape)
