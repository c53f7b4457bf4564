"""Flash-attention forward (kernels.attention) against a plain float64 reference."""

import pytest
import torch
from helpers import ATTENTION_RTOL, DEVICE, DTYPES, assert_close

from kernels.attention import attention

RTOL = ATTENTION_RTOL


def reference(q, k, v, *, causal, scale, kv_start=None, kv_end=None, bias=None, window=None):
    """Explicit mask + softmax in float64; GQA by repeat_interleave; fully masked rows -> 0.
    window: HF's sliding window (masking_utils.sliding_window_overlay), kv_idx > q_idx - window,
    with q_idx the query's slot i + kv_end - Tq."""
    B, Tq, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    qd = q.double().transpose(1, 2)  # (B, Hq, Tq, D)
    kd = k.double().transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, S, D)
    vd = v.double().transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)
    start = kv_start.long().cpu() if kv_start is not None else torch.zeros(B, dtype=torch.long)
    end = kv_end.long().cpu() if kv_end is not None else torch.full((B,), S, dtype=torch.long)
    j = torch.arange(S)[None, None, :]
    i = torch.arange(Tq)[None, :, None]
    visible = (j >= start[:, None, None]) & (j < end[:, None, None])  # (B, Tq, S)
    if causal:
        visible = visible & (j <= i + (end - Tq)[:, None, None])
    if window is not None:
        visible = visible & (j > i + (end - Tq)[:, None, None] - window)
    visible = visible[:, None].to(q.device)  # (B, 1, Tq, S)
    # zero masked keys first: a NaN in an unused cache slot must not leak into the reference
    kd = torch.nan_to_num(kd)
    vd = torch.nan_to_num(vd)
    scores = scale * (qd @ kd.transpose(-1, -2))
    if bias is not None:
        scores = scores + bias.double()
    scores = scores.masked_fill(~visible, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    p = torch.where(visible.any(-1, keepdim=True), p, torch.zeros_like(p))
    return (p @ vd).transpose(1, 2).to(q.dtype)  # (B, Tq, Hq, D)


def _qkv(B, Tq, S, Hq, Hkv, D, dtype):
    q = torch.randn(B, Tq, Hq, D, device=DEVICE, dtype=dtype)
    k = torch.randn(B, S, Hkv, D, device=DEVICE, dtype=dtype)
    v = torch.randn(B, S, Hkv, D, device=DEVICE, dtype=dtype)
    return q, k, v


def _lengths(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "causal, B, Tq, S, Hq, Hkv, D",
    [
        (True, 2, 33, 33, 4, 4, 16),  # MHA, odd length, two query blocks
        (False, 2, 7, 7, 6, 2, 24),  # GQA 3, non-power-of-2 head dim
        (True, 1, 1, 1, 8, 1, 64),  # GQA 8, a single token
        (False, 1, 7, 70, 8, 2, 64),  # cross attention (Tq != S), GQA 4, three key blocks
        (True, 1, 70, 70, 2, 2, 24),  # several query and key blocks on the diagonal
    ],
)
def test_attention_shapes(dtype, causal, B, Tq, S, Hq, Hkv, D):
    q, k, v = _qkv(B, Tq, S, Hq, Hkv, D, dtype)
    scale = D**-0.5
    actual = attention(q, k, v, causal=causal, scale=scale)
    assert actual.shape == (B, Tq, Hq, D) and actual.dtype == dtype and actual.is_contiguous()
    expected = reference(q, k, v, causal=causal, scale=scale)
    assert_close(actual, expected, RTOL[dtype], f"attention {dtype} causal={causal}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_left_padding(dtype):
    """Left-padded decoder batch: rows start at kv_start; queries before it see nothing -> 0."""
    B, T, Hq, Hkv, D = 3, 40, 4, 1, 16
    q, k, v = _qkv(B, T, T, Hq, Hkv, D, dtype)
    kv_start = _lengths([0, 5, 39])
    actual = attention(q, k, v, causal=True, scale=0.25, kv_start=kv_start)
    expected = reference(q, k, v, causal=True, scale=0.25, kv_start=kv_start)
    assert_close(actual, expected, RTOL[dtype], "left padding")
    assert (actual[1, :5] == 0).all() and (actual[2, :39] == 0).all()
    assert (actual[2, 39] != 0).any()


def test_right_padding_bidirectional():
    """Bert / T5 encoder key padding via kv_end, including a row with a single key."""
    B, T, Hq, Hkv, D = 3, 33, 3, 3, 24
    q, k, v = _qkv(B, T, T, Hq, Hkv, D, torch.float32)
    kv_end = _lengths([33, 20, 1])
    actual = attention(q, k, v, causal=False, scale=D**-0.5, kv_end=kv_end)
    expected = reference(q, k, v, causal=False, scale=D**-0.5, kv_end=kv_end)
    assert_close(actual, expected, RTOL[torch.float32], "right padding")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_into_cache_strided(dtype):
    """Chunked prefill: q sliced from a fused QKV output; k/v a transposed [B, Hkv, S_max, D]
    cache that already holds earlier tokens, left padded, with NaN in the unused slots."""
    B, Tq, S_max, Hq, Hkv, D = 2, 7, 70, 4, 1, 24
    qkv = torch.randn(B, Tq, Hq + 2 * Hkv, D, device=DEVICE, dtype=dtype)
    q = qkv[:, :, :Hq]  # (B, Tq, Hq, D), strided
    k_cache = torch.full((B, Hkv, S_max, D), float("nan"), device=DEVICE, dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    kv_start = _lengths([0, 3])
    kv_end = _lengths([37, 25])  # 37 - Tq = 30: the diagonal ends one key short of a block
    for b in range(B):
        lo, hi = int(kv_start[b]), int(kv_end[b])
        k_cache[b, :, lo:hi] = torch.randn(Hkv, hi - lo, D, device=DEVICE, dtype=dtype)
        v_cache[b, :, lo:hi] = torch.randn(Hkv, hi - lo, D, device=DEVICE, dtype=dtype)
    k = k_cache.transpose(1, 2)  # (B, S_max, Hkv, D), strided
    v = v_cache.transpose(1, 2)
    kw = dict(causal=True, scale=D**-0.5, kv_start=kv_start, kv_end=kv_end)
    actual = attention(q, k, v, **kw)
    expected = reference(q, k, v, **kw)
    assert_close(actual, expected, RTOL[dtype], "prefill into cache")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_bias_batch_stride_zero(dtype, causal):
    """T5: relative position bias shared across the batch (expand -> batch stride 0), scale 1."""
    B, T, S, Hq, Hkv, D = 2, 7, 33 if not causal else 7, 4, 4, 16
    q, k, v = _qkv(B, T, S, Hq, Hkv, D, dtype)
    bias = torch.randn(1, Hq, T, S, device=DEVICE, dtype=torch.float32).expand(B, Hq, T, S)
    kv_end = _lengths([S, S - 3])
    kw = dict(causal=causal, scale=1.0, kv_end=kv_end, bias=bias)
    actual = attention(q, k, v, **kw)
    expected = reference(q, k, v, **kw)
    assert_close(actual, expected, RTOL[dtype], f"bias causal={causal}")


def test_out_argument():
    B, T, Hq, Hkv, D = 1, 7, 4, 2, 16
    q, k, v = _qkv(B, T, T, Hq, Hkv, D, torch.float32)
    out = torch.empty(B, T, Hq, D, device=DEVICE)
    result = attention(q, k, v, causal=True, scale=0.5, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert_close(out, reference(q, k, v, causal=True, scale=0.5), RTOL[torch.float32], "out=")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "B, Tq, S, Hq, Hkv, D, window, starts, ends",
    [
        (2, 70, 70, 4, 2, 24, 5, [0, 3], [70, 70]),  # window smaller than a block, left padding
        (1, 70, 70, 2, 1, 16, 40, [0], [70]),  # window over one block: skipped and full blocks
        (2, 13, 13, 4, 4, 16, 100, [0, 4], [13, 13]),  # window longer than the sequence
        (2, 7, 70, 4, 1, 24, 9, [0, 3], [37, 25]),  # prefill into a cache holding earlier tokens
        (1, 33, 33, 3, 3, 80, 1, [0], [33]),  # each query sees only itself
        (2, 45, 45, 2, 1, 16, 11, None, None),  # no key range: the window alone
    ],
)
def test_sliding_window(dtype, B, Tq, S, Hq, Hkv, D, window, starts, ends):
    q, k, v = _qkv(B, Tq, S, Hq, Hkv, D, dtype)
    kw = dict(
        causal=True,
        scale=D**-0.5,
        kv_start=_lengths(starts) if starts else None,
        kv_end=_lengths(ends) if ends else None,
        window=window,
    )
    actual = attention(q, k, v, **kw)
    expected = reference(q, k, v, **kw)
    assert_close(actual, expected, RTOL[dtype], f"window {window}")


def test_window_larger_than_sequence_equals_no_window():
    """Bitwise where both run one config (the interpreter); on the GPU the windowed kernel has an
    autotune entry of its own (HAS_WINDOW is in the key), whose blocks may sum in another order."""
    q, k, v = _qkv(2, 33, 33, 4, 2, 16, torch.float32)
    kw = dict(causal=True, scale=0.25, kv_start=_lengths([0, 5]))
    windowed, unlimited = attention(q, k, v, **kw, window=33), attention(q, k, v, **kw)
    if DEVICE == "cpu":
        assert torch.equal(windowed, unlimited)
    else:
        assert_close(windowed, unlimited, RTOL[torch.float32], "window 33 vs none")


@pytest.mark.parametrize("dtype", DTYPES)
def test_full_lengths_equal_no_lengths_bitwise(dtype):
    """kv_end = S (a graphed call's padding mask) runs the config of no kv_end: on the GPU both
    calls share one autotune entry, so the outputs are the same bits."""
    q, k, v = _qkv(2, 70, 70, 4, 2, 32, dtype)
    full = _lengths([70, 70])
    for causal in (False, True):
        plain = attention(q, k, v, causal=causal, scale=0.2)
        assert torch.equal(attention(q, k, v, causal=causal, scale=0.2, kv_end=full), plain)
        assert torch.equal(
            attention(q, k, v, causal=causal, scale=0.2, kv_start=_lengths([0, 0])), plain
        )


@pytest.mark.parametrize(
    "window, causal, match",
    [(0, True, "positive int"), (4.0, True, "positive int"), (4, False, "causal=True")],
)
def test_bad_window(window, causal, match):
    q, k, v = _qkv(1, 4, 4, 2, 2, 16, torch.float32)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, causal=causal, scale=0.25, window=window)


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_rows(dtype):
    """Rows packed one after another (seq_offsets): each row attends over its own tokens only,
    as the same rows padded and masked do; tokens between and after the rows are left alone.
    Blocks past a short row's end visit no key (the row of one token among rows of 40)."""
    lengths = [40, 1, 17, 33]
    offsets = [0, 41, 43, 60]  # one spare token after rows 0 and 1, and 7 after the last
    tokens, Hq, Hkv, D = 100, 4, 2, 24
    q = torch.randn(1, tokens, 3 * Hq, D, device=DEVICE, dtype=dtype)[:, :, :Hq]  # a strided view
    k, v = (torch.randn(1, tokens, Hkv, D, device=DEVICE, dtype=dtype) for _ in range(2))
    out = torch.full((1, tokens, Hq, D), 7.0, device=DEVICE, dtype=dtype)
    result = attention(
        q, k, v, causal=False, scale=0.3, kv_end=_lengths(lengths),
        seq_offsets=_lengths(offsets), max_length=max(lengths), out=out,
    )  # fmt: skip
    assert result is out
    written = torch.zeros(tokens, dtype=torch.bool)
    for start, length in zip(offsets, lengths, strict=True):
        rows = slice(start, start + length)
        expected = reference(q[:, rows], k[:, rows], v[:, rows], causal=False, scale=0.3)
        assert_close(out[:, rows], expected, RTOL[dtype], f"row at {start}, {length} tokens")
        written[rows] = True
    assert (out[0, ~written] == 7.0).all()  # the spare tokens were not written
    fresh = attention(
        q, k, v, causal=False, scale=0.3, kv_end=_lengths(lengths),
        seq_offsets=_lengths(offsets), max_length=max(lengths),
    )  # fmt: skip
    assert fresh.shape == (1, tokens, Hq, D)
    assert torch.equal(fresh[0, written], out[0, written])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(causal=True), "neither causal"),
        (dict(kv_end=None), "need their lengths"),
        (dict(max_length=30), r"max_length: expected an int in \[1, 20\]"),
        (dict(seq_offsets=torch.zeros(2, dtype=torch.int64)), "contiguous int32"),
    ],
)
def test_packed_rows_bad_arguments(kwargs, match):
    q, k, v = _qkv(1, 20, 20, 2, 2, 16, torch.float32)
    args = dict(
        causal=False, scale=0.25, kv_end=_lengths([12, 8]),
        seq_offsets=_lengths([0, 12]), max_length=12,
    )  # fmt: skip
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, **args)
