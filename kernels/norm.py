"""LayerNorm and RMSNorm over the last dimension, with an optional fused residual add.

Layout: x is [..., N] with a contiguous last dim; the leading dims are flattened to rows (any row
stride). One program normalises one row, so N (any size, not only powers of two) must fit in one
block: fine for every hidden size of the zoo (<= 8192).

Numerics follow HF: statistics in fp32; for RMSNorm the normalised row is cast back to the input
dtype before the weight multiply (HF LlamaRMSNorm / T5LayerNorm); LayerNorm rounds once at the end
(torch.nn.LayerNorm). With a residual, s = x + residual is rounded to the dtype first (HF adds in
the model dtype), written out as the new residual stream, and normalised.
"""

import torch
import triton
import triton.language as tl

from kernels.launch import KernelLaunch, PlanCache, tensor_key
from kernels.utils import (
    INTERPRET,
    check_last_dim_contiguous,
    next_pow2,
    pdl_meta,
    wait_for_previous_grid,
)


@triton.jit
def _norm_kernel(
    x_ptr,
    residual_ptr,
    residual_out_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    x_stride_row,
    residual_stride_row,
    residual_out_stride_row,
    out_stride_row,
    N,
    eps,
    IS_RMS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous_grid(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N

    x = tl.load(x_ptr + row * x_stride_row + offs_n, mask=mask_n, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(
            residual_ptr + row * residual_stride_row + offs_n, mask=mask_n, other=0.0
        )
        x = x + residual  # rounded to the model dtype, as HF's `residual + hidden_states`
        tl.store(residual_out_ptr + row * residual_out_stride_row + offs_n, x, mask=mask_n)
    x_f32 = x.to(tl.float32)
    weight = tl.load(weight_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)

    if IS_RMS:
        variance = tl.sum(x_f32 * x_f32, axis=0) / N
        normed = x_f32 * tl.math.rsqrt(variance + eps)
        # HF LlamaRMSNorm: `weight * hidden_states.to(input_dtype)`
        y = weight * normed.to(x.dtype).to(tl.float32)
    else:
        mean = tl.sum(x_f32, axis=0) / N
        centered = tl.where(mask_n, x_f32 - mean, 0.0)
        variance = tl.sum(centered * centered, axis=0) / N
        y = centered * tl.math.rsqrt(variance + eps) * weight
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride_row + offs_n, y.to(out_ptr.dtype.element_ty), mask=mask_n)


_plans = PlanCache()


def norm_warps(block_n: int) -> int:
    """Warps of one row's program (kernels/quantize.py's fused RMSNorm takes the same, so that
    its sum of squares adds in the same order)."""
    return min(max(block_n // 256, 1), 16)


class _Plan:
    """One signature's launch and what every call of it allocates: outputs of x's shape, written
    as [rows, N] (x's own shape and strides are part of the signature)."""

    __slots__ = ("launch", "n", "row_stride", "residual_row_stride")

    def __init__(self, launch, n, row_stride, residual_row_stride) -> None:
        self.launch = launch
        self.n = n
        self.row_stride, self.residual_row_stride = row_stride, residual_row_stride


def _plan(x, weight, bias, residual, is_rms) -> _Plan:
    """Checks the inputs of a new signature and fixes its launch."""
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight: expected shape ({n},), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias: expected shape ({n},), got {tuple(bias.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual: shape {tuple(residual.shape)} != x {tuple(x.shape)}")
    if residual is not None and residual.dtype != x.dtype:
        raise ValueError(f"residual: dtype {residual.dtype} != x {x.dtype}")
    if x.numel() == 0:
        raise ValueError("x: empty input")
    check_last_dim_contiguous("x", x)
    if residual is not None:
        check_last_dim_contiguous("residual", residual)
    rows = x.numel() // n
    block_n = next_pow2(n)
    meta = {
        "IS_RMS": is_rms,
        "HAS_RESIDUAL": residual is not None,
        "HAS_BIAS": bias is not None,
        "BLOCK_N": block_n,
        "num_warps": 4 if INTERPRET else norm_warps(block_n),
        **pdl_meta(x.device, rows),
    }
    # x (and residual) as [rows, N]: a view where the strides allow, else a copy per call
    row_stride = _row_stride(x)
    residual_row_stride = _row_stride(residual) if residual is not None else row_stride
    return _Plan(KernelLaunch(_norm_kernel, (rows,), meta), n, row_stride, residual_row_stride)


def _row_stride(t: torch.Tensor) -> int | None:
    """The row stride of t viewed as [rows, N], or None when no view exists (t is copied)."""
    try:
        return t.view(-1, t.shape[-1]).stride(0)
    except RuntimeError:
        return None


def _norm(x, weight, bias, eps, residual, is_rms):
    key = (is_rms, tensor_key(x), tensor_key(weight), tensor_key(bias), tensor_key(residual))
    plan = _plans.get(key)
    if plan is None:
        plan = _plans.put(key, _plan(x, weight, bias, residual, is_rms))
    n = plan.n
    x_stride = plan.row_stride
    if x_stride is None:
        x, x_stride = x.contiguous(), n
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if residual is None:
        plan.launch(x, x, x, weight, bias if bias is not None else weight, out,
                    x_stride, x_stride, x_stride, n, n, float(eps))  # fmt: skip
        return out
    residual_stride = plan.residual_row_stride
    if residual_stride is None:
        residual, residual_stride = residual.contiguous(), n
    residual_out = torch.empty_like(out)
    plan.launch(x, residual, residual_out, weight, bias if bias is not None else weight, out,
                x_stride, residual_stride, n, n, n, float(eps))  # fmt: skip
    return out, residual_out


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x (or of x + residual). Returns y, or (y, x + residual) when residual is given."""
    if torch.compiler.is_compiling():
        return _unpack(torch.ops.zoo.rms_norm(x, weight, eps, residual))
    return _norm(x, weight, None, eps, residual, is_rms=True)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm of x (or of x + residual). Returns y, or (y, x + residual) when residual is given."""
    if torch.compiler.is_compiling():
        return _unpack(torch.ops.zoo.layer_norm(x, weight, bias, eps, residual))
    return _norm(x, weight, bias, eps, residual, is_rms=False)


# torch.compile sees the launchers as custom ops (opaque to tracing: Triton's launch is not
# traceable); they return [y] or [y, x + residual].
def _unpack(outputs):
    return outputs[0] if len(outputs) == 1 else (outputs[0], outputs[1])


def _as_list(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, tuple) else [result]


@torch.library.custom_op("zoo::rms_norm", mutates_args=())
def _rms_norm_op(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> list[torch.Tensor]:
    return _as_list(_norm(x, weight, None, eps, residual, is_rms=True))


@torch.library.custom_op("zoo::layer_norm", mutates_args=())
def _layer_norm_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
) -> list[torch.Tensor]:
    return _as_list(_norm(x, weight, bias, eps, residual, is_rms=False))


def _norm_fake(x, residual):
    if residual is None:
        return [torch.empty_like(x, memory_format=torch.contiguous_format)]
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(2)]


@_rms_norm_op.register_fake
def _(x, weight, eps, residual):
    return _norm_fake(x, residual)


@_layer_norm_op.register_fake
def _(x, weight, bias, eps, residual):
    return _norm_fake(x, residual)
