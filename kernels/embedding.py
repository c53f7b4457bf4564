"""Embedding gather: out[r] = scale * weight[ids[r]] (+ position_weight[positions[r]]).

ids and positions are integer tensors of the same shape (any, flattened to rows); weight tables are
[V, N] with a contiguous last dim. Out-of-range ids are never read (the row is written as zeros);
models validate ids on the host before calling, so this only guards memory safety.
The optional position table serves GPT-2 and Bert (learned absolute positions); scale serves
Granite's embedding_multiplier. The sum is formed in fp32 and rounded once.
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
def _embedding_kernel(
    ids_ptr,
    weight_ptr,
    positions_ptr,
    position_weight_ptr,
    out_ptr,
    num_embeddings,
    num_positions,
    weight_stride,
    position_weight_stride,
    out_stride,
    N,
    scale,
    HAS_POSITIONS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous_grid(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    token = tl.load(ids_ptr + row).to(tl.int64) + tl.zeros([BLOCK_N], dtype=tl.int64)
    token_ok = (token >= 0) & (token < num_embeddings)
    x = tl.load(weight_ptr + token * weight_stride + offs_n, mask=mask_n & token_ok, other=0.0)
    y = x.to(tl.float32) * scale
    if HAS_POSITIONS:
        position = tl.load(positions_ptr + row).to(tl.int64) + tl.zeros([BLOCK_N], dtype=tl.int64)
        position_ok = (position >= 0) & (position < num_positions)
        p = tl.load(
            position_weight_ptr + position * position_weight_stride + offs_n,
            mask=mask_n & position_ok,
            other=0.0,
        )
        y += p.to(tl.float32)
    tl.store(out_ptr + row * out_stride + offs_n, y.to(out_ptr.dtype.element_ty), mask=mask_n)


_plans = PlanCache()
_MISSING = object()


def _plan(ids, weight, positions, position_weight) -> tuple[KernelLaunch, tuple] | None:
    """Checks the inputs of a new signature and fixes its launch and integer arguments (table
    sizes and strides, width): None where there are no rows."""
    check_last_dim_contiguous("weight", weight)
    if (positions is None) != (position_weight is None):
        raise ValueError("positions and position_weight must be given together")
    if position_weight is not None:
        check_last_dim_contiguous("position_weight", position_weight)
        if positions.shape != ids.shape:
            raise ValueError(f"positions: shape {tuple(positions.shape)} != ids {tuple(ids.shape)}")
        if position_weight.shape[1] != weight.shape[1]:
            raise ValueError(
                f"position_weight: width {position_weight.shape[1]} != weight {weight.shape[1]}"
            )
    rows = ids.numel()
    if rows == 0:
        return None
    meta = {
        "HAS_POSITIONS": positions is not None,
        "BLOCK_N": next_pow2(weight.shape[1]),
        "num_warps": 4,
        **pdl_meta(weight.device, rows),
    }
    n = weight.shape[1]
    table = position_weight if position_weight is not None else weight
    fixed = (weight.shape[0], table.shape[0], weight.stride(0), table.stride(0), n, n)
    return KernelLaunch(_embedding_kernel, (rows,), meta), fixed


def embedding(
    ids: torch.Tensor,
    weight: torch.Tensor,
    *,
    scale: float = 1.0,
    positions: torch.Tensor | None = None,
    position_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gather rows of weight for ids ([...] -> [..., N]), times scale, plus optional positions."""
    if torch.compiler.is_compiling():
        return torch.ops.zoo.embedding(ids, weight, scale, positions, position_weight)
    key = (tensor_key(ids), tensor_key(weight), tensor_key(positions), tensor_key(position_weight))
    plan = _plans.get(key, _MISSING)
    if plan is _MISSING:
        plan = _plans.put(key, _plan(ids, weight, positions, position_weight))
    n = weight.shape[1]
    out = weight.new_empty((*ids.shape, n))
    if plan is None:
        return out
    launch, fixed = plan
    ids_flat = ids.reshape(-1)
    positions_flat = positions.reshape(-1) if positions is not None else ids_flat
    table = position_weight if position_weight is not None else weight
    launch(ids_flat, weight, positions_flat, table, out, *fixed, float(scale))
    return out


# torch.compile sees the launcher as a custom op (Triton's launch is not traceable).
@torch.library.custom_op("zoo::embedding", mutates_args=())
def _embedding_op(
    ids: torch.Tensor,
    weight: torch.Tensor,
    scale: float,
    positions: torch.Tensor | None,
    position_weight: torch.Tensor | None,
) -> torch.Tensor:
    return embedding(ids, weight, scale=scale, positions=positions, position_weight=position_weight)


@_embedding_op.register_fake
def _(ids, weight, scale, positions, position_weight):
    return weight.new_empty((*ids.shape, weight.shape[1]))
