"""Property-based kernel tests (hypothesis): random shapes (1 and non-powers of 2 included), strided
views (row-strided activations, slices of fused outputs, transposed caches) and dtypes, against the
float64 references of the per-kernel test files; every kernel is run twice on the same inputs and
must give bitwise-equal outputs (no atomics or order-dependent reductions).

Under the Triton interpreter every program instance costs milliseconds, so shapes stay small and
each test draws a few dozen examples; derandomize=True makes the examples the same on every run
(CI stability), and the tensors come from a torch generator seeded by a drawn integer, so a
failing example shrinks and replays exactly.
"""

import torch
from helpers import ATTENTION_RTOL, DEVICE, KERNEL_RTOL, assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_attention import reference as attention_reference
from test_decode import reference as decode_reference
from test_matmul import reference as matmul_reference
from test_norm import reference_layer_norm, reference_rms_norm

from kernels.attention import attention
from kernels.decode import decode_attention
from kernels.matmul import matmul
from kernels.norm import layer_norm, rms_norm

# Max-norm relative error against float64: the per-kernel files' tolerances (helpers). bf16 is
# left out: the interpreter computes it wrongly; the GPU runs of the per-kernel files cover it.
DTYPES = st.sampled_from([torch.float32, torch.float16])
SEEDS = st.integers(0, 2**31 - 1)

PROPERTIES = settings(
    max_examples=50,
    deadline=None,  # interpreter timings vary a lot with the shape
    derandomize=True,
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def randn(generator, *shape, dtype):
    return torch.randn(*shape, generator=generator, dtype=torch.float32).to(DEVICE, dtype)


def strided_rows(generator, rows, cols, dtype, pad):
    """A [rows, cols] view with row stride cols + pad (pad 0: contiguous)."""
    return randn(generator, rows, cols + pad, dtype=dtype)[:, :cols]


def assert_deterministic(first, second, what):
    first = first if isinstance(first, tuple) else (first,)
    second = second if isinstance(second, tuple) else (second,)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b), f"{what}: two runs on the same inputs differ"


ACTIVATIONS = [None, "gelu", "gelu_tanh", "relu", "tanh", "silu_mul", "gelu_tanh_mul"]


@PROPERTIES
@given(
    dtype=DTYPES,
    batch=st.integers(1, 3),
    seq=st.integers(1, 13),
    n=st.integers(1, 70),
    k=st.integers(1, 70),
    activation=st.sampled_from(ACTIVATIONS),
    has_bias=st.booleans(),
    has_residual=st.booleans(),
    alpha=st.sampled_from([1.0, 0.5, -1.75]),
    x_layout=st.sampled_from(["contiguous", "row-strided", "transposed"]),
    weight_pad=st.sampled_from([0, 5]),
    residual_pad=st.sampled_from([0, 3]),
    seed=SEEDS,
)
def test_matmul_properties(
    dtype,
    batch,
    seq,
    n,
    k,
    activation,
    has_bias,
    has_residual,
    alpha,
    x_layout,
    weight_pad,
    residual_pad,
    seed,
):
    g = torch.Generator().manual_seed(seed)
    gated = activation in ("silu_mul", "gelu_tanh_mul")
    n_weight = 2 * n if gated else n
    if x_layout == "contiguous":
        x = randn(g, batch, seq, k, dtype=dtype)
    elif x_layout == "row-strided":  # [B, T, K] rows of a wider buffer: one strided 2-D view
        x = randn(g, batch, seq, k + 7, dtype=dtype)[..., :k]
    else:  # [T, B, K] transposed to [B, T, K]: the leading dims cannot be merged
        x = randn(g, seq, batch, k, dtype=dtype).transpose(0, 1)
    weight = strided_rows(g, n_weight, k, dtype, weight_pad)
    bias = randn(g, n_weight, dtype=dtype) if has_bias else None
    residual = None
    if has_residual:
        residual = strided_rows(g, batch * seq, n, dtype, residual_pad).view(batch, seq, n)
    kwargs = dict(activation=activation, residual=residual, alpha=alpha)

    actual = matmul(x, weight, bias, **kwargs)
    assert actual.shape == (batch, seq, n) and actual.dtype == dtype
    expected = matmul_reference(x, weight, bias, **kwargs)
    assert_close(actual, expected, KERNEL_RTOL[dtype], f"matmul {activation}")
    assert_deterministic(actual, matmul(x, weight, bias, **kwargs), "matmul")


@PROPERTIES
@given(
    dtype=DTYPES,
    is_rms=st.booleans(),
    rows=st.integers(1, 9),
    n=st.integers(1, 200),
    has_residual=st.booleans(),
    row_pad=st.sampled_from([0, 3, 64]),
    eps=st.sampled_from([1e-6, 1e-5, 1e-12]),
    seed=SEEDS,
)
def test_norm_properties(dtype, is_rms, rows, n, has_residual, row_pad, eps, seed):
    g = torch.Generator().manual_seed(seed)
    x = strided_rows(g, rows, n, dtype, row_pad) * 3 + 0.5
    residual = strided_rows(g, rows, n, dtype, row_pad) if has_residual else None
    weight = randn(g, n, dtype=dtype)
    bias = None if is_rms else randn(g, n, dtype=dtype)

    def run():
        if is_rms:
            return rms_norm(x, weight, eps, residual=residual)
        return layer_norm(x, weight, bias, eps, residual=residual)

    out = run()
    summed = x if residual is None else x + residual  # rounded in the dtype, as HF adds
    if residual is not None:
        out, new_residual = out
        assert torch.equal(new_residual, summed), "residual stream != x + residual"
    if is_rms:
        expected = reference_rms_norm(summed, weight, eps)
    else:
        expected = reference_layer_norm(summed, weight, bias, eps)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, expected, KERNEL_RTOL[dtype], "rms_norm" if is_rms else "layer_norm")
    assert_deterministic(run(), run(), "norm")


@st.composite
def key_ranges(draw, batch, length):
    """kv_start, kv_end int32 [B] with 0 <= start <= end <= length, or None (all keys)."""
    ends = [draw(st.integers(0, length)) for _ in range(batch)]
    starts = [draw(st.integers(0, end)) for end in ends]
    use_start, use_end = draw(st.booleans()), draw(st.booleans())
    kv_start = torch.tensor(starts, dtype=torch.int32, device=DEVICE) if use_start else None
    kv_end = torch.tensor(ends, dtype=torch.int32, device=DEVICE) if use_end else None
    return kv_start, kv_end


def heads_and_cache(g, batch, length, q_len, kv_heads, group, head_dim, dtype, layout):
    """q [B, Tq, Hq, D] sliced from a fused QKV buffer (strided), and k, v [B, S, Hkv, D]: a
    transposed [B, Hkv, S, D] cache or the K/V slices of the same fused buffer."""
    heads = kv_heads * group
    if layout == "fused":  # self-attention straight from a fused QKV output: S == Tq
        qkv = randn(g, batch, q_len, heads + 2 * kv_heads, head_dim, dtype=dtype)
        q = qkv[:, :, :heads]
        return q, qkv[:, :, heads : heads + kv_heads], qkv[:, :, heads + kv_heads :]
    q = randn(g, batch, q_len, heads + 2, head_dim, dtype=dtype)[:, :, 1 : heads + 1]
    if layout == "cache":
        k = randn(g, batch, kv_heads, length, head_dim, dtype=dtype).transpose(1, 2)
        v = randn(g, batch, kv_heads, length, head_dim, dtype=dtype).transpose(1, 2)
    else:
        k = randn(g, batch, length, kv_heads, head_dim, dtype=dtype)
        v = randn(g, batch, length, kv_heads, head_dim, dtype=dtype)
    return q, k, v


@PROPERTIES
@given(
    dtype=DTYPES,
    batch=st.integers(1, 2),
    q_len=st.integers(1, 37),
    kv_len=st.integers(1, 45),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 3]),
    head_dim=st.sampled_from([1, 8, 12, 16, 24, 33, 64]),
    causal=st.booleans(),
    layout=st.sampled_from(["fused", "cache", "contiguous"]),
    has_bias=st.booleans(),
    seed=SEEDS,
    data=st.data(),
)
def test_attention_properties(
    dtype, batch, q_len, kv_len, kv_heads, group, head_dim, causal, layout, has_bias, seed, data
):
    g = torch.Generator().manual_seed(seed)
    if layout == "fused":
        kv_len = q_len
    q, k, v = heads_and_cache(g, batch, kv_len, q_len, kv_heads, group, head_dim, dtype, layout)
    kv_start, kv_end = data.draw(key_ranges(batch, kv_len), label="kv_start, kv_end")
    bias = None
    if has_bias:  # T5: one [1, Hq, Tq, S] table broadcast over the batch (batch stride 0)
        bias = randn(g, 1, kv_heads * group, q_len, kv_len, dtype=torch.float32)
    kwargs = dict(causal=causal, scale=head_dim**-0.5, kv_start=kv_start, kv_end=kv_end, bias=bias)

    actual = attention(q, k, v, **kwargs)
    assert actual.shape == q.shape and actual.dtype == dtype
    expected = attention_reference(q, k, v, **kwargs)
    assert_close(actual, expected, ATTENTION_RTOL[dtype], f"attention ({layout})")
    assert_deterministic(actual, attention(q, k, v, **kwargs), "attention")


@PROPERTIES
@given(
    dtype=DTYPES,
    batch=st.integers(1, 3),
    cache_len=st.integers(1, 70),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4, 5]),
    head_dim=st.sampled_from([1, 8, 12, 24, 33, 64]),
    layout=st.sampled_from(["cache", "contiguous"]),
    num_splits=st.sampled_from([None, 1, 2, 3]),
    has_bias=st.booleans(),
    seed=SEEDS,
    data=st.data(),
)
def test_decode_attention_properties(
    dtype, batch, cache_len, kv_heads, group, head_dim, layout, num_splits, has_bias, seed, data
):
    g = torch.Generator().manual_seed(seed)
    q, k, v = heads_and_cache(g, batch, cache_len, 1, kv_heads, group, head_dim, dtype, layout)
    kv_start, kv_end = data.draw(key_ranges(batch, cache_len), label="kv_start, kv_end")
    if kv_end is None:  # decode always takes the cache lengths
        kv_end = torch.full((batch,), cache_len, dtype=torch.int32, device=DEVICE)
    bias = None
    if has_bias:
        bias = randn(g, 1, kv_heads * group, 1, cache_len, dtype=torch.float32)
    kwargs = dict(scale=head_dim**-0.5, kv_start=kv_start, kv_end=kv_end, bias=bias)

    actual = decode_attention(q, k, v, num_splits=num_splits, **kwargs)
    assert actual.shape == q.shape and actual.dtype == dtype
    expected = decode_reference(q, k, v, **kwargs)
    assert_close(actual, expected, ATTENTION_RTOL[dtype], f"decode ({layout}, {num_splits})")
    again = decode_attention(q, k, v, num_splits=num_splits, **kwargs)
    assert_deterministic(actual, again, "decode_attention")
