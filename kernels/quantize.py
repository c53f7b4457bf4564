"""FP8 (e4m3) quantization of activation rows: q = round(x * (1 / s)) with one fp32 scale s per row.

Layout: x is [M, K] (any row stride, unit column stride), fp32 / fp16 / bf16; q is a new
contiguous float8_e4m3fn [M, K] and scales a new fp32 [M]. K may be any size: a row of up to
16384 is read once and held in registers, a longer one is read twice in steps.
- Dynamic (per token): s = max|x_row| / 448, so each row uses the whole e4m3 range.
- Static (a checkpoint's input_scale, one fp32 value): s is that value for every row; values
  beyond +-448 s saturate, as in the checkpoint's calibration.
Each value is multiplied by the row's reciprocal scale (1 / s rounded once, as torch computes it):
a product per value where a division would cost several instructions. Rounding is to nearest
even, bit for bit what torch's cast to float8_e4m3fn gives after x * (1 / s) clamped to +-448.
On the GPU the hardware's conversion rounds; Triton's interpreter truncates where rounding
carries into the exponent, so there the value is rounded in fp32 first (round_to_e4m3) and the
final cast converts an exactly representable value.

scale_to_fp16 puts a row into fp16 instead, for matmuls whose FP8 weights convert to fp16 in one
instruction per two values (to bf16 they take three per two): s = 2^(e - 14), where 2^e <= max|x_row|
< 2^(e + 1), so the row's largest magnitude lands in [2^14, 2^15), within fp16's range whatever
x's dtype. Multiplying by a power of two is exact, and fp16 holds 11 significant bits where bf16
holds 8: every bf16 value within 2^-28 of its row's largest converts exactly, so a dot product of
the scaled row times s is the bf16 row's own.

rms_norm_scaled fuses the RMSNorm that produces a matmul's input into either: the row is
normalised as kernels/norm.py does (fp32 statistics, rounded to x's dtype before and after the
weight multiply), then scaled as above, in one kernel that reads the row once; its output is what
the norm followed by quantize_fp8 or scale_to_fp16 gives.
"""

import torch
import triton
import triton.language as tl

from convert.fp8 import E4M3_MAX, MIN_SCALE
from kernels.launch import KernelLaunch, PlanCache, tensor_key
from kernels.norm import norm_warps
from kernels.utils import (
    INTERPRET,
    check_last_dim_contiguous,
    next_pow2,
    pdl_meta,
    wait_for_previous_grid,
)

# the format's constants (convert/fp8.py, shared with the weight quantizer) inside the kernels
_E4M3_MAX = tl.constexpr(E4M3_MAX)
_MIN_SCALE = tl.constexpr(MIN_SCALE)  # a row of zeros: any positive scale gives zeros
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SINGLE_PASS_MAX_K = 16384  # 64 fp32 values per thread of 8 warps
_MULTI_PASS_BLOCK_K = 2048
NORM_MAX_K = _SINGLE_PASS_MAX_K  # rms_norm_scaled holds the row in registers


@triton.jit
def round_to_e4m3(v):
    """fp32 v clamped to +-448 and rounded to the nearest e4m3 value (ties to even), as fp32."""
    v = tl.minimum(tl.maximum(v, -_E4M3_MAX), _E4M3_MAX)
    # normal e4m3 (|v| >= 2^-6): keep 3 of fp32's 23 mantissa bits, ties to even; a carry out of
    # the mantissa moves into the exponent, as it must
    bits = v.to(tl.uint32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    # subnormal e4m3 (|v| < 2^-6) are multiples of 2^-9: fp32 addition rounds to those next to
    # 1.5 * 2^14, whose ulp is 2^-9; the sign is put back after (-0.0 stays -0.0)
    magnitude = (tl.abs(v) + 24576.0) - 24576.0
    sign = bits & 0x80000000
    subnormal = (magnitude.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(v) < 0.015625, subnormal, normal)


@triton.jit
def _to_e4m3(v, q_ptr, HW_ROUND: tl.constexpr):
    """fp32 v clamped to +-448 and rounded to e4m3 (nearest, ties to even) in q_ptr's dtype."""
    if HW_ROUND:  # one cvt.rn.satfinite per two values; the bit arithmetic would bound the kernel
        v = tl.minimum(tl.maximum(v, -_E4M3_MAX), _E4M3_MAX)
        return v.to(q_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    return round_to_e4m3(v).to(q_ptr.dtype.element_ty)


@triton.jit
def _fp16_row_scale(amax):
    """(2^(e - 14), 2^(14 - e)) for 2^e <= amax < 2^(e + 1), built from amax's exponent bits (both
    exact). e is kept >= -111 so both stay normal fp32: a row of zeros (or of values below 2^-111)
    gets 2^-125 and converts to zeros (or to values of its own scale); inf and NaN rows stay so."""
    e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, -111)
    scale = ((e - 14 + 127) << 23).to(tl.float32, bitcast=True)
    inv_scale = ((14 - e + 127) << 23).to(tl.float32, bitcast=True)
    return scale, inv_scale


@triton.jit
def _rounded(v, q_ptr, HW_ROUND: tl.constexpr, FP16: tl.constexpr):
    """fp32 v (already scaled) rounded to q_ptr's dtype: fp16, or e4m3 clamped to +-448."""
    if FP16:
        return v.to(tl.float16)
    return _to_e4m3(v, q_ptr, HW_ROUND)


@triton.jit
def _quantize_rows_kernel(
    x_ptr,  # [M, K], row stride x_stride_m
    q_ptr,  # [M, K] float8_e4m3fn, or fp16 (scale_to_fp16), row stride q_stride_m
    scale_ptr,  # [M] fp32 out
    input_scale_ptr,  # [1] fp32: the static scale (read only when STATIC)
    norm_weight_ptr,  # [K]: the RMSNorm's weight (read only when NORM)
    K,
    x_stride_m,
    q_stride_m,
    eps,
    STATIC: tl.constexpr,
    NORM: tl.constexpr,  # x is the RMSNorm of x's rows (SINGLE_PASS only)
    SINGLE_PASS: tl.constexpr,  # BLOCK_K >= K
    HW_ROUND: tl.constexpr,  # the GPU's own conversion rounds right (the interpreter's does not)
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # an fp16 q is x scaled by a power of two (scale_to_fp16), not FP8
    FP16: tl.constexpr = q_ptr.dtype.element_ty == tl.float16
    wait_for_previous_grid(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * x_stride_m
    q_row = q_ptr + row * q_stride_m
    if SINGLE_PASS:  # the whole row stays in registers: read once, its max and its rounding
        mask = offs_k < K
        x = tl.load(x_row + offs_k, mask=mask, other=0.0).to(tl.float32)
        if NORM:  # kernels/norm.py's RMSNorm, rounded to x's dtype as that kernel's output is
            x_dtype: tl.constexpr = x_ptr.dtype.element_ty
            normed = x * tl.math.rsqrt(tl.sum(x * x, axis=0) / K + eps)
            norm_weight = tl.load(norm_weight_ptr + offs_k, mask=mask, other=0.0).to(tl.float32)
            x = (norm_weight * normed.to(x_dtype).to(tl.float32)).to(x_dtype).to(tl.float32)
    if STATIC:
        scale = tl.load(input_scale_ptr)
    else:
        if SINGLE_PASS:
            amax = tl.max(tl.abs(x), axis=0)
        else:  # a first read for the max
            amax_k = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                x_k = tl.load(x_row + k + offs_k, mask=k + offs_k < K, other=0.0)
                amax_k = tl.maximum(amax_k, tl.abs(x_k.to(tl.float32)))
            amax = tl.max(amax_k, axis=0)
        if FP16:
            scale, inv_scale = _fp16_row_scale(amax)
        else:
            scale = tl.maximum(tl.math.div_rn(amax, _E4M3_MAX), _MIN_SCALE)
    tl.store(scale_ptr + row, scale)
    if not FP16:
        inv_scale = tl.math.div_rn(1.0, scale)
    if SINGLE_PASS:
        tl.store(q_row + offs_k, _rounded(x * inv_scale, q_ptr, HW_ROUND, FP16), mask=mask)
    else:  # a second read to round
        for k in range(0, K, BLOCK_K):
            mask_k = k + offs_k < K
            x_k = tl.load(x_row + k + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            tl.store(
                q_row + k + offs_k, _rounded(x_k * inv_scale, q_ptr, HW_ROUND, FP16), mask=mask_k
            )


_plans = PlanCache()


def _plan(
    x: torch.Tensor, input_scale: torch.Tensor | None, norm_weight: torch.Tensor | None
) -> KernelLaunch:
    """Checks the inputs of a new signature and fixes its launch."""
    if x.dim() != 2:
        raise ValueError(f"x: expected shape [M, K], got {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x: dtype {x.dtype} is not supported, expected one of {_DTYPES}")
    check_last_dim_contiguous("x", x)
    if input_scale is not None:
        if input_scale.numel() != 1 or input_scale.dtype != torch.float32:
            raise ValueError(
                f"input_scale: expected one fp32 value, got {input_scale.dtype} of shape "
                f"{tuple(input_scale.shape)}"
            )
        if input_scale.device != x.device:
            raise ValueError(f"input_scale: device {input_scale.device} != x's {x.device}")
    k = x.shape[1]
    if norm_weight is not None:
        if norm_weight.shape != (k,) or norm_weight.dtype != x.dtype:
            raise ValueError(
                f"norm_weight: expected {x.dtype} of shape ({k},) for x of shape "
                f"{tuple(x.shape)}, got {norm_weight.dtype} of shape {tuple(norm_weight.shape)}"
            )
        if norm_weight.device != x.device:
            raise ValueError(f"norm_weight: device {norm_weight.device} != x's {x.device}")
        if k > _SINGLE_PASS_MAX_K:
            raise ValueError(
                f"x: rows of {k} > {_SINGLE_PASS_MAX_K} values cannot be normalised here"
            )
    # rows up to _SINGLE_PASS_MAX_K are held whole in registers (every model's K); longer ones
    # are read twice, in steps: once for their max, once to round
    block_k = next_pow2(k) if k <= _SINGLE_PASS_MAX_K else _MULTI_PASS_BLOCK_K
    if INTERPRET:
        num_warps = 4
    elif norm_weight is not None:  # the norm kernel's warps: its sum of squares in its order
        num_warps = norm_warps(block_k)
    else:
        num_warps = min(max(block_k // 256, 1), 8)
    meta = {
        "STATIC": input_scale is not None,
        "NORM": norm_weight is not None,
        "SINGLE_PASS": block_k >= k,
        "HW_ROUND": not INTERPRET,
        "BLOCK_K": block_k,
        "num_warps": num_warps,
        **pdl_meta(x.device, x.shape[0]),
    }
    return KernelLaunch(_quantize_rows_kernel, (x.shape[0],), meta)


def quantize_fp8(
    x: torch.Tensor, input_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn [M, K], scales fp32 [M]) of x [M, K], per row (dynamic) or with the
    static input_scale (one fp32 value): x ~= q * scales[:, None]."""
    if torch.compiler.is_compiling():
        q, scales = torch.ops.zoo.quantize_fp8(x, input_scale)
        return q, scales
    return _quantize_rows(x, input_scale, torch.float8_e4m3fn)


def scale_to_fp16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q fp16 [M, K], scales fp32 [M]) of x [M, K]: each row times a power of two (its largest
    magnitude in [2^14, 2^15)), x == q * scales[:, None] for every bf16 value within 2^-28 of its
    row's largest."""
    return _quantize_rows(x, None, torch.float16)


def rms_norm_scaled(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    dtype: torch.dtype,
    input_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales) of y = rms_norm(x, norm_weight, eps) (kernels/norm.py, y in x's dtype) in one
    kernel: quantize_fp8(y, input_scale) for dtype float8_e4m3fn, scale_to_fp16(y) for float16.
    x: [M, K] with K <= 16384."""
    if dtype not in (torch.float8_e4m3fn, torch.float16):
        raise ValueError(f"dtype: expected torch.float8_e4m3fn or torch.float16, got {dtype}")
    if dtype == torch.float16 and input_scale is not None:
        raise ValueError("input_scale: fp16 rows take a power of two per row, not a static scale")
    return _quantize_rows(x, input_scale, dtype, norm_weight, eps)


def _quantize_rows(
    x: torch.Tensor,
    input_scale: torch.Tensor | None,
    dtype: torch.dtype,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    key = (tensor_key(x), tensor_key(input_scale), dtype, tensor_key(norm_weight))
    launch = _plans.get(key)
    if launch is None:
        launch = _plans.put(key, _plan(x, input_scale, norm_weight))
    m, k = x.shape
    q = torch.empty((m, k), dtype=dtype, device=x.device)
    scales = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scales
    launch(
        x,
        q,
        scales,
        input_scale if input_scale is not None else scales,
        norm_weight if norm_weight is not None else scales,
        k,
        x.stride(0),
        q.stride(0),
        float(eps),
    )
    return q, scales


@torch.library.custom_op("zoo::quantize_fp8", mutates_args=())
def _quantize_fp8_op(
    x: torch.Tensor, input_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_fp8(x, input_scale)


@_quantize_fp8_op.register_fake
def _(x, input_scale):
    return (
        x.new_empty(x.shape, dtype=torch.float8_e4m3fn),
        x.new_empty(x.shape[0], dtype=torch.float32),
    )
