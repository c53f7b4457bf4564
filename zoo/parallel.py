"""Tensor parallelism over torch.distributed (NCCL on GPUs, gloo on the CPU).

Each rank holds a slice of every large matrix (convert.shard says which): the fused QKV with its
query heads and their key/value heads, the fused gate-up with its MLP rows, the matching input
columns of the attention-out and down projections (RowParallelLinear: one all-reduce each), and
ceil(V / N) rows of the LM head (the logits are all-gathered, so every rank reads 1/N of the head
per step and ends with the same full logits). Embedding and norms are replicated.

The residual stream is the same on every rank: rank 0's row-split matmuls add the residual (and
the bias) in their epilogue, the other ranks' add nothing, and the all-reduce sums the parts. The
logits are identical bits on every rank (each vocabulary part is computed once, then gathered),
so every rank chooses the same tokens from the same seed: generation needs no other exchange.

On CUDA the all-reduces of a decode step (a few KB each, where latency is what counts) take
torch's one-shot all-reduce over symmetric memory when the GPUs support it, NCCL otherwise; all
collectives are captured inside the CUDA graphs of the decode step and the plain calls.

Only imported for tp > 1: a single-GPU model never touches torch.distributed.
"""

from __future__ import annotations

import gc
import math
import os
import warnings
import weakref

import torch
import torch.distributed as dist
from torch import nn

from convert.shard import Shard
from kernels.matmul import matmul
from zoo.layers import Linear

# what torchrun sets for each process
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# With symmetric memory on: all-reduces of up to this many bytes take the one-shot kernel
# (a decode step's activations: batch x hidden x 2 bytes); larger ones stay with NCCL.
SYMMETRIC_MAX_BYTES = 2**20
# one buffer per projection kind (attention out, down), so consecutive all-reduces alternate
# buffers: a rank writes a buffer again only after every peer has entered the all-reduce in
# between, which it can only do once it finished reading that buffer
SYMMETRIC_SLOTS = 2

# torch >= 2.13 names it all_gather_single; earlier releases all_gather_into_tensor
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class TensorParallel:
    """The ranks a tensor-parallel model spans: its process group, this rank's Shard and the
    collectives the model and the generation engine use."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device) -> None:
        self.group = group
        self.device = device
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.shard = Shard(self.rank, self.world)
        self._first_rank = dist.get_global_rank(group, 0)
        self._symmetric: list[torch.Tensor] | None = None  # SYMMETRIC_SLOTS buffers, when on
        self._models: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # prepare_gpu's models
        _INSTANCES.add(self)

    def __reduce__(self):
        raise TypeError("a tensor-parallel model belongs to its processes: it cannot be copied")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place (capturable in a CUDA graph with NCCL)."""
        dist.all_reduce(x, group=self.group)
        return x

    def gather_vocab(self, local: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Logits [..., V] on every rank from each rank's part [..., rows of its head shard]."""
        part = self.shard.vocab_part(vocab_size)
        if local.shape[-1] < part:  # the last rank's part, when V does not divide
            local = nn.functional.pad(local, (0, part - local.shape[-1]))
        rows = local.reshape(-1, part).contiguous()
        gathered = rows.new_empty((self.world * rows.shape[0], part))  # the ranks' rows, stacked
        _all_gather_single(gathered, rows, group=self.group)
        logits = gathered.view(self.world, -1, part).permute(1, 0, 2)  # (rows, world, part)
        logits = logits.reshape(*local.shape[:-1], self.world * part)
        return logits if self.world * part == vocab_size else logits[..., :vocab_size]

    def broadcast_int(self, value: int) -> int:
        """Rank 0's value, on every rank."""
        t = torch.tensor([value], dtype=torch.int64, device=self._collective_device())
        dist.broadcast(t, src=self._first_rank, group=self.group)
        return int(t.item())

    def max_over_ranks(self, value: int) -> int:
        """The largest of the ranks' values, on every rank."""
        t = torch.tensor([value], dtype=torch.int64, device=self._collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())

    def shared_value(self, value: int, pick: str) -> int:
        """rank 0's value ("first") or the smallest ("min"), on every rank."""
        if pick == "first":
            return self.broadcast_int(value)
        if pick == "min":
            return -self.max_over_ranks(-value)
        raise ValueError(f"pick: expected 'first' or 'min', got {pick!r}")

    def row_linear(
        self, in_features: int, out_features: int, bias: bool, slot: int = 0
    ) -> RowParallelLinear:
        """A projection whose input features (in_features: this rank's) are split over ranks;
        slot: its symmetric-memory buffer (projections that follow each other use different
        ones)."""
        return RowParallelLinear(in_features, out_features, bias, self, slot % SYMMETRIC_SLOTS)

    # ------------------------------------------------------------------ symmetric memory

    def enable_symmetric_memory(
        self, dtype: torch.dtype, max_bytes: int = SYMMETRIC_MAX_BYTES
    ) -> bool:
        """Route the row-split projections' all-reduces of up to max_bytes (of dtype) through
        torch's symmetric-memory one-shot all-reduce (torch.distributed._symmetric_memory: each
        GPU reads its peers' parts directly, with less latency than NCCL at decode sizes); the
        rest stays with NCCL. zoo.load turns it on for CUDA models. Returns whether it is on:
        False, NCCL kept, on the CPU, with a torch without it, or where the GPUs cannot map
        each other's memory (checked with a trial all-reduce; every rank must agree). Call on
        every rank alike; graphs captured before keep what they captured (model.engine.reset()
        drops them)."""
        if self.device.type != "cuda":
            return False
        try:
            buffers = self._symmetric_buffers(dtype, max_bytes)
            trial = buffers[0][: self.world]
            trial.fill_(self.rank + 1)
            total = torch.ops.symm_mem.one_shot_all_reduce(trial, "sum", self.group.group_name)
            works = bool((total == self.world * (self.world + 1) // 2).all())
        except Exception:  # any failure of the optional path leaves NCCL in place
            buffers, works = None, False
        works = self.max_over_ranks(0 if works else 1) == 0
        self._symmetric = buffers if works else None
        return works

    def disable_symmetric_memory(self) -> None:
        """Back to NCCL for every all-reduce (for graphs captured from now on: call
        model.engine.reset() to drop the others)."""
        self._symmetric = None

    @property
    def symmetric_memory(self) -> bool:
        """Whether small all-reduces take the one-shot kernel over symmetric memory."""
        return self._symmetric is not None

    def symmetric_out(self, shape: tuple[int, ...], dtype: torch.dtype, slot: int):
        """A view of symmetric buffer `slot` to write a projection's output of this shape into,
        or None: NCCL for this all-reduce (off, too large, another dtype)."""
        if self._symmetric is None:
            return None
        buffer = self._symmetric[slot]
        numel = math.prod(shape)
        if buffer.dtype != dtype or numel > buffer.numel():
            return None
        return buffer[:numel].view(shape)

    def one_shot_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of x, a view returned by symmetric_out (a new tensor)."""
        return torch.ops.symm_mem.one_shot_all_reduce(x, "sum", self.group.group_name)

    def _symmetric_buffers(self, dtype: torch.dtype, max_bytes: int) -> list[torch.Tensor]:
        import torch.distributed._symmetric_memory as symm_mem

        with warnings.catch_warnings():  # needed by older torch, a deprecated no-op in newer
            warnings.simplefilter("ignore", FutureWarning)
            symm_mem.enable_symm_mem_for_group(self.group.group_name)
        numel = max(max_bytes // dtype.itemsize, self.world)
        buffers = []
        for _ in range(SYMMETRIC_SLOTS):
            buffer = symm_mem.empty(numel, dtype=dtype, device=self.device)
            symm_mem.rendezvous(buffer, self.group.group_name)
            buffers.append(buffer)
        return buffers

    def prepare_gpu(self, model: nn.Module, dtype: torch.dtype) -> None:
        """A model on these GPUs: its CUDA graphs captured beside torch.distributed's watchdog
        thread (whose CUDA calls a "global" capture refuses), its plain-call graphs kept and
        evicted alike on every rank (zoo.graphs.GraphPool.agree_bytes), and its small
        all-reduces through symmetric memory where the GPUs allow it."""
        from zoo.graphs import graph_pool

        model.graph_capture_mode = "thread_local"
        pool = graph_pool(model)
        pool.capture_mode = "thread_local"
        pool.agree_bytes = self.max_over_ranks
        self._models.add(model)
        self.enable_symmetric_memory(dtype)

    def release(self) -> None:
        """Free what holds the process group's resources on the GPU: the CUDA graphs of this
        group's models (they captured its collectives) and the symmetric-memory buffers. While
        the group lives the models still work (their next calls capture graphs again, every
        all-reduce through NCCL). Call on every rank before the group is destroyed."""
        for model in list(self._models):  # decoders (the families tp covers): each has an engine
            model.engine.reset()  # its decode graph and the plain-call graphs
        self._symmetric = None
        gc.collect()  # graphs and buffers held only by reference cycles
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


class RowParallelLinear(Linear):
    """y = residual + alpha * (x @ weight.T + bias) with x and weight split along the input
    features over the ranks: each rank multiplies its part, rank 0 alone adds the bias and the
    residual in the matmul's epilogue, and one all-reduce sums the parts (alpha is linear, so
    every part is scaled before the sum). The bias is held (replicated) on every rank. With
    symmetric memory on, a small output is written straight into the symmetric buffer of `slot`
    and summed by the one-shot all-reduce."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, tp: TensorParallel, slot: int = 0
    ):
        super().__init__(in_features, out_features, bias)
        self.tp = tp
        self.slot = slot

    def forward(
        self,
        x: torch.Tensor,
        activation: str | None = None,
        residual: torch.Tensor | None = None,
        alpha: float = 1.0,
    ) -> torch.Tensor:
        if activation is not None:
            raise ValueError("a row-split projection sums its parts: no activation before the sum")
        first = self.tp.rank == 0
        shape = (*x.shape[:-1], self.weight.shape[0])
        out = self.tp.symmetric_out(shape, x.dtype, self.slot)
        y = matmul(
            x,
            self.weight,
            self.bias if first else None,
            residual=residual if first else None,
            alpha=alpha,
            out=out,
        )
        return self.tp.all_reduce(y) if out is None else self.tp.one_shot_all_reduce(out)


def from_first_rank(value):
    """Rank 0's value (any picklable object, e.g. a line a user typed there) on every rank of
    the default process group."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# whether setup started the default process group (end_started_group ends it then)
_started_group = False
# every TensorParallel of this process (destroy_group releases them first)
_INSTANCES: weakref.WeakSet[TensorParallel] = weakref.WeakSet()


def destroy_group() -> None:
    """Destroy the default process group, every model on it first releasing its CUDA graphs and
    symmetric memory (TensorParallel.release): with those alive, NCCL's teardown waits forever
    on two H200s. Call on every rank."""
    for tp in list(_INSTANCES):
        tp.release()
    if dist.is_initialized():
        dist.destroy_process_group()


def end_started_group() -> None:
    """Destroy the default process group if zoo.load started it (the CLI's last step)."""
    global _started_group
    if _started_group and dist.is_initialized():
        destroy_group()
    _started_group = False


def setup(tp: int, device: str | torch.device | None) -> tuple[TensorParallel, torch.device]:
    """The TensorParallel of zoo.load(..., tp=N) and the device of this rank. Uses the default
    process group, or starts one from torchrun's variables (nccl for CUDA, gloo for the CPU);
    a CUDA device is this process's LOCAL_RANK GPU (without LOCAL_RANK: the current one) unless
    an index is given."""
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"tp: expected an int >= 1 (the number of GPUs), got {tp!r}")
    if not dist.is_available():
        raise ValueError(f"tp={tp}: this torch build has no torch.distributed")
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    # torchrun's LOCAL_RANK; in a process group started without it, the GPU the caller chose
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None:
        local_rank = int(local_rank)
    elif cuda:
        local_rank = torch.cuda.current_device()
    if not dist.is_initialized():
        missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
        if missing:
            raise ValueError(
                f"tp={tp}: no torch.distributed process group, and no torchrun variables "
                f"({', '.join(missing)} unset): launch with `torchrun --nproc-per-node {tp} "
                "script.py`, or call torch.distributed.init_process_group first"
            )
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
        global _started_group
        _started_group = True
    world = dist.get_world_size()
    if world != tp:
        raise ValueError(
            f"tp={tp}, but the process group has {world} processes: tp must equal the world size "
            f"(torchrun --nproc-per-node {tp})"
        )
    backend = str(dist.get_backend())
    if cuda and "nccl" not in backend:
        raise ValueError(f"tp={tp} on CUDA needs an nccl process group, not {backend}")
    if not cuda and "gloo" not in backend:
        raise ValueError(f"tp={tp} on the CPU needs a gloo process group, not {backend}")
    if cuda:
        device = torch.device(device or "cuda")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device or "cpu")
    return TensorParallel(dist.group.WORLD, device), device
