"""GEMM with fused epilogues: y = residual + alpha * act(x @ weight.T + bias).

Layout assumptions:
- x: [..., K], fp32 / fp16 / bf16. The last dim must be contiguous; a 2D [M, K] view may have any
  row stride (e.g. ``h[:, -1]`` of a [B, T, K] tensor) and is read in place; >2D inputs are
  flattened with ``reshape`` (a copy only when the leading dims cannot be merged).
- weight: [N, K] in nn.Linear layout (y = x @ weight.T), last dim contiguous, same dtype as x.
  For the gated activations ("silu_mul", "gelu_tanh_mul") weight is the fused
  cat([gate_weight, up_weight]) of shape [2 * I, K] and the output has I columns.
- bias: [N] (fused: [2 * I]); residual and out: the output's shape [..., N_out] and x's dtype,
  last dim contiguous, any row stride. ``out`` may alias ``residual`` (in-place residual add:
  each element is read and then written by the same program).
- M, N and K may all be arbitrary (non-power-of-2, e.g. N=37, K=72, M=1): every load and store
  is masked, and blocks are >= 16 in every dim because tl.dot needs that on the GPU.
- Products accumulate in fp32; fp32 inputs use IEEE fp32 products (not tf32), as torch does.
  The epilogue runs in fp32 and rounds once to the output dtype (HF rounds the linear's output
  before adding the residual; ours is the more exact of the two).
- M = 1 (decode at batch 1): a matrix-vector kernel streams the weight's rows without tensor
  cores (options matvec, and fp8_matvec for FP8 weights; long rows split along K,
  fp8_matvec_split_k).
- FP8 weights: at M = 1 the matrix-vector kernel above; converted in registers at other small
  M, as the dot's left operand (out^T = W x^T, fp8_swap_ab); at large M on Hopper x is quantized
  per row (kernels/quantize.py) and the dot runs on the FP8 tensor cores, which add products
  with fewer mantissa bits than fp32 (about 14): each BLOCK_K slice's sum is added into the fp32
  accumulator (max_num_imprecise_acc), so that error stays at one slice's instead of growing
  with K.

On the GPU the kernel is autotuned with a bucketed key (M rounded up to a power of two, capped;
N; K), and skinny-M problems (decode) that would leave SMs idle are split along K: fp32 partials
go to a workspace and a small epilogue kernel sums them. Large-M fp16/bf16 problems (prefill,
Bert at batch) take a persistent kernel that loads its tiles with TMA on Hopper; where its tiles
would fill the SMs' last round only in part, the autotuner also tries configs that split each
tile's K in two (the last of a tile's programs sums the partials and runs the epilogue) and
tiles widened by a tail of 64 columns (128 + 64: N = 768 in four). Under the Triton
interpreter fixed configs are used and there is no split-K (but for the matrix-vector kernel's,
decided from shapes alone); the TMA kernel runs there too.

Kernel options (kernels.utils.KERNEL_OPTIONS, benchmarks/bench_options.py measures them): the
decode table (M buckets 32..128: one row block per batch, K split to fill the SMs; on) and the TMA
kernel's epilogue variants (TMA stores, on; the accumulator in 2 or 4 column slices and warp
specialization, off).
"""

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

import kernels.utils
from kernels.launch import KernelLaunch, PlanCache, tensor_key
from kernels.norm import rms_norm
from kernels.quantize import NORM_MAX_K, quantize_fp8, rms_norm_scaled, scale_to_fp16
from kernels.utils import (
    INTERPRET,
    check_last_dim_contiguous,
    dot_precision,
    is_hopper_or_newer,
    max_shared_memory,
    next_pow2,
    num_sms,
    pdl_meta,
    wait_for_previous_grid,
)

_ACTIVATIONS = {
    # public name -> (ACTIVATION constexpr, FUSED_GATE)
    None: ("none", False),
    "gelu": ("gelu", False),  # exact erf GELU: HF "gelu", torch.nn.functional.gelu
    "gelu_tanh": ("gelu_tanh", False),  # HF "gelu_new" / "gelu_pytorch_tanh"
    "relu": ("relu", False),
    "tanh": ("tanh", False),  # Bert pooler
    "silu_mul": ("silu", True),  # Llama MLP: silu(gate) * up
    "gelu_tanh_mul": ("gelu_tanh", True),  # T5 v1.1 gated-gelu: gelu_new(gate) * up
}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_M_BUCKET_CAP = 16384  # M above this shares one autotune entry per (N, K)
# With PDL, skinny-M programs pull their first weight columns into L2 while the previous kernel
# finishes, when the whole weight is small enough to stay there (it paid for Bert-base's weights
# and cost time for Llama-3-8B's 33-235 MB decode weights, which do not stay in L2).
_PREFETCH_COLUMNS = 1024
_PREFETCH_MAX_WEIGHT_BYTES = 16 * 2**20


@triton.jit
def _reciprocal(z):
    """1 / z for z >= 1 (or inf) as rsqrt(z)^2: two instructions where an fp32 division takes
    eight, relative error below 3e-7. The activations' divisions are of this kind, and in a
    matmul epilogue every instruction per element is time the tensor cores wait."""
    r = tl.math.rsqrt(z)
    return r * r


@triton.jit
def _sigmoid(z):
    e = tl.exp(-tl.abs(z))  # in (0, 1]: never overflows
    s = _reciprocal(1.0 + e)
    return tl.where(z >= 0, s, e * s)


@triton.jit
def _gelu(y):
    """Exact (erf) GELU, y * Phi(y), as relu(y) - |y| / 2 * erfc(|y| / sqrt(2)), with erfc from
    Abramowitz & Stegun 7.1.26: erfc(t) = k (a1 + k (a2 + k (a3 + k (a4 + k a5)))) exp(-t^2),
    k = 1 / (1 + p t), |error| < 1.5e-7 (the GELU within 5.3e-7 of the exact one; torch's fp32
    GELU is within 1.3e-6). About 17 instructions where 0.5 y (1 + erf(y / sqrt(2))) takes 60
    with libdevice's erf: in a matmul epilogue that is the difference between stalling the tensor
    cores and not. It also keeps the negative tail's relative precision (1 + erf cancels there)."""
    a = tl.abs(y)
    k = _reciprocal(1.0 + 0.2316418882663604 * a)  # p / sqrt(2), p = 0.3275911
    # a1..a5 halved: r = erfc(t) exp(t^2) / 2
    r = 0.5307027145 * k - 0.7265760135
    r = (r * k + 0.7107068705) * k - 0.142248368
    r = (r * k + 0.127414796) * k
    # exp(-t^2) = exp2(-a^2 log2(e) / 2); |y| is capped where that is 0, so y = inf gives inf
    half_erfc = r * tl.exp2(a * a * -0.7213475204444817)
    return tl.maximum(y, 0.0) - tl.minimum(a, 16.0) * half_erfc


@triton.jit
def _activation(y, ACTIVATION: tl.constexpr):
    if ACTIVATION == "gelu":
        y = _gelu(y)
    elif ACTIVATION == "gelu_tanh":
        # 0.5 * y * (1 + tanh(u)) == y * sigmoid(2u): same function, no cancellation near 0.
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = y * _sigmoid(2.0 * u)
    elif ACTIVATION == "relu":
        y = tl.maximum(y, 0.0)
    elif ACTIVATION == "tanh":
        y = 2.0 * _sigmoid(2.0 * y) - 1.0  # tanh(y), without overflow for large |y|
    elif ACTIVATION == "silu":
        y = y * _sigmoid(y)
    return y


@triton.jit
def _epilogue(
    acc,
    acc_up,
    offs_m,
    offs_n,
    M,
    N,
    bias_ptr,
    res_ptr,
    out_ptr,
    res_stride_m,
    out_stride_m,
    alpha,
    w_scale_ptr,
    x_scale_ptr,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    FUSED_GATE: tl.constexpr,
    W_FP8: tl.constexpr,
    X_SCALED: tl.constexpr,
):
    """out = residual + alpha * act(acc + bias) [* (acc_up + bias_up)], in fp32, one rounding.
    Scaled operands: acc is first scaled by the weight's row scales (W_FP8) and x's (X_SCALED:
    x quantized to FP8, or scaled into fp16)."""
    acc, acc_up = _fp8_scaled(
        acc, acc_up, offs_m, offs_n, M, N, w_scale_ptr, x_scale_ptr, FUSED_GATE, W_FP8, X_SCALED
    )
    y = _epilogue_values(
        acc, acc_up, offs_m, offs_n, M, N, bias_ptr, res_ptr, res_stride_m, alpha, ACTIVATION,
        HAS_BIAS, HAS_RESIDUAL, FUSED_GATE,
    )  # fmt: skip
    _store_tile(y, offs_m, offs_n, M, N, out_ptr, out_stride_m)


@triton.jit
def _store_tile(y, offs_m, offs_n, M, N, out_ptr, out_stride_m):
    """y's rows offs_m and columns offs_n of out, rounded once to out's dtype, edges masked."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * out_stride_m + offs_n[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fp8_scaled(
    acc,
    acc_up,
    offs_m,
    offs_n,
    M,
    N,
    w_scale_ptr,
    x_scale_ptr,
    FUSED_GATE: tl.constexpr,
    W_FP8: tl.constexpr,
    X_SCALED: tl.constexpr,
):
    """Scaled operands: acc (and acc_up) times the weight's row scales (W_FP8) and x's
    (X_SCALED)."""
    if W_FP8:
        mask_n = offs_n < N
        acc *= tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        if FUSED_GATE:
            acc_up *= tl.load(w_scale_ptr + N + offs_n, mask=mask_n, other=0.0)[None, :]
    if X_SCALED:
        x_scale = tl.load(x_scale_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
        acc *= x_scale
        if FUSED_GATE:
            acc_up *= x_scale
    return acc, acc_up


@triton.jit
def _epilogue_values(
    acc,
    acc_up,
    offs_m,
    offs_n,
    M,
    N,
    bias_ptr,
    res_ptr,
    res_stride_m,
    alpha,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    FUSED_GATE: tl.constexpr,
):
    """residual + alpha * act(acc + bias) [* (acc_up + bias_up)] in fp32 (not yet rounded)."""
    mask_m = offs_m < M
    mask_n = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if FUSED_GATE:
            acc_up += tl.load(bias_ptr + N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = _activation(acc, ACTIVATION)
    if FUSED_GATE:
        y = y * acc_up
    y = y * alpha
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:
        res = tl.load(
            res_ptr + offs_m[:, None] * res_stride_m + offs_n[None, :], mask=mask, other=0.0
        )
        y = y + res.to(tl.float32)
    return y


@triton.jit
def _prefetch_rows_l2(ptr, rows, mask_rows, row_stride, col_start, col_end, COLS: tl.constexpr):
    """Ask the L2 to fetch columns [col_start, min(col_start + COLS, col_end)) of the given rows:
    one PTX prefetch per 128-byte line, a hint that writes no register. Masked-off lines point at
    their row's first element instead (valid memory), so no address is out of bounds."""
    LINE: tl.constexpr = 1024 // ptr.dtype.element_ty.primitive_bitwidth  # elements per line
    cols = col_start + tl.arange(0, COLS // LINE) * LINE
    rows = tl.where(mask_rows, rows, 0)
    cols = tl.where(cols < col_end, cols, 0)
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;",
        "=r,l",
        [ptr + rows[:, None] * row_stride + cols[None, :]],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(row block, column block) of output tile `tile` in grouped order: GROUP_M row blocks sweep
    the column blocks together, so the weight tiles they share stay in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (tile // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _matmul_kernel(
    x_ptr,  # [M, K], row stride x_stride_m, unit column stride
    w_ptr,  # [N, K] or fused [2N, K], row stride w_stride_n, unit column stride
    bias_ptr,  # [N] or fused [2N]
    res_ptr,  # [M, N], row stride res_stride_m
    out_ptr,  # [M, N], row stride out_stride_m
    ws_ptr,  # split-K fp32 partials [SPLIT_K, M, N or 2N] (only read when SPLIT_K > 1)
    w_scale_ptr,  # W_FP8: fp32 [N or 2N], the weight's row scales
    x_scale_ptr,  # X_FP8 or X_FP16: fp32 [M], x's row scales
    M,
    N,  # output columns (I for the fused gated activations)
    K,
    M_BUCKET,  # autotune key only: M rounded up to a power of two, capped
    x_stride_m,
    w_stride_n,
    res_stride_m,
    out_stride_m,
    ws_stride_split,
    ws_stride_m,
    alpha,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    FUSED_GATE: tl.constexpr,
    W_FP8: tl.constexpr,  # weight float8_e4m3fn, scaled per row in the epilogue
    X_FP8: tl.constexpr,  # x float8_e4m3fn too (FP8 tensor cores), scaled per row
    X_FP16: tl.constexpr,  # W_FP8 with x scaled into fp16 per row (scale_to_fp16), not FP8
    FP8_PROMOTE: tl.constexpr,  # X_FP8: each BLOCK_K slice's sum added in fp32 (else the MMA's)
    SWAP_AB: tl.constexpr,  # W_FP8 only: out^T = W x^T, the converted weight tile the left operand
    SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    USE_PDL: tl.constexpr,
    PREFETCH_K: tl.constexpr,  # with PDL: weight columns pulled into L2 before the wait (0: none)
    CONFIG_TABLE: tl.constexpr = "default",  # autotune key only: the config table it was tuned from
):
    pid_m, pid_n = _grouped_tile(
        tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M
    )
    pid_k = tl.program_id(1).to(tl.int64)

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N

    if SPLIT_K == 1:
        k_start = 0
        k_end = K
    else:
        # This program's slice of K: whole BLOCK_K steps; the last slices may be short or empty.
        k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_start = pid_k * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)

    if USE_PDL and PREFETCH_K > 0:
        # The weights do not depend on the previous kernel: start streaming this program's first
        # weight columns from HBM while that kernel finishes (skinny M is weight-bound).
        _prefetch_rows_l2(w_ptr, offs_n, mask_n, w_stride_n, k_start, k_end, PREFETCH_K)
        if FUSED_GATE:
            _prefetch_rows_l2(w_ptr, offs_n + N, mask_n, w_stride_n, k_start, k_end, PREFETCH_K)
    wait_for_previous_grid(USE_PDL)

    x_ptrs = x_ptr + offs_m[:, None] * x_stride_m + (k_start + offs_k)[None, :]
    # The weight tile is read transposed, [BLOCK_K, BLOCK_N], from the row-major [N, K] weight.
    w_ptrs = w_ptr + offs_n[None, :] * w_stride_n + (k_start + offs_k)[:, None]
    w_up_ptrs = w_ptr + (offs_n + N)[None, :] * w_stride_n + (k_start + offs_k)[:, None]

    if SWAP_AB:
        # FP8 weights at small M: as the left operand the converted tile can feed the tensor cores
        # from registers; as the right one it must first be written to shared memory
        w_rows = w_ptr + offs_n[:, None] * w_stride_n + (k_start + offs_k)[None, :]
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc_up_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k in range(k_start, k_end, BLOCK_K):
            mask_k = offs_k < k_end - k
            x_t = tl.trans(tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0))
            w = tl.load(w_rows, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            acc_t = tl.dot(w.to(x_t.dtype), x_t, acc_t, input_precision=DOT_PRECISION)
            if FUSED_GATE:
                w_up = tl.load(w_rows + N * w_stride_n, mask=mask_n[:, None] & mask_k[None, :],
                               other=0.0)  # fmt: skip
                acc_up_t = tl.dot(w_up.to(x_t.dtype), x_t, acc_up_t, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K
            w_rows += BLOCK_K
        acc = tl.trans(acc_t)
        acc_up = tl.trans(acc_up_t)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_start, k_end, BLOCK_K):
            mask_k = offs_k < k_end - k
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if W_FP8 and not X_FP8:  # FP8 weights, converted in registers (exact in x's dtype)
                w = w.to(x.dtype)
            acc = tl.dot(
                x, w, acc, input_precision=DOT_PRECISION,
                max_num_imprecise_acc=BLOCK_K if FP8_PROMOTE else None,
            )  # fmt: skip
            if FUSED_GATE:
                w_up = tl.load(w_up_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                if W_FP8 and not X_FP8:
                    w_up = w_up.to(x.dtype)
                acc_up = tl.dot(
                    x, w_up, acc_up, input_precision=DOT_PRECISION,
                    max_num_imprecise_acc=BLOCK_K if FP8_PROMOTE else None,
                )  # fmt: skip
                w_up_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K

    if SPLIT_K == 1:
        _epilogue(
            acc, acc_up, offs_m, offs_n, M, N, bias_ptr, res_ptr, out_ptr, res_stride_m,
            out_stride_m, alpha, w_scale_ptr, x_scale_ptr, ACTIVATION, HAS_BIAS, HAS_RESIDUAL,
            FUSED_GATE, W_FP8, X_FP8 or X_FP16,
        )  # fmt: skip
    else:
        # fp32 partials; gate columns at n, up columns at N + n. _splitk_epilogue_kernel sums them.
        mask = mask_m[:, None] & mask_n[None, :]
        ws_ptrs = ws_ptr + pid_k * ws_stride_split + offs_m[:, None] * ws_stride_m + offs_n[None, :]
        tl.store(ws_ptrs, acc, mask=mask)
        if FUSED_GATE:
            tl.store(ws_ptrs + N, acc_up, mask=mask)


@triton.jit
def _matvec_step(acc, acc_up, w, w_up, x, FUSED_GATE: tl.constexpr):
    """One K step of _matvec_kernel: the weight tile's rows times x [1, BLOCK_K] in fp32, summed
    into acc (and the up rows' into acc_up)."""
    acc += tl.sum(w.to(tl.float32) * x, axis=1)
    if FUSED_GATE:
        acc_up += tl.sum(w_up.to(tl.float32) * x, axis=1)
    return acc, acc_up


@triton.jit
def _matvec_kernel(
    x_ptr,  # [1, K], unit column stride
    w_ptr,  # [N, K] or fused [2N, K] (x's dtype, or float8_e4m3fn), row stride w_stride_n
    bias_ptr,  # [N] or fused [2N]
    res_ptr,  # [1, N]
    out_ptr,  # [1, N]
    ws_ptr,  # SPLIT_K > 1: fp32 partials [SPLIT_K, 1, N or 2N]
    w_scale_ptr,  # W_FP8: fp32 [N or 2N], the weight's row scales
    x_scale_ptr,  # (unused: the arguments are _matmul_kernel's, one launch path for both)
    M,  # 1
    N,  # output columns (I for the fused gated activations)
    K,
    M_BUCKET,  # autotune key only
    x_stride_m,
    w_stride_n,
    res_stride_m,
    out_stride_m,
    ws_stride_split,
    ws_stride_m,
    alpha,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    FUSED_GATE: tl.constexpr,
    W_FP8: tl.constexpr,  # weight float8_e4m3fn, scaled per row in the epilogue
    PRELOAD: tl.constexpr,  # the first weight step loaded before the PDL wait (matvec_preload)
    SPLIT_K: tl.constexpr,  # > 1: fp32 partials of K slices to ws, _splitk_epilogue_kernel sums them
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One row of x times a weight (decode at batch 1), without tensor cores.

    At M = 1 a tl.dot pads x to 16 rows and stages each weight tile through shared memory;
    reading the weight is all that counts here. Each program streams BLOCK_N whole rows of the
    weight, [BLOCK_N, BLOCK_K] elements per step, converts them to fp32 in registers and reduces
    each step's products along K into one fp32 sum per row: registers hold loads, not partial
    products, so many bytes stay in flight. The row scales (FP8) and the rest apply in the
    epilogue. A weight of few but long rows (Llama's down projection) is split along K as well
    (_matvec_split_k): its rows alone give too few programs to keep enough bytes in flight."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    # this program's K slice: whole BLOCK_K steps, so the slices never overlap
    k_slice = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = tl.program_id(1) * k_slice
    k_end = tl.minimum(k_start + k_slice, K)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    x_ptrs = x_ptr + k_start + offs_k
    w_ptrs = w_ptr + offs_n[:, None] * w_stride_n + k_start + offs_k[None, :]
    w_up_ptrs = w_ptrs + N * w_stride_n  # (FUSED_GATE)
    k_loop = k_start
    if PRELOAD:
        # The weight does not depend on the previous kernel: with PDL this program's first step
        # of it is loaded while that kernel finishes, instead of after the wait. (An empty
        # trailing slice, k_start >= K, loads nothing.)
        mask_first = mask_n[:, None] & (offs_k < K - k_start)[None, :]
        w_first = tl.load(w_ptrs, mask=mask_first, other=0.0)
        w_up_first = w_first  # unread unless FUSED_GATE
        if FUSED_GATE:
            w_up_first = tl.load(w_up_ptrs, mask=mask_first, other=0.0)
        k_loop += BLOCK_K
    wait_for_previous_grid(USE_PDL)

    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if PRELOAD:
        x = tl.load(x_ptrs, mask=offs_k < K - k_start, other=0.0).to(tl.float32)[None, :]
        acc, acc_up = _matvec_step(acc, acc_up, w_first, w_up_first, x, FUSED_GATE)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        w_up_ptrs += BLOCK_K
    for k in range(k_loop, k_end, BLOCK_K):
        mask_k = offs_k < K - k
        mask = mask_n[:, None] & mask_k[None, :]
        x = tl.load(x_ptrs, mask=mask_k, other=0.0).to(tl.float32)[None, :]
        w = tl.load(w_ptrs, mask=mask, other=0.0)
        w_up = w  # unread unless FUSED_GATE
        if FUSED_GATE:
            w_up = tl.load(w_up_ptrs, mask=mask, other=0.0)
        acc, acc_up = _matvec_step(acc, acc_up, w, w_up, x, FUSED_GATE)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        w_up_ptrs += BLOCK_K

    if SPLIT_K == 1:
        offs_m = tl.zeros((1,), dtype=tl.int64)
        _epilogue(
            acc[None, :], acc_up[None, :], offs_m, offs_n, M, N, bias_ptr, res_ptr, out_ptr,
            res_stride_m, out_stride_m, alpha, w_scale_ptr, x_scale_ptr, ACTIVATION, HAS_BIAS,
            HAS_RESIDUAL, FUSED_GATE, W_FP8, False,
        )  # fmt: skip
    else:  # row 0 of ws[slice]: gate (or only) sums at n, up sums at N + n
        ws_ptrs = ws_ptr + tl.program_id(1) * ws_stride_split + offs_n
        tl.store(ws_ptrs, acc, mask=mask_n)
        if FUSED_GATE:
            tl.store(ws_ptrs + N, acc_up, mask=mask_n)


@triton.jit
def _halves(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The left and right column halves of a [BLOCK_M, BLOCK_N] tile (registers, no copy)."""
    acc = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
    return tl.split(acc)


@triton.jit
def _tma_epilogue_slice(
    acc,
    acc_up,
    off_m,
    off_n,
    M,
    N,
    bias_ptr,
    res_ptr,
    out_ptr,
    out_desc,
    res_stride_m,
    out_stride_m,
    alpha,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    FUSED_GATE: tl.constexpr,
    SLICE_M: tl.constexpr,
    SLICE_N: tl.constexpr,
    TMA_STORE: tl.constexpr,
):
    """The epilogue of output columns [off_n, off_n + SLICE_N) of a tile: stored with masked
    pointer stores, or through the output's TMA descriptor (which clips the edges itself).
    Offsets in int32 (the host keeps the output and residual within 2**31 elements, _takes_tma):
    64-bit ones took twice the registers and spilled with 8 warps."""
    offs_m = off_m + tl.arange(0, SLICE_M)
    offs_n = off_n + tl.arange(0, SLICE_N)
    y = _epilogue_values(
        acc, acc_up, offs_m, offs_n, M, N, bias_ptr, res_ptr, res_stride_m, alpha,
        ACTIVATION, HAS_BIAS, HAS_RESIDUAL, FUSED_GATE,
    )  # fmt: skip
    if TMA_STORE:
        out_desc.store([off_m, off_n], y.to(out_desc.dtype))
    else:
        _store_tile(y, offs_m, offs_n, M, N, out_ptr, out_stride_m)


@triton.jit
def _tma_epilogue_halves(
    acc,
    acc_up,
    off_m,
    off_n,
    M,
    N,
    bias_ptr,
    res_ptr,
    out_ptr,
    out_desc,
    res_stride_m,
    out_stride_m,
    alpha,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    FUSED_GATE: tl.constexpr,
    SLICE_M: tl.constexpr,
    SLICE_N: tl.constexpr,
    TMA_STORE: tl.constexpr,
):
    """The epilogue of a [SLICE_M, SLICE_N] slice at off_n, one column half after the other."""
    HALF: tl.constexpr = SLICE_N // 2
    acc_0, acc_1 = _halves(acc, SLICE_M, SLICE_N)
    up_0, up_1 = acc_0, acc_1  # unread unless FUSED_GATE
    if FUSED_GATE:
        up_0, up_1 = _halves(acc_up, SLICE_M, SLICE_N)
    _tma_epilogue_slice(
        acc_0, up_0, off_m, off_n, M, N, bias_ptr, res_ptr, out_ptr, out_desc, res_stride_m,
        out_stride_m, alpha, ACTIVATION, HAS_BIAS, HAS_RESIDUAL, FUSED_GATE, SLICE_M, HALF,
        TMA_STORE,
    )  # fmt: skip
    _tma_epilogue_slice(
        acc_1, up_1, off_m, off_n + HALF, M, N, bias_ptr, res_ptr, out_ptr, out_desc,
        res_stride_m, out_stride_m, alpha, ACTIVATION, HAS_BIAS, HAS_RESIDUAL, FUSED_GATE,
        SLICE_M, HALF, TMA_STORE,
    )  # fmt: skip


# the atomics each program of a split tile counts itself in with: at least one per thread of the
# largest TMA config (8 warps), so that every thread's partial stores are released
_SPLIT_K_ARRIVALS = tl.constexpr(256)


@triton.jit
def _split_k_sum(
    acc,
    ws_ptr,
    counts_ptr,
    tile,
    split,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One of a tile's SPLIT_K K slices done: its fp32 partial goes to the tile's slot for that
    slice, and the program counts itself in; the last of the tile's programs to arrive sums the
    slots in slice order (the same sum whichever arrives last: runs are deterministic) and puts
    the count back to 0 for the next launch. Returns (the sum, whether this program is last)."""
    TILE: tl.constexpr = BLOCK_M * BLOCK_N
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    slots = ws_ptr + tile.to(tl.int64) * (SPLIT_K * TILE)
    tl.store(slots + split * TILE + offs, acc)
    # every thread counts itself in, its atomic releasing its own stores (one atomic of the
    # program after a barrier would do, but a barrier in the loop body stops Triton from
    # pipelining it); the program that brings the count to its end sums
    arrivals = tl.atomic_add(
        counts_ptr + tile + tl.zeros((_SPLIT_K_ARRIVALS,), dtype=tl.int32), 1, sem="acq_rel"
    )
    latest = tl.max(arrivals, axis=0)  # the count before this program's latest arrival
    last = latest == SPLIT_K * _SPLIT_K_ARRIVALS - 1
    # loads predicated on `last` rather than an `if` that yields the sum: Triton 3.6's loop
    # flattening fails on a value-yielding `if` in the loop body (the mask is made from
    # `latest`: the interpreter splats a boolean scalar as int32). .cg: from L2, where the other
    # programs' partials are (L1 is not coherent)
    sum_here = (
        tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32) + latest == SPLIT_K * _SPLIT_K_ARRIVALS - 1
    )
    total = tl.load(slots + offs, mask=sum_here, other=0.0, cache_modifier=".cg")
    for s in tl.static_range(1, SPLIT_K):
        total += tl.load(slots + s * TILE + offs, mask=sum_here, other=0.0, cache_modifier=".cg")
    tl.store(counts_ptr + tile, 0, mask=last)
    return total, last


@triton.jit
def _matmul_tma_kernel(
    x_desc,  # TMA descriptor of x [M, K], block [BLOCK_M, BLOCK_K]
    w_desc,  # TMA descriptor of the weight [N or 2N, K], block [BLOCK_N, BLOCK_K]
    w_tail_desc,  # BLOCK_N_TAIL > 0: the weight's descriptor with block [BLOCK_N_TAIL, BLOCK_K]
    bias_ptr,
    res_ptr,
    out_ptr,
    out_desc,  # with TMA_STORE: descriptor of out [M, N], block [BLOCK_M, BLOCK_N // SUBTILE]
    w_scale_ptr,  # W_FP8 (with X_FP8: both operands FP8): fp32 [N or 2N]
    x_scale_ptr,  # X_FP8: fp32 [M]
    ws_ptr,  # SPLIT_K > 1: fp32 partials, SPLIT_K x [BLOCK_M, BLOCK_N] per tile
    counts_ptr,  # SPLIT_K > 1: int32 per tile, 0 between launches
    M,
    N,
    K,
    M_BUCKET,  # autotune key only
    res_stride_m,
    out_stride_m,
    alpha,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    FUSED_GATE: tl.constexpr,
    W_FP8: tl.constexpr,
    X_FP8: tl.constexpr,
    FP8_PROMOTE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,  # grid size only: num_programs = PROGRAMS_PER_SM * SMs
    USE_PDL: tl.constexpr,
    EPILOGUE_SUBTILE: tl.constexpr = 1,  # the epilogue in 1, 2 or 4 column slices
    TMA_STORE: tl.constexpr = False,
    WARP_SPECIALIZE: tl.constexpr = False,
    SPLIT_K: tl.constexpr = 1,  # K slices per tile (16-bit operands, no fused gate)
    BLOCK_N_TAIL: tl.constexpr = 0,  # > 0: tiles of BLOCK_N + BLOCK_N_TAIL columns (no fused gate)
    RESIDUAL_SLICES: tl.constexpr = 1,  # with a residual: at least this many epilogue slices
):
    """Persistent variant for compute-bound shapes (fp16/bf16, Hopper): each program walks the
    output tiles num_programs apart. TMA fetches the tiles, and out-of-bounds rows and columns
    read as 0, so the K loop has no masks. With one accumulator the tile and K loops are
    flattened into one software pipeline that prefetches the next tile's operands while this
    tile's epilogue runs.
    EPILOGUE_SUBTILE > 1 runs the epilogue slice by slice (fewer live registers, each slice's
    store overlapping the next slice's math), as Triton's persistent-matmul tutorial does.
    SPLIT_K > 1 walks (tile, K slice) units instead, for problems whose tiles would fill the last
    round of SMs only in part (e.g. 192 tiles on 132 SMs); the last of a tile's units to finish
    sums the partials and runs the epilogue (_split_k_sum).
    BLOCK_N_TAIL > 0 widens each tile by a second, narrower block of columns (blocks are powers
    of two; the MMA's N need not be): 128 + 64 columns make N = 768 four tiles wide, so 4096 rows
    are 128 tiles, one round of 132 SMs, where 128-column tiles would take 192 (two rounds, the
    second 45% full).
    RESIDUAL_SLICES (set per config, _tma_config): the residual's tile is loaded into registers
    beside the accumulator, and where that takes 128 registers per thread a whole tile's residual
    spills; in four slices it does not (ptxas for sm_90, Triton 3.6: 128 x 256 with 8 warps and
    128 x 128 with 4 warps, 255 registers and spills whole, 240-247 and none in four slices)."""
    tl.static_assert(BLOCK_N_TAIL == 0 or not FUSED_GATE, "a tile's tail has no up columns")
    tl.static_assert(BLOCK_N_TAIL == 0 or SPLIT_K == 1, "a split tile's sum has no tail")
    tl.static_assert(BLOCK_N_TAIL == 0 or not X_FP8, "a tail has 16-bit operands, unscaled")
    wait_for_previous_grid(USE_PDL)
    TILE_N: tl.constexpr = BLOCK_N + BLOCK_N_TAIL
    # the epilogue's column slices (_epilogue_slices on the host: the output descriptor's block)
    SLICES: tl.constexpr = (
        RESIDUAL_SLICES if HAS_RESIDUAL and RESIDUAL_SLICES > EPILOGUE_SUBTILE else EPILOGUE_SUBTILE
    )
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, TILE_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    # every unit runs the same number of K steps (steps past K read zeros): one trip count,
    # so Triton can flatten the unit and K loops into one software pipeline
    k_tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    for unit in tl.range(
        tl.program_id(0),
        num_pid_m * num_pid_n * SPLIT_K,
        tl.num_programs(0),
        # two accumulators (gate and up, or a tail): not flattened. Flattening resets them per
        # tile with selects, on which ptxas serializes the wgmmas (warning C7515); unflattened,
        # Llama's gate-up + SiLU*up ran at 0.99x cuBLAS against 0.81x
        flatten=not FUSED_GATE and BLOCK_N_TAIL == 0,
        warp_specialize=WARP_SPECIALIZE,
    ):
        split = 0
        k_first = 0
        if SPLIT_K == 1:
            tile = unit
        else:
            tile = unit // SPLIT_K
            split = unit % SPLIT_K
            k_first = split * k_tiles_per_split
        pid_m, pid_n = _grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * TILE_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if BLOCK_N_TAIL > 0:
            acc_tail = tl.zeros((BLOCK_M, BLOCK_N_TAIL), dtype=tl.float32)
        for ki in range(k_tiles_per_split):
            off_k = (k_first + ki) * BLOCK_K
            x = x_desc.load([off_m, off_k])
            acc = tl.dot(
                x, w_desc.load([off_n, off_k]).T, acc,
                max_num_imprecise_acc=BLOCK_K if FP8_PROMOTE else None,
            )  # fmt: skip
            if FUSED_GATE:
                # gate rows past N read up rows (or zeros): those columns are never stored
                acc_up = tl.dot(
                    x, w_desc.load([N + off_n, off_k]).T, acc_up,
                    max_num_imprecise_acc=BLOCK_K if FP8_PROMOTE else None,
                )  # fmt: skip
            if BLOCK_N_TAIL > 0:  # weight rows past N read zeros, as the main block's do
                acc_tail = tl.dot(
                    x, w_tail_desc.load([off_n + BLOCK_N, off_k]).T, acc_tail,
                    max_num_imprecise_acc=BLOCK_K if FP8_PROMOTE else None,
                )  # fmt: skip
        # FP8 operands: the whole tile scaled before the epilogue's slices (else a no-op)
        acc, acc_up = _fp8_scaled(
            acc, acc_up, off_m.to(tl.int64) + tl.arange(0, BLOCK_M),
            off_n.to(tl.int64) + tl.arange(0, BLOCK_N), M, N, w_scale_ptr, x_scale_ptr,
            FUSED_GATE, W_FP8, X_FP8,
        )  # fmt: skip
        rows = M
        if SPLIT_K > 1:
            acc, last = _split_k_sum(
                acc, ws_ptr, counts_ptr, tile, split, SPLIT_K=SPLIT_K, BLOCK_M=BLOCK_M,
                BLOCK_N=BLOCK_N,
            )  # fmt: skip
            # only the last unit stores: the others' rows are all masked off (not an `if`:
            # Triton 3.6's loop flattening fails on an `if` in the loop body), so the stores
            # are masked pointer stores whatever TMA_STORE says (a TMA store has no mask)
            rows = tl.where(last, M, 0)
        STORE_BY_TMA: tl.constexpr = TMA_STORE and SPLIT_K == 1
        if SLICES == 1:
            _tma_epilogue_slice(
                acc, acc_up, off_m, off_n, rows, N, bias_ptr, res_ptr, out_ptr, out_desc,
                res_stride_m, out_stride_m, alpha, ACTIVATION, HAS_BIAS, HAS_RESIDUAL, FUSED_GATE,
                BLOCK_M, BLOCK_N, STORE_BY_TMA,
            )  # fmt: skip
        elif SLICES == 2:
            _tma_epilogue_halves(
                acc, acc_up, off_m, off_n, rows, N, bias_ptr, res_ptr, out_ptr, out_desc,
                res_stride_m, out_stride_m, alpha, ACTIVATION, HAS_BIAS, HAS_RESIDUAL, FUSED_GATE,
                BLOCK_M, BLOCK_N, STORE_BY_TMA,
            )  # fmt: skip
        else:  # 4 slices: the halves of each half
            HALF: tl.constexpr = BLOCK_N // 2
            acc_0, acc_1 = _halves(acc, BLOCK_M, BLOCK_N)
            up_0, up_1 = acc_0, acc_1  # unread unless FUSED_GATE
            if FUSED_GATE:
                up_0, up_1 = _halves(acc_up, BLOCK_M, BLOCK_N)
            _tma_epilogue_halves(
                acc_0, up_0, off_m, off_n, rows, N, bias_ptr, res_ptr, out_ptr, out_desc,
                res_stride_m, out_stride_m, alpha, ACTIVATION, HAS_BIAS, HAS_RESIDUAL, FUSED_GATE,
                BLOCK_M, HALF, STORE_BY_TMA,
            )  # fmt: skip
            _tma_epilogue_halves(
                acc_1, up_1, off_m, off_n + HALF, rows, N, bias_ptr, res_ptr, out_ptr, out_desc,
                res_stride_m, out_stride_m, alpha, ACTIVATION, HAS_BIAS, HAS_RESIDUAL, FUSED_GATE,
                BLOCK_M, HALF, STORE_BY_TMA,
            )  # fmt: skip
        if BLOCK_N_TAIL > 0:
            # through TMA where the output descriptor's block is the tail's shape
            STORE_TAIL_BY_TMA: tl.constexpr = STORE_BY_TMA and BLOCK_N // SLICES == BLOCK_N_TAIL
            _tma_epilogue_slice(
                acc_tail, acc_tail, off_m, off_n + BLOCK_N, rows, N, bias_ptr, res_ptr, out_ptr,
                out_desc, res_stride_m, out_stride_m, alpha, ACTIVATION, HAS_BIAS, HAS_RESIDUAL,
                False, BLOCK_M, BLOCK_N_TAIL, STORE_TAIL_BY_TMA,
            )  # fmt: skip


@triton.jit
def _splitk_epilogue_kernel(
    ws_ptr,  # fp32 partials [SPLIT_K, M, N or 2N], contiguous
    bias_ptr,
    res_ptr,
    out_ptr,
    w_scale_ptr,
    x_scale_ptr,
    M,
    N,
    ws_stride_split,
    ws_stride_m,
    res_stride_m,
    out_stride_m,
    alpha,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    FUSED_GATE: tl.constexpr,
    W_FP8: tl.constexpr,
    X_SCALED: tl.constexpr,  # x's row scales apply (x quantized to FP8, or scaled into fp16)
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous_grid(USE_PDL)
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ws_ptrs = ws_ptr + offs_m[:, None] * ws_stride_m + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in tl.static_range(SPLIT_K):  # fixed order: deterministic sums
        acc += tl.load(ws_ptrs, mask=mask, other=0.0)
        if FUSED_GATE:
            acc_up += tl.load(ws_ptrs + N, mask=mask, other=0.0)
        ws_ptrs += ws_stride_split
    _epilogue(
        acc, acc_up, offs_m, offs_n, M, N, bias_ptr, res_ptr, out_ptr, res_stride_m,
        out_stride_m, alpha, w_scale_ptr, x_scale_ptr, ACTIVATION, HAS_BIAS, HAS_RESIDUAL,
        FUSED_GATE, W_FP8, X_SCALED,
    )  # fmt: skip


def _config(
    block_m: int, block_n: int, block_k: int, num_stages: int, num_warps: int
) -> triton.Config:
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8}
    return triton.Config(meta, num_stages=num_stages, num_warps=num_warps)


# Per M bucket; the first entry of each list is the one used alone for tiny weights.
_SKINNY_CONFIGS = [  # M <= 16 (decode): weight-bandwidth bound; narrow N tiles, long K steps
    _config(16, 64, 128, 4, 4),
    _config(16, 32, 128, 4, 4),
    _config(16, 32, 256, 3, 4),
    _config(16, 64, 256, 3, 4),
    _config(16, 128, 128, 3, 4),
]
_MEDIUM_CONFIGS = [  # 16 < M <= 64: still mostly weight-bound, needs enough programs
    _config(32, 64, 128, 4, 4),
    _config(16, 64, 128, 4, 4),
    _config(32, 128, 64, 4, 4),
    _config(64, 64, 64, 4, 4),
    _config(64, 128, 64, 4, 4),
]
_LARGE_CONFIGS = [  # prefill, Bert: compute bound
    _config(128, 128, 64, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(128, 64, 64, 4, 4),
    _config(128, 128, 64, 3, 8),
    _config(64, 256, 64, 3, 8),
    _config(128, 256, 64, 3, 8),
    _config(128, 256, 64, 4, 8),
    _config(256, 128, 64, 3, 8),
]
# Decode batches, M buckets 32..128 (kernel option matmul_decode_table): one row block spans the
# whole batch, so each weight tile leaves HBM once per step, and K is split until the column
# blocks fill the SMs (_decode_split_k).
_DECODE_CONFIGS = {
    32: [
        _config(32, 64, 128, 4, 4),
        _config(32, 32, 256, 3, 4),
        _config(32, 64, 256, 3, 4),
        _config(32, 128, 128, 3, 4),
    ],
    64: [
        _config(64, 64, 128, 4, 4),
        _config(64, 32, 128, 4, 4),
        _config(64, 64, 256, 3, 8),
        _config(64, 128, 64, 4, 4),
        _config(64, 64, 64, 6, 4),  # Llama-3-8B at batch 64 (H200): qkv 10% faster, o 2%
    ],
    128: [
        _config(128, 64, 64, 4, 4),
        _config(128, 64, 128, 3, 8),
        _config(128, 32, 128, 4, 4),
        _config(128, 128, 64, 3, 8),
        _config(128, 128, 64, 4, 8),  # at batch 128: gate-up 3% faster, down 4%
    ],
}
_DECODE_BLOCK_N = 64  # the column block _decode_split_k sizes the split for
_DECODE_MIN_K_SLICE = 512  # K each slice keeps at least
# FP8 weights converted in registers (M <= 64): a BLOCK_K step reads half the bytes, so longer
# steps keep as many bytes in flight as the 16-bit configs do; tried beside the bucket's own
_FP8_WEIGHT_CONFIGS = [
    _config(16, 64, 512, 2, 4),
    _config(16, 32, 512, 3, 4),
    _config(16, 32, 512, 2, 4),  # fits the fused gate-up's two weight tiles
    _config(32, 64, 256, 3, 4),
]
_FALLBACK_CONFIG = _config(16, 32, 64, 2, 4)  # fits any dtype and gate mode


def _matvec_configs(row_steps: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages)
        for block_n, block_k, warps, stages in row_steps
    ]


# M = 1 (_matvec_kernel; kernel options fp8_matvec and matvec): (rows per program, elements of
# each row per step, warps, stages). FP8 weights: programs of one warp and 2-4 rows lead: at
# Llama-3-8B's shapes on an H200 (four layers' weights, past L2) the gate-up weight reads in
# 30.7 us, 90% of the copy bandwidth, against 35.4 with the earlier configs (4-8 warps, 4-32
# rows), down in 16.8 against 18.1 (benchmarks/results/nvidia-h200_fp8_matvec_sweep.log): an SM
# holds more of them, each with its own loads in flight, and their sums need no cross-warp
# reduction.
_MATVEC_CONFIGS = _matvec_configs(
    [(2, 1024, 1, 1), (4, 512, 1, 1), (2, 2048, 2, 1), (8, 512, 2, 1), (8, 512, 4, 1),
     (4, 2048, 4, 1), (16, 512, 4, 1), (8, 4096, 8, 1)]
)  # fmt: skip
# 16-bit (and fp32) weights: one-warp programs of 2-4 rows lead here too. Llama-3-8B on an H200,
# bf16, four layers' weights (benchmarks/results/nvidia-h200_matvec_sweep.log): qkv 14.3 us
# against the tl.dot kernel's 14.8, o 10.1 against 11.5, gate-up 55.7 (99% of the copy
# bandwidth) against 60.7, down 29.5 against 30.8.
_MATVEC_16BIT_CONFIGS = _matvec_configs(
    [(2, 512, 1, 1), (4, 256, 1, 1), (2, 2048, 4, 1), (4, 1024, 4, 1), (2, 1024, 2, 1),
     (1, 2048, 4, 1)]
)  # fmt: skip
_INTERPRET_MATVEC_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 64}
# the split-K epilogue's grid (_splitk_epilogue)
_SPLITK_EPILOGUE_PROGRAMS_PER_SM = 2
_MATVEC_SPLIT_MAX_ROWS = 8192  # rows x K slices: 1024 programs of 8 rows
_MATVEC_MIN_K_SLICE = 4096
_FP8_FALLBACK_CONFIG = _config(64, 64, 64, 2, 4)
_INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}
_INTERPRET_TMA_CONFIG = {
    "BLOCK_M": 64,
    "BLOCK_N": 32,
    "BLOCK_K": 32,
    "GROUP_M": 2,
    "PROGRAMS_PER_SM": 1,
    "SPLIT_K": 1,
}
_TINY_WEIGHT = 1 << 18  # elements; below this every config is about as fast: skip the tuning


def _acc_regs(block_m: int, block_n: int, num_warps: int, n_acc: int = 1) -> int:
    """fp32 accumulator registers per thread of a [block_m, block_n] tile (n_acc of them)."""
    return block_m * block_n * n_acc // (32 * num_warps)


def _fits(
    config: triton.Config, n_acc: int, elem_bytes: int, smem_limit: int, programs: int = 1
) -> bool:
    """Whether the accumulators fit in registers and the pipelined tiles in shared memory, with
    `programs` resident programs per SM."""
    bm, bn, bk = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    bn += config.kwargs.get("BLOCK_N_TAIL", 0)  # (a tail is never gated)
    acc_regs = _acc_regs(bm, bn, config.num_warps, n_acc)
    smem = config.num_stages * (bm * bk + bk * bn * n_acc) * elem_bytes
    threads = 32 * config.num_warps * programs
    # 64K registers per SM, and a thread may take up to 255 of them
    return acc_regs <= 128 and smem * programs <= smem_limit and threads * 255 <= 65536


def _prune_configs(configs, named_args, **kwargs):
    """The configs of the M bucket that fit in registers and shared memory (one for tiny weights)."""
    args = {**named_args, **kwargs}
    m_bucket, n, k = args["M_BUCKET"], args["N"], args["K"]
    n_acc = 2 if args["FUSED_GATE"] else 1
    if args.get("CONFIG_TABLE") == "decode":
        bucket = _DECODE_CONFIGS[m_bucket]
    elif m_bucket <= 16:
        bucket = _SKINNY_CONFIGS
    elif m_bucket <= 64:
        bucket = _MEDIUM_CONFIGS
    elif m_bucket <= 256:  # short prefill, Bert at small batch: big tiles would leave SMs idle
        bucket = _MEDIUM_CONFIGS + _LARGE_CONFIGS
    else:
        bucket = _LARGE_CONFIGS
    if args["W_FP8"] and m_bucket <= 64:
        bucket = bucket + (_FP8_DOT_SMALL_M_CONFIGS if args["X_FP8"] else _FP8_WEIGHT_CONFIGS)
    x = args["x_ptr"]
    kept = [c for c in bucket if _fits(c, n_acc, x.element_size(), max_shared_memory(x.device))]
    if args["X_FP8"]:  # FP8 x FP8 dots: tiles of at least 64 rows, the Hopper FP8 MMA's shape
        kept = [c for c in kept if c.kwargs["BLOCK_M"] >= 64] or [_FP8_FALLBACK_CONFIG]
    kept = kept or [_FALLBACK_CONFIG]
    if n * n_acc * k <= _TINY_WEIGHT:
        kept = kept[:1]
    return kept


def _set_tma_blocks(nargs):
    """A config's tile shape is the TMA descriptors' block shape (set before each launch)."""
    x_block, w_block, out_block, tail_block = _tma_blocks(nargs)
    nargs["x_desc"].block_shape = x_block
    nargs["w_desc"].block_shape = w_block
    if tail_block is not None:
        nargs["w_tail_desc"].block_shape = tail_block
    if nargs["out_desc"] is not None:
        nargs["out_desc"].block_shape = out_block


def _tma_config(
    block_m: int,
    block_n: int,
    block_k: int,
    num_stages: int,
    num_warps: int,
    programs_per_sm: int = 1,
    split_k: int = 1,
    tail: int = 0,
) -> triton.Config:
    # at 128 accumulator registers per thread (a tail's included; gated tiles have two
    # accumulators but no residual in the models) a residual is read in four slices
    acc_regs = _acc_regs(block_m, block_n + tail, num_warps)
    meta = {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
        "GROUP_M": 8,
        "PROGRAMS_PER_SM": programs_per_sm,
        "SPLIT_K": split_k,
        "BLOCK_N_TAIL": tail,
        "RESIDUAL_SLICES": 4 if acc_regs >= 128 else 1,
    }
    # each thread of a split tile's program releases its own partial stores (_split_k_sum)
    assert split_k == 1 or num_warps * 32 <= _SPLIT_K_ARRIVALS, "more threads than arrivals"
    return triton.Config(meta, num_stages=num_stages, num_warps=num_warps, pre_hook=_set_tma_blocks)


_TMA_CONFIGS = [  # persistent TMA kernel, M > _TMA_MIN_M_BUCKET, fp16/bf16
    _tma_config(128, 256, 64, 3, 8),
    _tma_config(128, 256, 64, 4, 8),
    _tma_config(256, 128, 64, 3, 8),
    _tma_config(128, 128, 64, 4, 8),
    _tma_config(128, 128, 64, 3, 8),  # 8 warps, both accumulators of a gated tile in registers
    _tma_config(128, 128, 64, 4, 4),
    _tma_config(128, 64, 64, 4, 4),
    _tma_config(64, 256, 64, 4, 4),
    # two programs per SM: one runs its epilogue while the other keeps the tensor cores busy.
    # With the TMA store's staging tile 128 x 128 in 3 stages takes 131 KB, so one program is
    # resident at a time (and wins at few tiles); in 2 stages (98 KB) two are, but that lost to
    # one 128 x 256 program at every model shape on the H200 (Bert up + GELU 272 us against 251)
    _tma_config(128, 128, 64, 3, 4, 2),
    _tma_config(128, 64, 64, 4, 4, 2),
    _tma_config(64, 128, 64, 4, 4, 2),
    # K split in two where the tiles alone would leave SMs idle in their last round
    # (_tma_split_useful: e.g. Bert's down projection at 4096 x 768, 192 tiles on 132 SMs)
    _tma_config(128, 128, 64, 4, 4, split_k=2),
    _tma_config(128, 128, 64, 4, 8, split_k=2),
    _tma_config(64, 128, 64, 4, 4, split_k=2),
    _tma_config(128, 64, 64, 4, 4, split_k=2),
    # tiles of 128 + 64 columns where they fill the SMs' last round better than 128 columns do
    # (_tma_tail_useful: e.g. N = 768 at 4096 rows, 128 tiles on 132 SMs instead of 192)
    _tma_config(128, 128, 64, 3, 8, tail=64),
    _tma_config(128, 128, 64, 4, 8, tail=64),
]
_FP8_TMA_CONFIGS = [  # the same with FP8 operands: twice the K per byte of shared memory
    _tma_config(128, 256, 128, 3, 8),
    _tma_config(128, 256, 128, 4, 8),
    _tma_config(256, 128, 128, 3, 8),
    _tma_config(128, 128, 128, 4, 8),
    _tma_config(128, 128, 128, 4, 4),
    _tma_config(128, 64, 128, 4, 4),
    _tma_config(128, 128, 128, 3, 4, 2),
    _tma_config(64, 128, 128, 4, 4, 2),
]
_TMA_MIN_M_BUCKET = 256  # M buckets above this take the TMA kernel where it is available
# FP8 weights: M buckets above the kernel option fp8_dot_min_m (64) quantize x per row and take
# FP8 tensor cores (Hopper, and the interpreter); at or below it the weights are converted in
# registers (decode is bound by reading them, and x keeps its precision). These are the FP8 x FP8
# configs of M buckets <= 64 (fp8_dot_min_m=16): 64-row tiles (the MMA's), long K steps.
_FP8_DOT_SMALL_M_CONFIGS = [
    _config(64, 64, 256, 3, 4),
    _config(64, 32, 256, 4, 4),
    _config(64, 128, 128, 4, 4),
    _config(64, 64, 128, 4, 4),
]
_INTERPRET_TMA_PROGRAMS = 2  # the interpreter's persistent programs: each walks several tiles
# K each slice of a split TMA tile keeps at least: the partial's trip through L2 (a 64 KB store
# and load per 128 x 128 slice) stays small beside the slice's MMAs
_TMA_SPLIT_MIN_K_SLICE = 1024


def _tma_tiles(config: dict, m: int, n: int) -> int:
    tile_n = config["BLOCK_N"] + config.get("BLOCK_N_TAIL", 0)
    return triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, tile_n)


def _last_round_fill(tiles: int, slots: int) -> float:
    """The fraction of the SMs' rounds that `tiles` tiles keep busy (slots: programs at once)."""
    return tiles / (triton.cdiv(tiles, slots) * slots)


def _tma_tail_useful(config: dict, m_bucket: int, n: int, meta: dict, sms: int) -> bool:
    """Whether a TMA config runs here: one with a tail of columns only for 16-bit operands
    without the fused gate or warp specialization, where its wider tiles (of the M bucket) keep
    the SMs' rounds busier than the same tiles without the tail would."""
    if config.get("BLOCK_N_TAIL", 0) == 0:
        return True
    if meta["FUSED_GATE"] or meta["X_FP8"] or meta["WARP_SPECIALIZE"]:
        return False
    slots = sms * config["PROGRAMS_PER_SM"]
    narrow = {**config, "BLOCK_N_TAIL": 0}
    return _last_round_fill(_tma_tiles(config, m_bucket, n), slots) > _last_round_fill(
        _tma_tiles(narrow, m_bucket, n), slots
    )


def _tma_split_useful(config: dict, m_bucket: int, n: int, k: int, meta: dict, sms: int) -> bool:
    """Whether a TMA config runs here: one with a K split only for 16-bit operands without the
    fused gate or warp specialization (meta: the launch's FUSED_GATE, X_FP8, WARP_SPECIALIZE),
    where each slice keeps enough K and the tiles (of the M bucket, so that a padded call
    splits as its unpadded one) would fill fewer than two rounds of the SMs."""
    split = config.get("SPLIT_K", 1)
    if split == 1:
        return True
    return (
        not (meta["FUSED_GATE"] or meta["X_FP8"] or meta["WARP_SPECIALIZE"])
        and k >= split * _TMA_SPLIT_MIN_K_SLICE
        and _tma_tiles(config, m_bucket, n) < 2 * sms
    )


def _prune_tma_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    n_acc = 2 if args["FUSED_GATE"] else 1
    elem_bytes = 1 if args["X_FP8"] else args["out_ptr"].element_size()
    device = args["out_ptr"].device
    smem_limit, sms = max_shared_memory(device), num_sms(device)
    kept = [
        c
        for c in configs
        if (c in _FP8_TMA_CONFIGS) == args["X_FP8"]
        and _fits(c, n_acc, elem_bytes, smem_limit, programs=c.kwargs["PROGRAMS_PER_SM"])
        and _tma_split_useful(c.kwargs, args["M_BUCKET"], args["N"], args["K"], args, sms)
        and _tma_tail_useful(c.kwargs, args["M_BUCKET"], args["N"], args, sms)
    ]
    return kept or [_tma_config(64, 64, 64, 2, 4)]


def _bench_cudagraph(kernel_call, quantiles):
    # Decode-sized kernels run for a few microseconds: timed without a CUDA graph the launch
    # overhead would decide the winner. do_bench_cudagraph runs on a stream of its own that does
    # not wait for the current one: without the syncs, restore_value could save `out` before the
    # pending writes to it land (and put back that stale copy).
    torch.cuda.synchronize()
    timing = triton.testing.do_bench_cudagraph(kernel_call, rep=20, quantiles=quantiles)
    torch.cuda.synchronize()
    return timing


_matmul_kernel_tuned = (
    None
    if INTERPRET
    else triton.autotune(
        configs=_SKINNY_CONFIGS
        + _MEDIUM_CONFIGS
        + _LARGE_CONFIGS
        + [c for table in _DECODE_CONFIGS.values() for c in table]
        + _FP8_WEIGHT_CONFIGS
        + _FP8_DOT_SMALL_M_CONFIGS,  # _prune_configs picks the bucket's
        key=[
            "M_BUCKET",
            "N",
            "K",
            "ACTIVATION",
            "FUSED_GATE",
            "HAS_RESIDUAL",
            "SPLIT_K",
            "CONFIG_TABLE",
            "W_FP8",
            "X_FP8",
            "X_FP16",
            "FP8_PROMOTE",
            "SWAP_AB",
        ],
        prune_configs_by={"early_config_prune": _prune_configs},
        # benchmarking runs the kernel many times: keep an in-place residual add (out is residual) right
        restore_value=["out_ptr"],
        do_bench=_bench_cudagraph,
    )(_matmul_kernel)
)


# the matrix-vector configs kept: a thread loads at most this many bytes of weight per step
_MATVEC_MAX_BYTES_PER_THREAD = 128


def _matvec_bytes_per_thread(config: triton.Config, fused_gate: bool, elem_bytes: int) -> float:
    """Bytes of weight one thread of a matrix-vector program loads per step (two tiles with the
    fused gate)."""
    n_acc = 2 if fused_gate else 1
    block = config.kwargs["BLOCK_N"] * config.kwargs["BLOCK_K"]
    return block * n_acc * elem_bytes / (32 * config.num_warps)


def _prune_matvec_configs(configs, named_args, **kwargs):
    """Configs that load at most _MATVEC_MAX_BYTES_PER_THREAD bytes of weight per thread per step
    (else the one that loads the least)."""
    elem_bytes = named_args["w_ptr"].element_size()

    def per_thread(c):
        return _matvec_bytes_per_thread(c, kwargs["FUSED_GATE"], elem_bytes)

    kept = [c for c in configs if per_thread(c) <= _MATVEC_MAX_BYTES_PER_THREAD] or [
        min(configs, key=per_thread)
    ]
    if named_args["N"] * (2 if kwargs["FUSED_GATE"] else 1) * named_args["K"] <= _TINY_WEIGHT:
        kept = kept[:1]
    return kept


def _tuned_matvec(configs: list[triton.Config]):
    return (
        None
        if INTERPRET
        else triton.autotune(
            configs=configs,
            key=["N", "K", "ACTIVATION", "FUSED_GATE", "HAS_RESIDUAL", "SPLIT_K"],
            prune_configs_by={"early_config_prune": _prune_matvec_configs},
            restore_value=["out_ptr"],
            do_bench=_bench_cudagraph,
        )(_matvec_kernel)
    )


# one autotuner per weight width: FP8, and 16-bit (or fp32) weights
_matvec_fp8_kernel_tuned = _tuned_matvec(_MATVEC_CONFIGS)
_matvec_kernel_tuned = _tuned_matvec(_MATVEC_16BIT_CONFIGS)


_matmul_tma_kernel_tuned = (
    None
    if INTERPRET
    else triton.autotune(
        configs=_TMA_CONFIGS + _FP8_TMA_CONFIGS,
        key=[
            "M_BUCKET",
            "N",
            "K",
            "ACTIVATION",
            "FUSED_GATE",
            "HAS_RESIDUAL",
            "X_FP8",
            "FP8_PROMOTE",
            "EPILOGUE_SUBTILE",
            "TMA_STORE",
            "WARP_SPECIALIZE",
        ],
        prune_configs_by={"early_config_prune": _prune_tma_configs},
        restore_value=["out_ptr"],
        do_bench=_bench_cudagraph,
    )(_matmul_tma_kernel)
)

# The config the autotuner chose per autotune key (shared by the plans of one bucket)
_tuned_configs: dict[tuple, triton.Config] = {}


def _tma_addressable(t: torch.Tensor) -> bool:
    """TMA reaches a 2D tensor with a 16-byte aligned base and row stride, unit column stride."""
    return t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0


def _tma_variant(out: torch.Tensor | None, n: int, elem_bytes: int) -> dict:
    """The TMA kernel's epilogue constexprs from the kernel options; TMA stores only where the
    output (given, or a fresh contiguous one) can be addressed by TMA."""
    options = kernels.utils.KERNEL_OPTIONS
    if out is None:
        store_ok = n * elem_bytes % 16 == 0
    else:
        store_ok = _tma_addressable(_as_rows("out", out, n, view_only=True))
    return {
        "EPILOGUE_SUBTILE": options["epilogue_subtile"],
        "TMA_STORE": bool(options["tma_store"]) and store_ok,
        "WARP_SPECIALIZE": bool(options["warp_specialize"]),
    }


def _elements_spanned(t: torch.Tensor | None) -> int:
    """How many elements t's view spans, from its first to its last (0 for None)."""
    if t is None or t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))


def _takes_tma(
    x2: torch.Tensor,
    weight: torch.Tensor,
    m_bucket: int,
    fp8_dot: bool = False,
    out_span: int = 0,
) -> bool:
    """Large-M fp16/bf16 problems on Hopper (and under the interpreter), when TMA can address
    both operands: 16-byte aligned bases and row strides. With fp8_dot the x operand is the
    contiguous FP8 copy the launch makes (rows of K bytes). out_span: the elements the output
    and residual span, which the kernel's epilogue addresses with int32 offsets."""
    if m_bucket <= _TMA_MIN_M_BUCKET or out_span >= 2**31:
        return False
    if not (INTERPRET or is_hopper_or_newer(x2.device)):
        return False
    if fp8_dot:
        return x2.shape[1] % 16 == 0 and _tma_addressable(weight)
    if x2.dtype == torch.float32 or weight.dtype != x2.dtype:
        return False
    return _tma_addressable(x2) and _tma_addressable(weight)


def _config_table(m_bucket: int) -> str:
    """'decode' where the decode table is on and covers the M bucket, else 'default'."""
    on = kernels.utils.KERNEL_OPTIONS["matmul_decode_table"]
    return "decode" if on and m_bucket in _DECODE_CONFIGS else "default"


def _decode_split_k(n: int, k: int, sms: int) -> int:
    """K slices of a decode-table matmul: the column blocks alone would leave SMs idle, so split
    K in halves while that is still true and each slice keeps >= _DECODE_MIN_K_SLICE (<= 8)."""
    tiles = triton.cdiv(n, _DECODE_BLOCK_N)
    split_k = 1
    while tiles * split_k < sms and k // (2 * split_k) >= _DECODE_MIN_K_SLICE and split_k < 8:
        split_k *= 2
    return split_k


def _takes_fp8_dot(weight: torch.Tensor, m_bucket: int) -> bool:
    """FP8 weights at large M on a GPU with FP8 tensor cores (Hopper; also the interpreter)."""
    if (
        weight.dtype != torch.float8_e4m3fn
        or m_bucket <= kernels.utils.KERNEL_OPTIONS["fp8_dot_min_m"]
    ):
        return False
    return INTERPRET or is_hopper_or_newer(weight.device)


@functools.lru_cache(maxsize=4096)  # called per launch, from shapes only
def _pick_split_k(
    m_bucket: int, n: int, k: int, device: torch.device, table: str = "default"
) -> int:
    """Split K for skinny M when the output tiles alone would leave SMs idle (GPU only).

    Decided from the M bucket, not M: every M of a bucket sums its K slices the same way, so a
    call padded within its bucket (a CUDA graph's) gives each row the bits of the unpadded call.

    Tuned on an H200 in bf16 (Llama-3-8B projections at M = 1..64, Bert-base at M = 16..512):
    a split pays while each slice keeps >= 768 of K (e.g. Bert's K = 3072 down projection at
    M = 128 in 4 slices); beyond that the fp32 partials cost more than the extra programs bring.
    Above M = 256 the output tiles alone fill the GPU.
    """
    if INTERPRET or device.type != "cuda" or m_bucket > 256:
        return 1
    sms = num_sms(device)
    if table == "decode":
        return _decode_split_k(n, k, sms)
    tiles = triton.cdiv(m_bucket, 64) * triton.cdiv(n, 64)
    split_k = 1
    while tiles * split_k < sms and k // (2 * split_k) >= 768 and split_k < 8:
        split_k *= 2
    return split_k


def _check_same(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.dtype != x.dtype:
        raise ValueError(f"{name}: dtype {t.dtype} does not match x's dtype {x.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name}: device {t.device} does not match x's device {x.device}")


def _as_rows(name: str, t: torch.Tensor, n_cols: int, *, view_only: bool) -> torch.Tensor:
    """[..., n_cols] -> [rows, n_cols] with a unit column stride; a view unless a copy is allowed."""
    if t.dim() == 2:
        rows = t
    elif view_only:
        try:
            rows = t.view(-1, n_cols)
        except RuntimeError as err:
            raise ValueError(
                f"{name}: cannot be viewed as [rows, {n_cols}], strides {tuple(t.stride())}"
            ) from err
    else:
        rows = t.reshape(-1, n_cols)
    if rows.stride(1) != 1 and rows.shape[1] > 1:
        if view_only:
            check_last_dim_contiguous(name, rows)
        rows = rows.contiguous()
    return rows


class _Plan:
    """What matmul decided for one signature (see kernels/launch.py)."""

    __slots__ = (
        "n", "out_shape", "split_k", "tma", "tma_blocks", "main", "epilogue", "tune", "fp8_dot",
        "x_fp16", "row_args", "tma_split", "norm_fused",
    )  # fmt: skip

    def __init__(
        self,
        n,
        out_shape,
        split_k=1,
        tma=False,
        main=None,
        epilogue=None,
        tune=None,
        fp8_dot=False,
        x_fp16=False,
    ):
        self.fp8_dot = fp8_dot  # x quantized per row to FP8 before the GEMM (FP8 tensor cores)
        self.x_fp16 = x_fp16  # x scaled per row into fp16 before the GEMM (FP8 weights)
        self.n = n  # output columns
        self.out_shape = out_shape
        self.split_k = split_k
        self.tma = tma  # the persistent TMA kernel
        # its descriptors' block shapes ([BLOCK_M, BLOCK_K], [BLOCK_N, BLOCK_K]) once known
        self.tma_blocks = _tma_blocks(main.meta) if tma and main is not None else None
        self.main = main  # KernelLaunch of the GEMM; None until its config is known
        self.epilogue = epilogue  # KernelLaunch of the split-K epilogue, or None
        self.tune = tune  # (kernel, autotuner, autotune key, grid(meta), meta) while main is None
        # TMA configs with a K split may run: (fp32 workspace elements, int32 counts per tile)
        self.tma_split = None
        # the integer arguments of a one-kernel plan whose operands are passed as they are (x,
        # residual and out viewed as rows, bias contiguous): set by _plan_row_args
        self.row_args = None
        # x's RMSNorm (rms_norm_weight) computed by the kernel that converts x (fp8_dot or
        # x_fp16): set by matmul; without a conversion the norm kernel runs first
        self.norm_fused = False


_plans = PlanCache()


def _check_fp8_weight(weight, weight_scale, input_scale, x) -> None:
    """An FP8 weight comes with its fp32 row scales (and at most one static input scale)."""
    if weight.device != x.device:
        raise ValueError(f"weight: device {weight.device} does not match x's device {x.device}")
    if weight_scale is None:
        raise ValueError("weight_scale: an FP8 weight needs its fp32 row scales [N]")
    if (
        weight_scale.shape != (weight.shape[0],)
        or weight_scale.dtype != torch.float32
        or weight_scale.device != x.device
        or weight_scale.stride(0) != 1
    ):
        raise ValueError(
            f"weight_scale: expected contiguous fp32 [{weight.shape[0]}] on {x.device}, got "
            f"{weight_scale.dtype} of shape {tuple(weight_scale.shape)} on {weight_scale.device}"
        )
    if input_scale is not None and (
        input_scale.numel() != 1
        or input_scale.dtype != torch.float32
        or input_scale.device != x.device
    ):
        raise ValueError(
            f"input_scale: expected one fp32 value on {x.device}, got {input_scale.dtype} of "
            f"shape {tuple(input_scale.shape)} on {input_scale.device}"
        )


def _plan(
    x, weight, bias, activation, residual, out, weight_scale, input_scale, rms_norm_weight=None
) -> _Plan:
    """Checks the inputs of a new signature and fixes its kernel, split and launches."""
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"activation: unknown {activation!r}, expected one of {list(_ACTIVATIONS)}"
        )
    act_name, fused_gate = _ACTIVATIONS[activation]
    if x.dtype not in _DTYPES:
        raise ValueError(f"x: dtype {x.dtype} is not supported, expected one of {_DTYPES}")
    if x.dim() < 1:
        raise ValueError(f"x: expected shape [..., K], got {tuple(x.shape)}")
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(
            f"weight: expected shape [N, {k}] for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    w_fp8 = weight.dtype == torch.float8_e4m3fn
    if w_fp8:
        _check_fp8_weight(weight, weight_scale, input_scale, x)
    else:
        _check_same("weight", weight, x)
        for name, t in (("weight_scale", weight_scale), ("input_scale", input_scale)):
            if t is not None:
                raise ValueError(f"{name}: only FP8 (float8_e4m3fn) weights take scales")
    check_last_dim_contiguous("weight", weight)
    n_w = weight.shape[0]
    if fused_gate and n_w % 2 != 0:
        raise ValueError(
            f"weight: activation {activation!r} needs the fused [2 * I, K] cat([gate, up]) weight, "
            f"got an odd number of rows: {tuple(weight.shape)}"
        )
    n = n_w // 2 if fused_gate else n_w
    out_shape = (*x.shape[:-1], n)
    if bias is not None:
        if bias.shape != (n_w,):
            raise ValueError(
                f"bias: expected shape ({n_w},) for weight of shape {tuple(weight.shape)}, got {tuple(bias.shape)}"
            )
        _check_same("bias", bias, x)
    if residual is not None:
        if tuple(residual.shape) != out_shape:
            raise ValueError(
                f"residual: expected the output's shape {out_shape}, got {tuple(residual.shape)}"
            )
        _check_same("residual", residual, x)
    if out is not None:
        if tuple(out.shape) != out_shape:
            raise ValueError(
                f"out: expected the output's shape {out_shape}, got {tuple(out.shape)}"
            )
        _check_same("out", out, x)
        _as_rows("out", out, n, view_only=True)  # raises if out cannot be written in place
    if rms_norm_weight is not None:
        if rms_norm_weight.shape != (k,):
            raise ValueError(
                f"rms_norm_weight: expected shape ({k},) for x of shape {tuple(x.shape)}, got "
                f"{tuple(rms_norm_weight.shape)}"
            )
        _check_same("rms_norm_weight", rms_norm_weight, x)
    x2 = _as_rows("x", x, k, view_only=False)
    m = x2.shape[0]
    if m == 0 or n == 0:
        return _Plan(n, out_shape)

    m_bucket = min(next_pow2(m), _M_BUCKET_CAP)
    table = _config_table(m_bucket)
    fp8_dot = _takes_fp8_dot(weight, m_bucket)
    # FP8 weights converted in registers for a bf16 x: into fp16 instead, x scaled to match
    x_fp16 = (
        w_fp8
        and not fp8_dot
        and x.dtype == torch.bfloat16
        and bool(kernels.utils.KERNEL_OPTIONS["fp8_fp16_x"])
    )
    split_k = _pick_split_k(m_bucket, n, k, x.device, table)
    # the epilogue's constexprs and the launch options, shared by all three kernels
    shared_meta = {
        "ACTIVATION": act_name,
        "HAS_BIAS": bias is not None,
        "HAS_RESIDUAL": residual is not None,
        "FUSED_GATE": fused_gate,
        "W_FP8": w_fp8,
        "X_FP8": fp8_dot,
        **pdl_meta(x.device, m),
    }
    # FP8 dots: partial sums promoted to fp32 per K slice unless the fast-accumulation option
    fp8_promote = fp8_dot and not kernels.utils.KERNEL_OPTIONS["fp8_fast_accum"]
    key = (m_bucket, n, k, act_name, fused_gate, residual is not None, bias is not None, x.dtype,
           w_fp8, fp8_dot, fp8_promote, x_fp16)  # fmt: skip

    if m == 1 and kernels.utils.KERNEL_OPTIONS["fp8_matvec" if w_fp8 else "matvec"]:
        return _matvec_plan(n, k, out_shape, shared_meta, key, x.device)
    out_span = max(m * n, _elements_spanned(residual), _elements_spanned(out))
    if split_k == 1 and _takes_tma(x2, weight, m_bucket, fp8_dot, out_span):
        variant = _tma_variant(out, n, x.element_size())
        tma_meta = {**shared_meta, **variant, "FP8_PROMOTE": fp8_promote}
        key = (*key, *variant.values())
        if INTERPRET:
            config = _INTERPRET_TMA_CONFIG
            main = KernelLaunch(
                _matmul_tma_kernel, (_INTERPRET_TMA_PROGRAMS,), {**tma_meta, **config}
            )
            plan = _Plan(n, out_shape, tma=True, main=main, fp8_dot=fp8_dot)
            splits = [config] if config["SPLIT_K"] > 1 else []
        else:
            sms = num_sms(x.device)

            def tma_grid(launch_meta):
                units = _tma_tiles(launch_meta, m, n) * launch_meta["SPLIT_K"]
                return (min(sms * launch_meta["PROGRAMS_PER_SM"], units),)

            tune = (_matmul_tma_kernel, _matmul_tma_kernel_tuned, ("tma", *key), tma_grid, tma_meta)
            plan = _Plan(n, out_shape, tma=True, tune=tune, fp8_dot=fp8_dot)
            # the tile counts are zeroed now, so not inside a capture (there the memset would run
            # at replays only)
            capturing = torch.cuda.is_current_stream_capturing()
            splits = [
                c.kwargs
                for c in _TMA_CONFIGS
                if c.kwargs["SPLIT_K"] > 1
                and not capturing
                and _tma_split_useful(c.kwargs, m_bucket, n, k, tma_meta, sms)
            ]
        if splits:  # room for the largest split config's partials, and its tiles' counts
            ws_numel = max(
                _tma_tiles(c, m, n) * c["SPLIT_K"] * c["BLOCK_M"] * c["BLOCK_N"] for c in splits
            )
            counts = torch.zeros(
                max(_tma_tiles(c, m, n) for c in splits), dtype=torch.int32, device=x.device
            )
            plan.tma_split = (ws_numel, counts)
        return plan

    meta = {
        **shared_meta,
        "CONFIG_TABLE": table,
        "FP8_PROMOTE": fp8_promote,
        "X_FP16": x_fp16,
        "SWAP_AB": w_fp8 and not fp8_dot and bool(kernels.utils.KERNEL_OPTIONS["fp8_swap_ab"]),
        "SPLIT_K": split_k,
        "DOT_PRECISION": "tf32" if fp8_dot else dot_precision(x.dtype),  # (unused by FP8 dots)
        # 0 without PDL too: one compiled variant per launch, whatever the weight's size
        "PREFETCH_K": _PREFETCH_COLUMNS
        if shared_meta["USE_PDL"]
        and weight.numel() * weight.element_size() <= _PREFETCH_MAX_WEIGHT_BYTES
        else 0,
    }

    def grid(launch_meta):
        return (
            triton.cdiv(m, launch_meta["BLOCK_M"]) * triton.cdiv(n, launch_meta["BLOCK_N"]),
            split_k,
        )

    epilogue = None
    if split_k > 1:
        epilogue = _splitk_epilogue(
            m, n, split_k, shared_meta, 32 if INTERPRET else 16, x.device, x_fp16
        )
    if INTERPRET:
        # the interpreter's fixed config: a decode table's first entry where that table is on
        config = _DECODE_CONFIGS[m_bucket][0].kwargs if table == "decode" else _INTERPRET_CONFIG
        main = KernelLaunch(_matmul_kernel, grid(config), {**meta, **config})
        return _Plan(
            n, out_shape, split_k, main=main, epilogue=epilogue, fp8_dot=fp8_dot, x_fp16=x_fp16
        )
    tune = (_matmul_kernel, _matmul_kernel_tuned, (*key, split_k, table, meta["SWAP_AB"]), grid,
            meta)  # fmt: skip
    return _Plan(
        n, out_shape, split_k, epilogue=epilogue, tune=tune, fp8_dot=fp8_dot, x_fp16=x_fp16
    )


def _plan_row_args(plan: _Plan, x, weight, bias, residual, out) -> _Plan:
    """Fix the integer arguments of a plan that launches one kernel on operands that are already
    rows (x, residual and out each a view as [rows, columns], bias contiguous), so each call
    passes its tensors as they are (their data pointers are those of the row views)."""
    if (
        plan.tma
        or plan.split_k > 1
        or plan.fp8_dot
        or plan.x_fp16
        or (plan.main is None and plan.tune is None)
    ):
        return plan
    k, n = x.shape[-1], plan.n
    x2 = _as_rows("x", x, k, view_only=False)
    res2 = _as_rows("residual", residual, n, view_only=False) if residual is not None else None
    if x2.data_ptr() != x.data_ptr() or (
        res2 is not None and res2.data_ptr() != residual.data_ptr()
    ):
        return plan  # a copy: the call makes it
    if bias is not None and not bias.is_contiguous():
        return plan
    m = x2.shape[0]
    out_stride = _as_rows("out", out, n, view_only=True).stride(0) if out is not None else n
    res_stride = res2.stride(0) if res2 is not None else 0
    plan.row_args = (m, n, k, _m_bucket(m), x2.stride(0), weight.stride(0), res_stride, out_stride,
                     0, 0)  # fmt: skip
    return plan


def _splitk_epilogue(
    m: int,
    n: int,
    split_k: int,
    shared_meta: dict,
    block_m: int,
    device: torch.device,
    x_fp16: bool = False,
) -> KernelLaunch:
    """The launch of _splitk_epilogue_kernel summing split_k fp32 partials of an [m, n] output
    (x_fp16: x was scaled into fp16, its row scales apply as an FP8 x's do).
    Its columns per program shrink (down to 32) until the grid has _SPLITK_EPILOGUE_PROGRAMS_PER_SM
    programs per SM: at decode sizes the partials are a few MB, read fast only by many programs."""
    block_n = 128 if INTERPRET else 256
    if not INTERPRET:
        wanted = _SPLITK_EPILOGUE_PROGRAMS_PER_SM * num_sms(device)
        while block_n > 32 and triton.cdiv(m, block_m) * triton.cdiv(n, block_n) < wanted:
            block_n //= 2
    meta = dict(shared_meta)
    meta["X_SCALED"] = meta.pop("X_FP8", False) or x_fp16  # the kernel's name for either
    return KernelLaunch(
        _splitk_epilogue_kernel,
        (triton.cdiv(m, block_m), triton.cdiv(n, block_n)),
        {**meta, "SPLIT_K": split_k, "BLOCK_M": block_m, "BLOCK_N": block_n},
    )


def _matvec_split_k(n_rows: int, k: int) -> int:
    """K slices of the matrix-vector kernel. Programs of few rows each keep a weight's bytes in
    flight only if there are enough rows: split K in halves while the rows times the slices stay
    within _MATVEC_SPLIT_MAX_ROWS and each slice keeps >= _MATVEC_MIN_K_SLICE (Llama-3-8B: only
    the down projection, 4096 x 14336, in two). Shapes only: the interpreter splits the same."""
    if not kernels.utils.KERNEL_OPTIONS["fp8_matvec_split_k"]:
        return 1
    split_k = 1
    while (
        n_rows * split_k * 2 <= _MATVEC_SPLIT_MAX_ROWS and k // (2 * split_k) >= _MATVEC_MIN_K_SLICE
    ):
        split_k *= 2
    return split_k


def _matvec_plan(
    n: int, k: int, out_shape, shared_meta: dict, key: tuple, device: torch.device
) -> _Plan:
    """One row of x times a weight: _matvec_kernel, BLOCK_N rows of the weight per program, and K
    split where the rows are few (the slices summed by _splitk_epilogue_kernel)."""
    n_rows = 2 * n if shared_meta["FUSED_GATE"] else n
    split_k = _matvec_split_k(n_rows, k)
    meta = {name: v for name, v in shared_meta.items() if name != "X_FP8"}
    meta["SPLIT_K"] = split_k
    meta["PRELOAD"] = bool(kernels.utils.KERNEL_OPTIONS["matvec_preload"])

    def grid(launch_meta):
        return (triton.cdiv(n, launch_meta["BLOCK_N"]), split_k)

    epilogue = None
    if split_k > 1:
        epilogue = _splitk_epilogue(1, n, split_k, shared_meta, block_m=1, device=device)
    if INTERPRET:
        config = _INTERPRET_MATVEC_CONFIG
        main = KernelLaunch(_matvec_kernel, grid(config), {**meta, **config})
        return _Plan(n, out_shape, split_k, main=main, epilogue=epilogue)
    tuned = _matvec_fp8_kernel_tuned if meta["W_FP8"] else _matvec_kernel_tuned
    tune = (_matvec_kernel, tuned, ("matvec", *key, split_k), grid, meta)
    return _Plan(n, out_shape, split_k, epilogue=epilogue, tune=tune)


def _tma_blocks(config) -> tuple[list[int], list[int], list[int], list[int] | None]:
    """The TMA descriptors' block shapes for a config (meta with its tile and variant): x's and
    the weight's tiles, the output's epilogue slice, and the weight's tail (None without one)."""
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    tail = config.get("BLOCK_N_TAIL", 0)
    return [bm, bk], [bn, bk], [bm, bn // _epilogue_slices(config)], [tail, bk] if tail else None


def _epilogue_slices(config) -> int:
    """The TMA kernel's epilogue column slices (its SLICES): the kernel option's, or the config's
    RESIDUAL_SLICES where a residual is read and they are more."""
    slices = config["EPILOGUE_SUBTILE"]
    if config["HAS_RESIDUAL"]:
        slices = max(slices, config.get("RESIDUAL_SLICES", 1))
    return slices


def _launch(plan: _Plan, x2, weight, bias, res2, out2, alpha: float, w_scale, x_scale) -> None:
    """Run a plan's kernels on 2D operands of its signature (x2 already FP8 when plan.fp8_dot, or
    fp16 when plan.x_fp16, with its row scales x_scale)."""
    if plan.main is None and plan.tune[2] in _tuned_configs:
        # the autotune key was tuned (by this plan's first call or another signature's)
        kernel, _, key, grid, meta = plan.tune
        config = _tuned_configs[key]
        tuned = config.all_kwargs()
        if plan.tma and plan.tma_split is None and tuned["SPLIT_K"] > 1:
            # a plan made inside a CUDA graph capture has no zeroed tile counts: unsplit
            tuned["SPLIT_K"] = 1
        plan.main = KernelLaunch(kernel, grid(tuned), {**meta, **tuned})
        plan.tma_blocks = _tma_blocks(plan.main.meta) if plan.tma else None
        plan.tune = None
    (m, k), n = x2.shape, plan.n
    dummy = out2  # stands in for absent pointers; never read (constexpr-disabled)
    bias_arg = bias if bias is not None else dummy
    res_arg = res2 if res2 is not None else dummy
    res_stride = res2.stride(0) if res2 is not None else 0
    w_scale_arg = w_scale if w_scale is not None else dummy
    x_scale_arg = x_scale if x_scale is not None else dummy
    ws = None
    if plan.tma:
        # placeholder block shapes while tuning: each config's pre_hook sets its own
        x_block, w_block, out_block, tail_block = plan.tma_blocks or ([16, 16],) * 4
        x_desc = TensorDescriptor(x2, [m, k], [x2.stride(0), 1], x_block)
        w_desc = TensorDescriptor(weight, list(weight.shape), [weight.stride(0), 1], w_block)
        w_tail_desc = w_desc  # unread without a tail
        if tail_block is not None:
            w_tail_desc = TensorDescriptor(
                weight, list(weight.shape), [weight.stride(0), 1], tail_block
            )
        out_desc = None
        meta = plan.main.meta if plan.main is not None else plan.tune[4]
        if meta["TMA_STORE"]:
            out_desc = TensorDescriptor(out2, [m, n], [out2.stride(0), 1], out_block)
        split_ws = counts = dummy
        if plan.tma_split is not None and (plan.main is None or plan.main.meta["SPLIT_K"] > 1):
            ws_numel, counts = plan.tma_split
            split_ws = torch.empty(ws_numel, dtype=torch.float32, device=x2.device)
        args = (x_desc, w_desc, w_tail_desc, bias_arg, res_arg, out2, out_desc, w_scale_arg,
                x_scale_arg, split_ws, counts, m, n, k, _m_bucket(m), res_stride, out2.stride(0),
                alpha)  # fmt: skip
    else:
        if plan.split_k > 1:
            ws = torch.empty(
                (plan.split_k, m, weight.shape[0]), dtype=torch.float32, device=x2.device
            )
        args = (
            x2, weight, bias_arg, res_arg, out2, ws if ws is not None else dummy, w_scale_arg,
            x_scale_arg, m, n, k,
            _m_bucket(m), x2.stride(0), weight.stride(0), res_stride, out2.stride(0),
            ws.stride(0) if ws is not None else 0, ws.stride(1) if ws is not None else 0, alpha,
        )  # fmt: skip

    if plan.main is not None:
        plan.main(*args)
    else:  # the key's first call: the autotuner benchmarks the configs and runs the best
        _, tuned, key, grid, meta = plan.tune
        tuned[grid](*args, **meta)
        _tuned_configs[key] = tuned.best_config

    if plan.epilogue is not None:
        plan.epilogue(ws, bias_arg, res_arg, out2, w_scale_arg, x_scale_arg, m, n, ws.stride(0),
                      ws.stride(1), res_stride, out2.stride(0), alpha)  # fmt: skip


def _m_bucket(m: int) -> int:
    return min(next_pow2(m), _M_BUCKET_CAP)


def matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    alpha: float = 1.0,
    out: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
    rms_norm_weight: torch.Tensor | None = None,
    rms_norm_eps: float = 0.0,
) -> torch.Tensor:
    """y = residual + alpha * act(x @ weight.T + bias), with x: [..., K] and weight: [N, K].

    For activation "silu_mul" / "gelu_tanh_mul" weight (and bias) are the fused
    cat([gate, up]) of 2 * I rows and y = act(x @ gate.T + b_gate) * (x @ up.T + b_up) has I
    columns. Returns a new tensor of shape [..., N_out] and x's dtype, or ``out`` when given
    (``out`` may be ``residual`` itself for an in-place residual add).

    FP8 weights: weight float8_e4m3fn [N, K] stands for weight * weight_scale[:, None]
    (weight_scale fp32 [N]). Small M reads the FP8 weight and converts it in registers; large M
    on FP8 tensor cores quantizes x per row first (kernels/quantize.py), with the static
    input_scale (one fp32 value) when given, else a scale per row.

    rms_norm_weight: x is first normalised, rms_norm(x, rms_norm_weight, rms_norm_eps)
    (kernels/norm.py). Where x is converted for FP8 weights (scaled into fp16, or quantized to
    FP8) the conversion's kernel computes the norm too (kernels/quantize.py rms_norm_scaled),
    with the same result; otherwise the norm kernel runs first.
    """
    if torch.compiler.is_compiling():
        norm = (rms_norm_weight, float(rms_norm_eps))
        if out is None:
            return torch.ops.zoo.matmul(
                x, weight, bias, activation, residual, alpha, weight_scale, input_scale, *norm
            )
        torch.ops.zoo.matmul_out(
            x, weight, bias, activation, residual, alpha, weight_scale, input_scale, *norm, out
        )
        return out
    key = (
        activation,
        tensor_key(x),
        tensor_key(weight),
        tensor_key(bias),
        tensor_key(residual),
        tensor_key(out),
        tensor_key(weight_scale),
        tensor_key(input_scale),
        tensor_key(rms_norm_weight),
    )
    plan = _plans.get(key)
    if plan is None:
        plan = _plan(
            x, weight, bias, activation, residual, out, weight_scale, input_scale, rms_norm_weight
        )
        plan.norm_fused = (
            rms_norm_weight is not None
            and (plan.fp8_dot or plan.x_fp16)
            and bool(kernels.utils.KERNEL_OPTIONS["fp8_fused_norm"])
            and x.shape[-1] <= NORM_MAX_K
        )
        plan = _plans.put(key, _plan_row_args(plan, x, weight, bias, residual, out))
    if rms_norm_weight is not None and not plan.norm_fused:  # no conversion to fuse it into
        return matmul(
            rms_norm(x, rms_norm_weight, rms_norm_eps),
            weight,
            bias,
            activation=activation,
            residual=residual,
            alpha=alpha,
            out=out,
            weight_scale=weight_scale,
            input_scale=input_scale,
        )
    if out is None:
        out = x.new_empty(plan.out_shape)
    if plan.row_args is not None and plan.main is not None:
        # the operands as they are; absent pointers stand in as out (never read)
        plan.main(
            x, weight,
            bias if bias is not None else out,
            residual if residual is not None else out,
            out, out,
            weight_scale if weight_scale is not None else out,
            out,
            *plan.row_args,
            float(alpha),
        )  # fmt: skip
        return out
    if plan.main is None and plan.tune is None:  # nothing to compute (M or N is 0)
        return out
    n = plan.n
    k = x.shape[-1]
    x2 = _as_rows("x", x, k, view_only=False)
    x_scale = None
    if plan.norm_fused:
        if plan.fp8_dot:
            x2, x_scale = rms_norm_scaled(
                x2, rms_norm_weight, rms_norm_eps, torch.float8_e4m3fn, input_scale
            )
        else:
            x2, x_scale = rms_norm_scaled(x2, rms_norm_weight, rms_norm_eps, torch.float16)
    elif plan.fp8_dot:
        x2, x_scale = quantize_fp8(x2, input_scale)
    elif plan.x_fp16:
        x2, x_scale = scale_to_fp16(x2)
    _launch(
        plan,
        x2,
        weight,
        bias.contiguous() if bias is not None else None,
        _as_rows("residual", residual, n, view_only=False) if residual is not None else None,
        _as_rows("out", out, n, view_only=True),
        float(alpha),
        weight_scale,
        x_scale,
    )
    return out


# torch.compile sees matmul as custom ops (Triton's launch is not traceable): a functional one,
# and one that writes into `out` (which may be the residual itself).
@torch.library.custom_op("zoo::matmul", mutates_args=())
def _matmul_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    residual: torch.Tensor | None,
    alpha: float,
    weight_scale: torch.Tensor | None,
    input_scale: torch.Tensor | None,
    rms_norm_weight: torch.Tensor | None,
    rms_norm_eps: float,
) -> torch.Tensor:
    return matmul(
        x,
        weight,
        bias,
        activation=activation,
        residual=residual,
        alpha=alpha,
        weight_scale=weight_scale,
        input_scale=input_scale,
        rms_norm_weight=rms_norm_weight,
        rms_norm_eps=rms_norm_eps,
    )


@_matmul_op.register_fake
def _(x, weight, bias, activation, residual, alpha, weight_scale, input_scale, *norm):
    fused_gate = _ACTIVATIONS.get(activation, (None, False))[1]  # (the real call checks it)
    n = weight.shape[0] // 2 if fused_gate else weight.shape[0]
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("zoo::matmul_out", mutates_args=("out",))
def _matmul_out_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    residual: torch.Tensor | None,
    alpha: float,
    weight_scale: torch.Tensor | None,
    input_scale: torch.Tensor | None,
    rms_norm_weight: torch.Tensor | None,
    rms_norm_eps: float,
    out: torch.Tensor,
) -> None:
    matmul(
        x,
        weight,
        bias,
        activation=activation,
        residual=residual,
        alpha=alpha,
        out=out,
        weight_scale=weight_scale,
        input_scale=input_scale,
        rms_norm_weight=rms_norm_weight,
        rms_norm_eps=rms_norm_eps,
    )


@_matmul_out_op.register_fake
def _(x, weight, bias, activation, residual, alpha, weight_scale, input_scale, *norm_out):
    return None
