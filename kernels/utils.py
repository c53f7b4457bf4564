"""Small helpers shared by the kernel launchers (no kernels here)."""

import functools
import os

import torch

# The interpreter runs every program instance on the CPU: launchers pick large fixed blocks
# there and skip autotuning (which needs a GPU driver).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1); plain int arithmetic, called per launch."""
    return 1 << (max(int(n), 1) - 1).bit_length()


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: launchers ask on every call)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(
            f"{name}: the last dimension must be contiguous, got strides {tuple(t.stride())}"
        )


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands get IEEE fp32 products (tl.dot defaults to tf32 on the GPU), as torch does."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_attention_inputs(q, k, v, kv_start, kv_end, bias):
    """Shared checks of the attention launchers. q [B, Tq, Hq, D]; k, v [B, S, Hkv, D] with a
    contiguous last dim; kv_start / kv_end contiguous int32 [B] or None; bias broadcastable to
    [B, Hq, Tq, S] in fp32 or q's dtype. Returns the bias expanded to that shape (or None)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v: expected 4-d tensors [B, T, H, D]")
    batch, seq_q, heads_q, head_dim = q.shape
    _, seq_k, heads_kv, _ = k.shape
    if k.shape != (batch, seq_k, heads_kv, head_dim) or v.shape != k.shape:
        raise ValueError(
            f"k, v: expected shape {(batch, seq_k, heads_kv, head_dim)}, "
            f"got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if heads_q % heads_kv != 0:
        raise ValueError(f"Hq ({heads_q}) must be a multiple of Hkv ({heads_kv})")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v: dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_last_dim_contiguous(name, t)
    for name, t in (("kv_start", kv_start), ("kv_end", kv_end)):
        if t is not None and (
            t.shape != (batch,) or t.dtype != torch.int32 or not t.is_contiguous()
        ):
            raise ValueError(f"{name}: expected a contiguous int32 tensor of shape ({batch},)")
    if bias is None:
        return None
    if bias.dtype not in (torch.float32, q.dtype):
        raise ValueError(f"bias: dtype {bias.dtype} must be float32 or {q.dtype}")
    return bias.expand(batch, heads_q, seq_q, seq_k)
