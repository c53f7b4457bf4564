"""Small helpers shared by the kernel launchers (no kernels here)."""

import os

import torch
import triton

# The interpreter runs every program instance on the CPU: launchers pick large fixed blocks
# there and skip autotuning (which needs a GPU driver).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(
            f"{name}: the last dimension must be contiguous, got strides {tuple(t.stride())}"
        )


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands get IEEE fp32 products (tl.dot defaults to tf32 on the GPU), as torch does."""
    return "ieee" if dtype == torch.float32 else "tf32"
