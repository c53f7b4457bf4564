"""CUDA graphs for plain calls: each model keeps a pool of captured graphs, one per shape bucket.

A plain call (`model(ids, ...)`, the prefill of `generate`, T5's encoder pass) launches about a
hundred kernels, each costing tens of microseconds of Python; replayed from a CUDA graph the same
work costs the GPU time alone. So on a CUDA device every such call is padded up to its bucket,
copied into the bucket's static input buffers and replayed; the caller gets clones of the real
part of the static outputs (the next replay overwrites those).

Bucket rule (`padded_length`): the batch B stays exact and the length T is padded on the right to
the largest T' >= T with next_pow2(B * T') == next_pow2(B * T) (the matmuls' M bucket, also
split-K's and the TMA kernel's choice) and attention_bucket(T') == attention_bucket(T) (the
attention's query and key buckets). Every kernel then runs the config it would run unpadded, each
row's arithmetic is the same, and the real positions never see the pads (Bert and T5's encoder
mask them out with kv_end, causal decoders never look right), so the real outputs are bitwise those
of an eager call. Right padding keeps every key at its position (shifted keys would change how the
attention groups them into blocks).

The first call of a bucket runs eagerly (compiling and autotuning the kernels at these shapes,
which capture must not do), is captured, and replayed; later calls only copy their inputs in and
replay. The pool is bounded by a count and by memory (least recently used graph first); all graphs
of a model share one CUDA memory pool, and a graph is charged its static buffers plus the growth
of reserved memory while it was captured (an estimate: graphs of a pool reuse each other's freed
intermediates, and evicting one frees its memory only once no later graph uses it).

Eager instead: `cuda_graph=False` per call, `model.cuda_graph = False` per model, CPU models,
and calls made inside a CUDA graph capture of the caller's own or a torch.compile trace.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kernels.attention import _bucket as attention_bucket
from kernels.utils import next_pow2
from zoo.generation.inputs import (
    ValueChecks,
    check_input_ids,
    check_right_padding,
    check_token_type_ids,
)
from zoo.layers import may_pack, pack_rows, packed_tokens

DEFAULT_MAX_GRAPHS = 32
DEFAULT_MAX_BYTES = 4 * 2**30


def padded_length(batch: int, seq: int, limit: int | None = None) -> int:
    """The length T' >= seq a [batch, seq] call is padded to: the largest with the same matmul M
    bucket (next_pow2(batch * T')) and the same attention length bucket as seq, at most `limit`
    (a position table or a cache; never below seq)."""
    if batch < 1 or seq < 1:
        raise ValueError(f"batch {batch} and seq {seq} must be >= 1")
    longest = next_pow2(batch * seq) // batch  # batch * T' <= next_pow2(batch * seq)
    bucket = attention_bucket(seq)
    if attention_bucket(bucket + 1) != bucket:  # past its cap, every length shares one bucket
        longest = min(longest, bucket)
    if limit is not None:
        longest = min(longest, limit)
    return max(longest, seq)


def use_graphs(model: nn.Module, cuda_graph: bool | None) -> bool:
    """Whether this call replays a graph: on CUDA unless cuda_graph=False (or None and
    model.cuda_graph is False), and never inside a capture or a torch.compile trace."""
    # a torch.compile trace first: it cannot trace the capture query
    if torch.compiler.is_compiling() or cuda_graph is False or model.device.type != "cuda":
        return False
    if cuda_graph is None and not model.cuda_graph:
        return False
    return not torch.cuda.is_current_stream_capturing()


@dataclass
class _Entry:
    inputs: dict[str, Any]  # static input buffers (and state such as a private KV cache)
    outputs: Any  # static outputs of the graph (None until captured, or when run eagerly)
    graph: torch.cuda.CUDAGraph | None
    nbytes: int


class GraphPool:
    """The captured graphs of one model, least recently used first.

    run(key, allocate, fill, compute, extract): allocate() builds the bucket's static inputs
    (first call of the key only), fill(inputs) copies a call's real inputs into them,
    compute(inputs) is the forward on them; returns extract(compute's outputs), extract reading
    the graph's static buffers (copies of the real part). With capture=False (CPU tests of the
    padding) compute runs eagerly on the same buffers. Calls from several threads run one after
    the other (`lock`, held from fill to extract: they share the static buffers)."""

    def __init__(
        self, max_graphs: int = DEFAULT_MAX_GRAPHS, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        self.max_graphs = max_graphs
        self.max_bytes = max_bytes
        self.capture = True
        self.device = torch.device("cpu")  # the model's (set by graph_pool)
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._too_large: set[tuple] = set()  # buckets whose graph alone exceeds max_bytes
        self._handle = None  # the CUDA memory pool all graphs of this model capture into
        self.weights: tuple | None = None  # where the weights were when the graphs were captured
        self.lock = threading.RLock()
        # A tensor-parallel model's ranks must keep and evict the same graphs (a new bucket runs
        # its collectives twice, eager then replayed; a kept one once): this makes a graph's byte
        # count the same on every rank (the largest), so every rank decides alike.
        self.agree_bytes: Callable[[int], int] | None = None
        # torch.cuda.graph's capture_error_mode ("thread_local" beside other threads' CUDA
        # calls: torch.distributed's watchdog)
        self.capture_mode = "global"
        self._side_stream: torch.cuda.Stream | None = None  # see beside()
        self._first_parameter: tuple[nn.Module, str] | None = None  # see first_parameter()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple) -> bool:
        return key in self._entries

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def keys(self) -> list[tuple]:
        """Bucket keys, least recently used first."""
        return list(self._entries)

    def static_inputs(self, key: tuple) -> dict[str, Any]:
        return self._entries[key].inputs

    @contextlib.contextmanager
    def beside(self):
        """Queue the work of the block on a side stream forked from the current one (on CUDA; on
        the CPU it simply runs): what is queued after the block does not wait for it, and in a
        graph it runs alongside. join_beside() makes the current stream wait for it again (a
        capture must join it before it ends)."""
        if self.device.type != "cuda":
            yield
            return
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        self._side_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side_stream):
            yield

    def join_beside(self) -> None:
        if self._side_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._side_stream)

    def first_parameter(self, model: nn.Module) -> torch.Tensor:
        """The model's first parameter, read through the (module, name) found the first time:
        every plain call checks where the weights are, and walking model.parameters() costs a
        few microseconds of the host time before the replay."""
        if self._first_parameter is not None:
            module, name = self._first_parameter
            parameter = module._parameters.get(name)
            if parameter is not None:
                return parameter
        path, parameter = next(model.named_parameters())
        owner, _, name = path.rpartition(".")
        self._first_parameter = (model.get_submodule(owner), name)
        return parameter

    def clear(self) -> None:
        self._entries.clear()
        self._too_large.clear()
        self._handle = None

    def run(
        self,
        key: tuple,
        allocate: Callable[[], dict[str, Any]],
        fill: Callable[[dict[str, Any]], None],
        compute: Callable[[dict[str, Any]], Any],
        extract: Callable[[Any], Any] = lambda outputs: outputs,
    ) -> Any:
        with self.lock, torch.inference_mode():
            return extract(self._run(key, allocate, fill, compute))

    def _run(self, key, allocate, fill, compute) -> Any:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            fill(entry.inputs)
            if entry.graph is None:  # capture=False
                return compute(entry.inputs)
            entry.graph.replay()
            return entry.outputs
        entry = self._allocate(allocate)
        fill(entry.inputs)
        if not self.capture:
            self._entries[key] = entry
            return compute(entry.inputs)
        if key in self._too_large:
            return compute(entry.inputs)
        self._capture(entry, compute)
        if entry.nbytes > self.max_bytes or self.max_graphs < 1:
            # over the bound on its own: this bucket runs eagerly from now on
            self._too_large.add(key)
            return compute(entry.inputs)
        self._entries[key] = entry
        while len(self._entries) > self.max_graphs or self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)  # the least recently used (never this one)
        entry.graph.replay()
        return entry.outputs

    def _allocate(self, allocate: Callable[[], dict[str, Any]]) -> _Entry:
        cuda = self.device.type == "cuda"
        before = torch.cuda.memory_allocated(self.device) if cuda else 0
        # normal tensors even under inference mode: calls outside it fill them in place too
        with torch.inference_mode(False):
            inputs = allocate()
        nbytes = torch.cuda.memory_allocated(self.device) - before if cuda else 0
        return _Entry(inputs, None, None, nbytes)

    def _capture(self, entry: _Entry, compute: Callable) -> None:
        # The eager run compiles and autotunes every kernel at these shapes, which must not happen
        # during capture; its result is thrown away (the replay below gives the same bits).
        compute(entry.inputs)
        with torch.cuda.device(self.device):
            if self._handle is None:
                self._handle = torch.cuda.graph_pool_handle()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # torch.cuda.graph empties the cache too: measure after it
            before = torch.cuda.memory_reserved()
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with (
                torch.cuda.stream(stream),
                torch.cuda.graph(
                    graph, pool=self._handle, stream=stream, capture_error_mode=self.capture_mode
                ),
            ):
                outputs = compute(entry.inputs)
            torch.cuda.current_stream().wait_stream(stream)
            entry.nbytes += max(torch.cuda.memory_reserved() - before, 0)
        if self.agree_bytes is not None:
            entry.nbytes = self.agree_bytes(entry.nbytes)
        entry.graph, entry.outputs = graph, outputs


_POOLS: weakref.WeakKeyDictionary[nn.Module, GraphPool] = weakref.WeakKeyDictionary()


def graph_pool(model: nn.Module) -> GraphPool:
    """The model's pool (created on first use). Its bounds are attributes: max_graphs and
    max_bytes. Moving the weights (model.to, .half()) drops every graph: they read the weights
    where they were captured."""
    pool = _POOLS.get(model)
    if pool is None:
        pool = _POOLS[model] = GraphPool()
    first = pool.first_parameter(model)
    weights = (first.data_ptr(), first.dtype, first.device)
    if pool.weights != weights:
        pool.clear()
        pool.weights, pool.device = weights, first.device
    return pool


def _int_buffer(batch: int, length: int | None, device, dtype=torch.int64) -> torch.Tensor:
    shape = (batch,) if length is None else (batch, length)
    return torch.zeros(shape, dtype=dtype, device=device)


# --- the graphed calls, one per entry point ------------------------------------------------------
# The pad region of a static buffer keeps whatever an earlier call left there (zeros at first,
# then valid ids and positions): the real positions never read it.


def bert_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bert.forward after its structure checks (attention_mask None: full rows; token_type_ids
    None: all 0): new tensors
    (last_hidden_state [B, T, hidden], pooler_output [B, hidden] or None).

    The value checks (ids and type ids in range, mask of 0/1, right-padded, no empty row) run
    inside the graph on the padded buffers, on a side stream beside the model, and are read back
    once after the replay, so the call has no host sync before its work; the kernels stay in
    bounds on any values (the embedding masks ids outside its table, the lengths count a mask
    row's nonzero entries), and a failed check raises the eager call's error instead of
    returning the outputs.

    A batch of mostly short rows runs packed (zoo.layers.pack_rows, a graph per packed size,
    the packing computed in it): reading its real token count is the one sync before the
    replay."""
    batch, seq = input_ids.shape
    length = padded_length(batch, seq, model.config.max_position_embeddings)
    device = input_ids.device
    tokens = None
    if attention_mask is not None and may_pack(batch, seq):
        # the one value read back before the replay (the packing itself is computed in it);
        # count_nonzero: one kernel where ne + sum were two (the host waits on them)
        tokens = packed_tokens(batch, seq, int(torch.count_nonzero(attention_mask)))

    def real(buffer: torch.Tensor) -> torch.Tensor:
        """The call's part of a [B, length, ...] buffer (the buffer itself when unpadded)."""
        return buffer if seq == length else buffer[:, :seq]

    def allocate():
        return {
            "input_ids": _int_buffer(batch, length, device),
            "token_type_ids": _int_buffer(batch, length, device),
            "attention_mask": _int_buffer(batch, length, device),
            # what the buffers hold when a call left them as defaults (no writes needed again)
            "types_are_zero": True,
            "mask_is_full_to": None,
        }

    def fill(static):
        real(static["input_ids"]).copy_(input_ids)
        if token_type_ids is not None:
            real(static["token_type_ids"]).copy_(token_type_ids)
            static["types_are_zero"] = False
        elif not static["types_are_zero"]:
            static["token_type_ids"].zero_()
            static["types_are_zero"] = True
        if attention_mask is None and static["mask_is_full_to"] == seq:
            return
        mask = static["attention_mask"]
        if attention_mask is None:
            real(mask).fill_(1)
        else:
            real(mask).copy_(attention_mask)
        if seq < length:  # an earlier, longer call of this bucket left ones there
            mask[:, seq:].zero_()
        static["mask_is_full_to"] = seq if attention_mask is None else None

    pool = graph_pool(model)

    def compute(static):
        ids, types, mask = static["input_ids"], static["token_type_ids"], static["attention_mask"]
        config = model.config
        # The value checks run beside the model (no kernel of it waits for them): the lengths
        # stay in [0, length] whatever the mask holds, and a 0/1 mask's are its sums.
        with pool.beside():
            checks = ValueChecks()
            check_input_ids(ids, config.vocab_size, device, checks=checks)
            check_right_padding(mask, ids, "Bert batches", checks)
            check_token_type_ids(types, ids, config.type_vocab_size, checks)
            gathered = checks.gather()
        kv_end = mask.ne(0).sum(-1, dtype=torch.int32)
        if tokens is None:
            out = model.encode(ids, types, kv_end)
        else:
            packed = pack_rows(kv_end, tokens, length, row_length=length)
            out = model.encode_packed(ids, types, packed)
        pool.join_beside()
        return out.last_hidden_state, out.pooler_output, gathered

    def extract(outputs):
        hidden, pooled, checks = outputs
        hidden, pooled = real(hidden).clone(), None if pooled is None else pooled.clone()
        checks.run()
        return hidden, pooled

    key = ("bert", batch, length) if tokens is None else ("bert", batch, length, tokens)
    return pool.run(key, allocate, fill, compute, extract)


def decoder_forward(
    model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor, kv_start: torch.Tensor
) -> torch.Tensor:
    """DecoderOnlyLM.forward after its input checks: logits [B, T, V] of a left-padded batch
    (padded here on the right: causal queries never see later positions)."""
    batch, seq = input_ids.shape
    length = padded_length(batch, seq, max(model.max_length, seq))
    device = input_ids.device

    def allocate():
        return {
            "input_ids": _int_buffer(batch, length, device),
            "positions": _int_buffer(batch, length, device),
            "kv_start": _int_buffer(batch, None, device, torch.int32),
            "cache": model.new_cache(batch, length),
        }

    def fill(static):
        static["input_ids"][:, :seq].copy_(input_ids)
        static["positions"][:, :seq].copy_(positions)
        static["kv_start"].copy_(kv_start)

    def compute(static):
        cache = static["cache"]
        cache.reset(static["kv_start"])
        return model.forward_cached(static["input_ids"], static["positions"], cache)

    key = ("decoder", batch, length)
    return graph_pool(model).run(
        key, allocate, fill, compute, lambda logits: logits[:, :seq].clone()
    )


def prefill(
    model: nn.Module,
    cache,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    kv_start: torch.Tensor,
    cuda_graph: bool | None = None,
) -> torch.Tensor:
    """Empty `cache` (kv_start: first real slot of each row), run the left-padded prompt
    input_ids [B, T] at `positions` into it and return the last position's logits [B, V].

    Graphed, the prompt is padded on the right up to its bucket (at most the cache's length):
    the pads' keys and values land in the slots after the prompt, and cache.lengths is set back
    to T, so decoding overwrites them and never reads them."""
    if not use_graphs(model, cuda_graph):
        cache.reset(kv_start)
        return model.forward_cached(input_ids, positions, cache, last_only=True)[:, -1]
    return bucketed_prefill(model, cache, input_ids, positions, kv_start)


def bucketed_prefill(
    model: nn.Module,
    cache,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    kv_start: torch.Tensor,
) -> torch.Tensor:
    """prefill through the model's graph pool (padded to the bucket, replayed)."""
    batch, seq = input_ids.shape
    length = padded_length(batch, seq, cache.max_length)
    device = input_ids.device
    # the graph writes into this cache: its buffers are part of the key
    key = ("prefill", batch, length, *_addresses(*cache.k, *cache.v, cache.lengths, cache.kv_start))

    def allocate():
        return {
            "input_ids": _int_buffer(batch, length, device),
            "positions": _int_buffer(batch, length, device),
            "kv_start": _int_buffer(batch, None, device, torch.int32),
            "lengths": _int_buffer(batch, None, device, torch.int32),  # real prompt lengths
        }

    def fill(static):
        static["input_ids"][:, :seq].copy_(input_ids)
        static["positions"][:, :seq].copy_(positions)
        static["kv_start"].copy_(kv_start)
        static["lengths"].fill_(seq)

    def compute(static):
        cache.reset(static["kv_start"])
        last_index = static["lengths"].long() - 1
        logits = model.forward_cached(
            static["input_ids"], static["positions"], cache, last_index=last_index
        )  # (B, 1, V)
        cache.lengths.copy_(static["lengths"])
        return logits[:, 0]

    return graph_pool(model).run(key, allocate, fill, compute, torch.Tensor.clone)


def t5_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    lengths: torch.Tensor,
    decoder_input_ids: torch.Tensor,
) -> torch.Tensor:
    """T5.forward after its input checks: logits [B, Td, V]. The encoder input is padded on the
    right (lengths mask the pads out), the decoder input too (causal)."""
    batch, seq = input_ids.shape
    dec_seq = decoder_input_ids.shape[1]
    length = padded_length(batch, seq)
    dec_length = padded_length(batch, dec_seq)
    device = input_ids.device

    def allocate():
        return {
            "input_ids": _int_buffer(batch, length, device),
            "lengths": _int_buffer(batch, None, device, torch.int32),
            "decoder_input_ids": _int_buffer(batch, dec_length, device),
            "cache": model.new_cache(batch, dec_length, encoder_length=length),
        }

    def fill(static):
        static["input_ids"][:, :seq].copy_(input_ids)
        static["lengths"].copy_(lengths)
        static["decoder_input_ids"][:, :dec_seq].copy_(decoder_input_ids)

    def compute(static):
        cache = static["cache"]
        cache.reset()
        model.encode_into(cache, static["input_ids"], static["lengths"], cuda_graph=False)
        return model.forward_cached(static["decoder_input_ids"], None, cache)

    key = ("t5", batch, length, dec_length)
    return graph_pool(model).run(
        key, allocate, fill, compute, lambda logits: logits[:, :dec_seq].clone()
    )


def t5_encode_into(model: nn.Module, cache, input_ids: torch.Tensor, lengths: torch.Tensor) -> None:
    """T5.encode_into, graphed: the encoder input is padded on the right up to its bucket (at
    most the cache's encoder length); the pads' cross K/V lie past `lengths`, never read."""
    batch, seq = input_ids.shape
    length = padded_length(batch, seq, cache.cross_kv.shape[2])
    device = input_ids.device
    key = ("t5-encode", batch, length, *_addresses(cache.cross_kv, cache.encoder_lengths))

    def allocate():
        return {
            "input_ids": _int_buffer(batch, length, device),
            "lengths": _int_buffer(batch, None, device, torch.int32),
        }

    def fill(static):
        static["input_ids"][:, :seq].copy_(input_ids)
        static["lengths"].copy_(lengths)

    def compute(static):
        model.encode_into(cache, static["input_ids"], static["lengths"], cuda_graph=False)

    graph_pool(model).run(key, allocate, fill, compute)


def _addresses(*tensors: torch.Tensor) -> tuple:
    """Where a graph reads or writes state it does not own: a cache of the same address and
    layout may replay it, another may not."""
    return tuple((t.data_ptr(), tuple(t.shape), tuple(t.stride())) for t in tensors)
