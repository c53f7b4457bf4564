"""Static KV cache: preallocated on the model's device, indexed by device tensors only.

Every row of a batch advances in lockstep (one token per decode step). Left padding is described
by `kv_start` (the first real slot of each row); `lengths` counts the slots written so far. Both
live on the device and are updated in place by the model's forward, so a decode step reads and
writes the cache without any host-side index: it can be captured once in a CUDA graph and replayed.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer: k[layer], v[layer] are [B, Hkv, max_length, D]."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_length: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        # zeros, not empty: unwritten slots are masked out, but must never hold NaN bit patterns.
        # One tensor per layer, not views of one: under torch.compile with dynamic shapes, a
        # custom op's writes into views of a buffer made inside the graph are lost (torch 2.13)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.kv_start = torch.zeros(batch_size, dtype=torch.int32, device=device)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_length(self) -> int:
        return self.k[0].shape[2]

    def reset(self, kv_start: torch.Tensor | None = None) -> None:
        """Empty the cache in place (same buffers, so captured graphs stay valid)."""
        self.lengths.zero_()
        if kv_start is None:
            self.kv_start.zero_()
        else:
            self.kv_start.copy_(kv_start)
