"""Split-KV decode attention (kernels.decode) against a plain float64 reference."""

import pytest
import torch
from helpers import ATTENTION_RTOL, DEVICE, DTYPES, assert_close

import kernels.decode
from kernels.attention import attention
from kernels.decode import decode_attention

RTOL = ATTENTION_RTOL


def reference(q, k, v, *, scale, kv_end, kv_start=None, bias=None, window=None):
    """One query per row: explicit key-range mask + softmax in float64; no visible key -> 0.
    window: HF's sliding window, key j visible iff j > (kv_end - 1) - window."""
    B, _, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    qd = q.double().transpose(1, 2)  # (B, Hq, 1, D)
    kd = torch.nan_to_num(k.double()).transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)
    vd = torch.nan_to_num(v.double()).transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)
    start = kv_start.long().cpu() if kv_start is not None else torch.zeros(B, dtype=torch.long)
    end = kv_end.long().cpu()
    j = torch.arange(S)[None, :]
    visible = (j >= start[:, None]) & (j < end[:, None])
    if window is not None:
        visible = visible & (j > end[:, None] - 1 - window)
    visible = visible[:, None, None, :].to(q.device)
    scores = scale * (qd @ kd.transpose(-1, -2))  # (B, Hq, 1, S)
    if bias is not None:
        scores = scores + bias.double()
    scores = scores.masked_fill(~visible, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    p = torch.where(visible.any(-1, keepdim=True), p, torch.zeros_like(p))
    return (p @ vd).transpose(1, 2).to(q.dtype)  # (B, 1, Hq, D)


def _cache(B, S_max, Hkv, D, dtype, kv_start, kv_end):
    """A [B, Hkv, S_max, D] cache passed as (B, S_max, Hkv, D) views, NaN outside the valid range."""
    k_cache = torch.full((B, Hkv, S_max, D), float("nan"), device=DEVICE, dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    for b in range(B):
        lo, hi = int(kv_start[b]), int(kv_end[b])
        k_cache[b, :, lo:hi] = torch.randn(Hkv, hi - lo, D, device=DEVICE, dtype=dtype)
        v_cache[b, :, lo:hi] = torch.randn(Hkv, hi - lo, D, device=DEVICE, dtype=dtype)
    return k_cache.transpose(1, 2), v_cache.transpose(1, 2)


def _lengths(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B, S_max, Hq, Hkv, D, starts, ends, num_splits",
    [
        (2, 70, 4, 4, 16, [0, 0], [70, 33], None),  # MHA, default splits
        (2, 70, 6, 2, 24, [0, 0], [1, 70], 3),  # GQA 3, odd D, a one-key row
        (1, 33, 8, 2, 64, [0], [33], 1),  # GQA 4, single split writes the output directly
        (3, 128, 8, 1, 64, [0, 2, 9], [5, 3, 9], 8),  # GQA 8, mostly empty splits, an empty row
        (2, 70, 4, 1, 16, [5, 0], [70, 7], 4),  # left padding (kv_start) + ragged kv_end
    ],
)
def test_decode(dtype, B, S_max, Hq, Hkv, D, starts, ends, num_splits):
    kv_start, kv_end = _lengths(starts), _lengths(ends)
    qkv = torch.randn(B, 1, Hq + 2 * Hkv, D, device=DEVICE, dtype=dtype)
    q = qkv[:, :, :Hq]  # slice of a fused QKV output: strided
    k, v = _cache(B, S_max, Hkv, D, dtype, kv_start, kv_end)
    kw = dict(scale=D**-0.5, kv_start=kv_start, kv_end=kv_end)
    actual = decode_attention(q, k, v, num_splits=num_splits, **kw)
    assert actual.shape == (B, 1, Hq, D) and actual.dtype == dtype
    assert_close(actual, reference(q, k, v, **kw), RTOL[dtype], f"decode splits={num_splits}")
    for b in range(B):
        if starts[b] >= ends[b]:
            assert (actual[b] == 0).all(), "a row with no visible key must be exactly 0"


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_bias_batch_stride_zero(dtype):
    """T5 decoder self-attention: position bias shared by the batch (stride 0), scale 1."""
    B, S_max, Hq, Hkv, D = 2, 40, 4, 4, 16
    kv_start, kv_end = _lengths([0, 0]), _lengths([40, 17])
    q = torch.randn(B, 1, Hq, D, device=DEVICE, dtype=dtype)
    k, v = _cache(B, S_max, Hkv, D, dtype, kv_start, kv_end)
    bias = torch.randn(1, Hq, 1, S_max, device=DEVICE).expand(B, Hq, 1, S_max)
    kw = dict(scale=1.0, kv_end=kv_end, bias=bias)
    actual = decode_attention(q, k, v, num_splits=2, **kw)
    assert_close(actual, reference(q, k, v, **kw), RTOL[dtype], "decode bias")


@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_decode_matches_causal_attention(num_splits):
    """Tq = 1 with causal=True in the prefill kernel is the same computation."""
    B, S_max, Hq, Hkv, D = 2, 50, 6, 2, 24
    kv_start, kv_end = _lengths([0, 4]), _lengths([50, 21])
    q = torch.randn(B, 1, Hq, D, device=DEVICE)
    k, v = _cache(B, S_max, Hkv, D, torch.float32, kv_start, kv_end)
    kw = dict(scale=D**-0.5, kv_start=kv_start, kv_end=kv_end)
    actual = decode_attention(q, k, v, num_splits=num_splits, **kw)
    expected = attention(q, k, v, causal=True, **kw)
    assert_close(actual, expected, RTOL[torch.float32], "decode vs attention")


def test_out_argument():
    B, S_max, Hq, Hkv, D = 1, 20, 3, 1, 16
    kv_end = _lengths([13])
    q = torch.randn(B, 1, Hq, D, device=DEVICE)
    k, v = _cache(B, S_max, Hkv, D, torch.float32, _lengths([0]), kv_end)
    out = torch.empty(B, 1, Hq, D, device=DEVICE)
    result = decode_attention(q, k, v, scale=0.3, kv_end=kv_end, out=out)
    assert result.data_ptr() == out.data_ptr()
    expected = reference(q, k, v, scale=0.3, kv_end=kv_end)
    assert_close(out, expected, RTOL[torch.float32], "out=")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_decode_cuda_graph_replay_with_new_lengths():
    """The launch depends on shapes only: a captured graph follows kv_end changed in place."""
    B, S_max, Hq, Hkv, D = 2, 512, 8, 2, 64
    dtype = torch.bfloat16
    kv_end = _lengths([100, 7])
    q = torch.randn(B, 1, Hq, D, device=DEVICE, dtype=dtype)
    k, v = _cache(B, S_max, Hkv, D, dtype, _lengths([0, 0]), _lengths([S_max, S_max]))
    out = torch.empty(B, 1, Hq, D, device=DEVICE, dtype=dtype)
    decode_attention(q, k, v, scale=0.125, kv_end=kv_end, out=out)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(q, k, v, scale=0.125, kv_end=kv_end, out=out)
    for ends in ([100, 7], [512, 1], [300, 450]):
        kv_end.copy_(_lengths(ends))
        graph.replay()
        torch.cuda.synchronize()
        expected = reference(q, k, v, scale=0.125, kv_end=kv_end)
        assert_close(out, expected, RTOL[dtype], f"graph replay kv_end={ends}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "B, S_max, Hq, Hkv, D, starts, ends, window, num_splits",
    [
        (2, 70, 4, 2, 24, [0, 3], [70, 33], 5, None),  # window smaller than a block
        (2, 128, 8, 2, 16, [0, 0], [128, 100], 70, 4),  # splits over the windowed range
        (2, 70, 6, 3, 16, [0, 9], [13, 12], 100, 3),  # window longer than the row
        (1, 40, 4, 4, 16, [2], [40], 1, 2),  # the query sees only itself
        (2, 70, 4, 2, 16, None, [70, 41], 9, 2),  # no kv_start: the window alone
    ],
)
def test_decode_sliding_window(dtype, B, S_max, Hq, Hkv, D, starts, ends, window, num_splits):
    kv_start, kv_end = _lengths(starts or [0] * B), _lengths(ends)
    q = torch.randn(B, 1, Hq, D, device=DEVICE, dtype=dtype)
    k, v = _cache(B, S_max, Hkv, D, dtype, kv_start, kv_end)
    kv_start = kv_start if starts else None
    kw = dict(scale=D**-0.5, kv_start=kv_start, kv_end=kv_end, window=window)
    actual = decode_attention(q, k, v, num_splits=num_splits, **kw)
    assert_close(actual, reference(q, k, v, **kw), RTOL[dtype], f"decode window {window}")


def test_decode_window_matches_causal_attention():
    """The windowed decode step is the last row of windowed causal prefill."""
    B, S_max, Hq, Hkv, D, window = 2, 50, 4, 2, 16, 7
    kv_start, kv_end = _lengths([0, 4]), _lengths([50, 21])
    q = torch.randn(B, 1, Hq, D, device=DEVICE)
    k, v = _cache(B, S_max, Hkv, D, torch.float32, kv_start, kv_end)
    kw = dict(scale=D**-0.5, kv_start=kv_start, kv_end=kv_end, window=window)
    actual = decode_attention(q, k, v, num_splits=3, **kw)
    expected = attention(q, k, v, causal=True, **kw)
    assert_close(actual, expected, RTOL[torch.float32], "windowed decode vs attention")


@pytest.mark.parametrize(
    "B, splits",
    [(1, 9), (8, 9), (32, 3), (64, 2), (128, 1)],  # each split >= 64 keys of 576: <= 9
)
def test_split_table(B, splits):
    """The decode split table at Llama-3-8B's decode batches (Hkv 8, a 576-slot cache, 64-key
    blocks) on an H200 (132 SMs): about 4 programs per SM, never a split without a key block."""
    assert kernels.decode._table_num_splits(B * 8, 576, 64, 132) == splits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [9, 3, 2])
def test_decode_at_table_splits(dtype, num_splits):
    """The kernels at the split counts the table picks, against the reference and against the
    unsplit kernel: GQA 4, odd D, ragged lengths (some splits empty)."""
    B, S_max, Hq, Hkv, D = 3, 70, 8, 2, 24
    kv_start, kv_end = _lengths([0, 4, 0]), _lengths([70, 13, 1])
    k, v = _cache(B, S_max, Hkv, D, dtype, kv_start, kv_end)
    q = torch.randn(B, 1, Hq, D, device=DEVICE, dtype=dtype)
    kw = dict(scale=D**-0.5, kv_start=kv_start, kv_end=kv_end)
    split = decode_attention(q, k, v, num_splits=num_splits, **kw)
    assert_close(split, reference(q, k, v, **kw), RTOL[dtype], f"decode splits={num_splits}")
    assert_close(split, decode_attention(q, k, v, num_splits=1, **kw), RTOL[dtype], "vs unsplit")


def test_split_table_option(monkeypatch, kernel_options):
    """decode_split_table switches the default split count from one wave to the table (GPU
    launches only: the interpreter keeps its small fixed split)."""
    monkeypatch.setattr(kernels.decode, "INTERPRET", False)
    monkeypatch.setattr(kernels.decode, "num_sms", lambda device: 132)
    shapes = (32, 8, 576, 64, torch.device("cuda"))
    kernel_options(decode_split_table=0)
    assert kernels.decode._default_num_splits(*shapes) == 1
    kernel_options(decode_split_table=1)
    assert kernels.decode._default_num_splits(*shapes) == 3
