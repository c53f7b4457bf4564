"""Relative position bias (T5): out[b, h, i, j] = table[buckets[clamp(j - q_pos, -R, R) + R], h].

q_pos = query_offset[b] + i is the absolute position of query i of row b (query_offset is a
device tensor, e.g. a KV cache's lengths, so a decode step reads it without a host sync); key j
sits at position j. `buckets` is an int32 table [2R + 1]: the bucket of every relative position
-R..R (the caller computes it once with its own bucket function); relative positions beyond +-R
take the bucket of +-R. `table` is [num_buckets, H] (an nn.Embedding weight: bucket rows, head
columns, contiguous last dim). The output [B, H, Tq, S] (B = 1 without query_offset) is in the
table's dtype: the values are copied, never rounded, and the result is the additive `bias` of
kernels.attention / kernels.decode.

CUDA-graph safe: the grid depends on B, Tq and S only. Tq, S and H may be any size (masked).
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
def _relative_bias_kernel(
    table_ptr,  # [num_buckets, H], row stride table_stride_bucket
    buckets_ptr,  # [2R + 1] int32
    query_offset_ptr,  # [B] int32 (only read when HAS_OFFSET)
    out_ptr,  # [B, H, Tq, S], contiguous
    table_stride_bucket,
    out_stride_b,
    out_stride_h,
    Tq,
    S,
    H,
    max_distance,  # R
    HAS_OFFSET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous_grid(USE_PDL)
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < Tq)[:, None] & (offs_n < S)[None, :]

    q_pos = offs_m
    if HAS_OFFSET:
        q_pos += tl.load(query_offset_ptr + b).to(tl.int64)
    relative = offs_n[None, :] - q_pos[:, None]  # memory position - query position
    relative = tl.minimum(tl.maximum(relative, -max_distance), max_distance)
    bucket = tl.load(buckets_ptr + relative + max_distance, mask=mask, other=0).to(tl.int64)

    out_base = out_ptr + b * out_stride_b + offs_m[:, None] * S + offs_n[None, :]
    table_base = table_ptr + bucket * table_stride_bucket
    for h in range(H):
        value = tl.load(table_base + h, mask=mask, other=0.0)
        tl.store(out_base + h * out_stride_h, value, mask=mask)


_plans = PlanCache()


def _plan(table, buckets, query_length, key_length, query_offset) -> KernelLaunch:
    """Checks the inputs of a new signature and fixes its launch."""
    if table.dim() != 2:
        raise ValueError(f"table: expected [num_buckets, H], got shape {tuple(table.shape)}")
    check_last_dim_contiguous("table", table)
    if buckets.dim() != 1 or buckets.numel() % 2 != 1 or buckets.dtype != torch.int32:
        raise ValueError(
            f"buckets: expected int32 of odd length 2R + 1, got {buckets.dtype} "
            f"{tuple(buckets.shape)}"
        )
    if not buckets.is_contiguous():
        raise ValueError("buckets: expected a contiguous tensor")
    if buckets.device != table.device:
        raise ValueError(f"buckets: on {buckets.device}, table on {table.device}")
    if query_length < 1 or key_length < 1:
        raise ValueError(f"query_length {query_length} and key_length {key_length} must be >= 1")
    batch = 1
    if query_offset is not None:
        if (
            query_offset.dim() != 1
            or query_offset.dtype != torch.int32
            or not query_offset.is_contiguous()
            or query_offset.device != table.device
        ):
            raise ValueError(
                f"query_offset: expected a contiguous int32 [B] tensor on {table.device}, got "
                f"{query_offset.dtype} {tuple(query_offset.shape)} on {query_offset.device}"
            )
        batch = query_offset.shape[0]
    if INTERPRET:  # few, large programs: the interpreter pays per program instance
        block_m = min(next_pow2(query_length), 64)
        block_n = min(next_pow2(key_length), 256)
    else:
        block_m = min(next_pow2(query_length), 16)
        block_n = min(next_pow2(key_length), 128)
    grid = (triton.cdiv(query_length, block_m), triton.cdiv(key_length, block_n), batch)
    meta = {
        "HAS_OFFSET": query_offset is not None,
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "num_warps": 4,
        **pdl_meta(table.device, batch * query_length),
    }
    return KernelLaunch(_relative_bias_kernel, grid, meta)


def relative_position_bias(
    table: torch.Tensor,
    buckets: torch.Tensor,
    query_length: int,
    key_length: int,
    query_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bias [B, H, Tq, S] (B = 1 without query_offset) for queries at positions
    query_offset[b] + i (i < query_length) and keys at positions j < key_length.

    table: [num_buckets, H] (contiguous last dim); buckets: contiguous int32 [2R + 1], the bucket
    of relative position r at index r + R, every value < num_buckets; query_offset: int32 [B] on
    the table's device (None: 0). The output has the table's dtype.
    """
    if torch.compiler.is_compiling():
        return torch.ops.zoo.relative_position_bias(
            table, buckets, query_length, key_length, query_offset
        )
    key = (
        query_length,
        key_length,
        tensor_key(table),
        tensor_key(buckets),
        tensor_key(query_offset),
    )
    launch = _plans.get(key)
    if launch is None:
        launch = _plans.put(key, _plan(table, buckets, query_length, key_length, query_offset))
    batch = query_offset.shape[0] if query_offset is not None else 1
    heads = table.shape[1]
    out = table.new_empty((batch, heads, query_length, key_length))
    launch(
        table,
        buckets,
        query_offset if query_offset is not None else buckets,
        out,
        table.stride(0),
        out.stride(0),
        out.stride(1),
        query_length,
        key_length,
        heads,
        buckets.shape[0] // 2,
    )
    return out


# torch.compile sees the launcher as a custom op (Triton's launch is not traceable).
@torch.library.custom_op("zoo::relative_position_bias", mutates_args=())
def _relative_position_bias_op(
    table: torch.Tensor,
    buckets: torch.Tensor,
    query_length: int,
    key_length: int,
    query_offset: torch.Tensor | None,
) -> torch.Tensor:
    return relative_position_bias(table, buckets, query_length, key_length, query_offset)


@_relative_position_bias_op.register_fake
def _(table, buckets, query_length, key_length, query_offset):
    batch = query_offset.shape[0] if query_offset is not None else 1
    return table.new_empty((batch, table.shape[1], query_length, key_length))
