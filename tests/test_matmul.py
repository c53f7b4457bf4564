"""kernels.matmul against a float64 torch reference: odd shapes, every epilogue, strided views."""

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, DTYPES, KERNEL_RTOL, assert_close, matvec_config_params

import kernels.matmul as mm
from kernels.matmul import matmul

# Max-norm relative error against float64; fp32 uses IEEE products (no tf32).
TOL = KERNEL_RTOL


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def reference(x, weight, bias=None, activation=None, residual=None, alpha=1.0):
    y = x.double() @ weight.double().T
    if bias is not None:
        y = y + bias.double()
    if activation == "gelu":
        y = F.gelu(y)
    elif activation == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    elif activation == "relu":
        y = F.relu(y)
    elif activation == "tanh":
        y = torch.tanh(y)
    elif activation in ("silu_mul", "gelu_tanh_mul"):
        gate, up = y.chunk(2, dim=-1)
        y = (F.silu(gate) if activation == "silu_mul" else F.gelu(gate, approximate="tanh")) * up
    y = alpha * y
    if residual is not None:
        y = residual.double() + y
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "m, n, k, has_bias", [(1, 37, 72, True), (3, 64, 48, False), (37, 130, 24, True)]
)
def test_plain(dtype, m, n, k, has_bias):
    x, w = rand(m, k, dtype=dtype), rand(n, k, dtype=dtype)
    b = rand(n, dtype=dtype) if has_bias else None
    y = matmul(x, w, b)
    assert y.dtype == dtype
    assert_close(y, reference(x, w, b), TOL[dtype], f"matmul {m}x{n}x{k} bias={has_bias}")


def test_gelu_pointwise():
    """The epilogue's exact GELU (an erfc polynomial and one exp, not libdevice's erf) against
    y * Phi(y) in float64, point by point: over [-12, 12] within 5e-7 * max(1, |y|) (torch's own
    fp32 GELU is within 4.1e-7 * max(1, |y|)), and at the extremes. The values enter as the bias
    of a zero product, so the epilogue sees them exactly."""
    inf, nan = float("inf"), float("nan")
    extremes = [0.0, -0.0, 1e-30, -1e-30, 3e38, -3e38, inf, -inf, nan]
    y = torch.cat([torch.linspace(-12, 12, 8191), torch.tensor(extremes)])
    zeros = torch.zeros(1, 16, device=DEVICE)
    out = matmul(zeros, torch.zeros(len(y), 16, device=DEVICE), y.to(DEVICE), activation="gelu")
    out, y = out[0].cpu().double(), y.double()
    exact = y * 0.5 * torch.special.erfc(-y / 2**0.5)
    finite = y.isfinite()
    error = ((out - exact).abs() / y.abs().clamp(min=1))[finite]
    assert error.max() < 5e-7, f"GELU error {error.max():.2e} at y = {y[finite][error.argmax()]}"
    assert out[y == inf].item() == inf and out[y == -inf].item() == 0.0
    assert out[y.isnan()].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "tanh"])
def test_activation(dtype, activation):
    x, w, b = rand(5, 72, dtype=dtype), rand(37, 72, dtype=dtype), rand(37, dtype=dtype)
    assert_close(
        matmul(x, w, b, activation=activation),
        reference(x, w, b, activation),
        TOL[dtype],
        activation,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "activation, m, has_bias", [("silu_mul", 1, False), ("gelu_tanh_mul", 37, True)]
)
def test_gated(dtype, activation, m, has_bias):
    inter, k = 37, 48  # odd I: gate rows 0..36, up rows 37..73 of the fused weight
    x, w = rand(m, k, dtype=dtype), rand(2 * inter, k, dtype=dtype)
    b = rand(2 * inter, dtype=dtype) if has_bias else None
    y = matmul(x, w, b, activation=activation)
    assert y.shape == (m, inter)
    assert_close(y, reference(x, w, b, activation), TOL[dtype], activation)


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_alpha_3d(dtype):
    x, w, b = rand(2, 3, 40, dtype=dtype), rand(33, 40, dtype=dtype), rand(33, dtype=dtype)
    res = rand(2, 3, 33, dtype=dtype)
    y = matmul(x, w, b, activation="gelu", residual=res, alpha=0.37)
    assert y.shape == (2, 3, 33)
    assert_close(y, reference(x, w, b, "gelu", res, 0.37), TOL[dtype], "residual + alpha * gelu")


def test_strided_views():
    big = rand(3, 5, 72)
    x = big[:, -1]  # [3, 72] with row stride 5 * 72, read in place
    res_big = rand(3, 4, 37)
    res = res_big[:, 0]  # row stride 4 * 37
    w, b = rand(37, 72), rand(37)
    assert not x.is_contiguous() and not res.is_contiguous()
    y = matmul(x, w, b, residual=res, alpha=2.0)
    assert_close(
        y, reference(x, w, b, None, res, 2.0), TOL[torch.float32], "strided x and residual"
    )


def test_operands_passed_as_they_are_or_copied():
    """A plan hands x, residual and out to its kernel as they are when each is a view of rows,
    and the call copies them first when not (a transposed batch, a strided bias): the same
    result either way, on a signature's first call and on later ones."""
    w = rand(29, 40)
    cases = [
        (rand(2, 3, 40), rand(2, 3, 29), rand(29)),  # views of rows: passed as they are
        (rand(3, 2, 40).transpose(0, 1), rand(3, 2, 29).transpose(0, 1), rand(58)[::2]),
    ]
    for x, res, b in cases:
        expected = reference(x, w, b, "gelu", res, 0.5)
        for call in range(2):
            y = matmul(x, w, b, activation="gelu", residual=res, alpha=0.5)
            assert y.shape == (2, 3, 29)
            assert_close(y, expected, TOL[torch.float32], f"call {call}, x strides {x.stride()}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_out_aliases_residual(dtype):
    x, w, b = rand(2, 4, 24, dtype=dtype), rand(130, 24, dtype=dtype), rand(130, dtype=dtype)
    h = rand(2, 4, 130, dtype=dtype)
    expected = reference(x, w, b, "relu", h, 0.5)
    y = matmul(x, w, b, activation="relu", residual=h, alpha=0.5, out=h)
    assert y is h
    assert_close(h, expected, TOL[dtype], "in-place residual add")


@pytest.mark.skipif(DEVICE != "cuda", reason="autotuning runs on the GPU only")
def test_in_place_residual_while_autotuning_behind_pending_work():
    """The first call at a new shape autotunes (the kernel runs many times on the autotuner's own
    stream) while the residual's last update may still be queued on the current stream: the
    result must still be one residual add. A weight big enough to have several configs to time;
    an N of its own so that this call tunes."""
    x, w = rand(4, 1024, dtype=torch.float16), rand(1064, 1024, dtype=torch.float16)
    h = rand(4, 1064, dtype=torch.float16)
    expected = reference(x, w, residual=h + 1)
    torch.cuda._sleep(50_000_000)  # keep the current stream busy, then update the residual
    h.add_(1)
    matmul(x, w, residual=h, out=h)
    assert_close(h, expected, TOL[torch.float16], "in-place residual add at autotune time")


@pytest.mark.parametrize(
    "activation, k, split_k",
    [("silu_mul", 300, 3), (None, 72, 4)],  # 3 uneven slices; 4 slices of which two are empty
)
def test_split_k(monkeypatch, activation, k, split_k):
    monkeypatch.setattr(mm, "_pick_split_k", lambda *args: split_k)
    n_w = 74 if activation == "silu_mul" else 37
    x, w, b, res = rand(3, k), rand(n_w, k), rand(n_w), rand(3, 37)
    y = matmul(x, w, b, activation=activation, residual=res, alpha=0.5)
    assert_close(
        y, reference(x, w, b, activation, res, 0.5), TOL[torch.float32], f"split-K {split_k}"
    )


DECODE_TABLE_CONFIGS = [
    pytest.param(bucket, config, id=f"M{bucket}-{i}")
    for bucket, table in mm._DECODE_CONFIGS.items()
    for i, config in enumerate(table)
]


def fresh_tuning(monkeypatch, tuner, configs=None):
    """On the GPU: the autotuner forgets its picks for this test (and tunes over `configs`
    only, where given), so that each test runs the configs it names."""
    if mm.INTERPRET:
        return
    monkeypatch.setattr(mm, "_tuned_configs", {})
    monkeypatch.setattr(tuner, "cache", {})
    if configs is not None:
        monkeypatch.setattr(tuner, "configs", configs)


def plan_kernel(plan):
    """A plan's main kernel (the Triton function it launches or will tune)."""
    return plan.main.kernel if plan.main is not None else plan.tune[0]


def plan_meta(plan) -> dict:
    """A plan's constexprs: its launch's, or (before its first call on the GPU) its tuning's."""
    return plan.main.meta if plan.main is not None else plan.tune[4]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bucket, config", DECODE_TABLE_CONFIGS)
def test_decode_table_configs(monkeypatch, kernel_options, dtype, bucket, config):
    """Every config of the decode table (matmul at decode batches), with K split in uneven slices
    as the table splits it: ragged M inside the one row block, odd N and K, the gated epilogue
    with bias and residual, and the same numbers as with the table off."""
    kernel_options(matmul_decode_table=1)
    monkeypatch.setitem(mm._DECODE_CONFIGS, bucket, [config])
    monkeypatch.setattr(mm, "_pick_split_k", lambda *args: 3)
    fresh_tuning(monkeypatch, mm._matmul_kernel_tuned)
    m, inter, k = bucket - 5, 37, 300
    x, w, b, res = (rand(m, k, dtype=dtype), rand(2 * inter, k, dtype=dtype),
                    rand(2 * inter, dtype=dtype), rand(m, inter, dtype=dtype))  # fmt: skip
    plan = mm._plan(x, w, b, "silu_mul", res, None, None, None)
    assert plan_meta(plan)["CONFIG_TABLE"] == "decode" and plan.split_k == 3
    y = matmul(x, w, b, activation="silu_mul", residual=res, alpha=0.5)
    if mm.INTERPRET:
        assert plan.main.meta["BLOCK_M"] == bucket
    else:  # the config, unless it does not fit this dtype's tiles in shared memory
        fits = mm._fits(config, 2, x.element_size(), mm.max_shared_memory(x.device))
        tuned = [c.kwargs["BLOCK_M"] for c in mm._tuned_configs.values()]
        assert tuned == [bucket if fits else mm._FALLBACK_CONFIG.kwargs["BLOCK_M"]]
    assert_close(y, reference(x, w, b, "silu_mul", res, 0.5), TOL[dtype], f"decode table {config}")
    kernel_options(matmul_decode_table=0)
    y_off = matmul(x, w, b, activation="silu_mul", residual=res, alpha=0.5)
    assert (
        plan_meta(mm._plan(x, w, b, "silu_mul", res, None, None, None))["CONFIG_TABLE"] == "default"
    )
    assert_close(y, y_off, TOL[dtype], "decode table on vs off")


def _matvec_cases():
    """(config, activation): on the GPU every 16-bit matrix-vector config the autotuner keeps for
    that mode at bf16, else the interpreter's one config."""
    if mm.INTERPRET:
        return [pytest.param(None, a, id=f"interpreter-{a}") for a in (None, "gelu", "silu_mul")]
    return matvec_config_params(mm._MATVEC_16BIT_CONFIGS, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config, activation", _matvec_cases())
@pytest.mark.parametrize("split_k", [1, 2])
def test_matvec(monkeypatch, kernel_options, dtype, config, activation, split_k):
    """M = 1 through the matrix-vector kernel (kernel option matvec), each config of its 16-bit
    table on the GPU: odd N and K (K split in two uneven slices, or not), bias, residual and
    alpha, and the same numbers as the tl.dot kernel's with the option off."""
    kernel_options(matvec=1)
    monkeypatch.setattr(mm, "_matvec_split_k", lambda n_rows, k: split_k)
    fresh_tuning(monkeypatch, mm._matvec_kernel_tuned, None if config is None else [config])
    n_w = 2 * 601 if activation == "silu_mul" else 601
    k = 1000
    x, w, b = rand(1, k, dtype=dtype), rand(n_w, k, dtype=dtype), rand(n_w, dtype=dtype)
    res = rand(1, 601, dtype=dtype)
    plan = mm._plan(x, w, b, activation, res, None, None, None)
    assert plan_meta(plan)["SPLIT_K"] == split_k
    assert plan_kernel(plan) is mm._matvec_kernel
    y = matmul(x, w, b, activation=activation, residual=res, alpha=0.5)
    if config is not None:
        assert list(mm._tuned_configs.values()) == [config]
    expected = reference(x, w, b, activation, res, 0.5)
    assert_close(y, expected, TOL[dtype], f"matvec {config} {activation} split {split_k}")
    kernel_options(matvec=0)
    assert plan_kernel(mm._plan(x, w, b, activation, res, None, None, None)) is mm._matmul_kernel
    assert_close(matmul(x, w, b, activation=activation, residual=res, alpha=0.5), y, TOL[dtype],
                 "matvec on vs off")  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "activation, k, split_k", [(None, 1000, 1), ("silu_mul", 1000, 2), (None, 100, 3)]
)
def test_matvec_preload(monkeypatch, kernel_options, dtype, activation, k, split_k):
    """Kernel option matvec_preload: the matrix-vector kernel's first weight step loaded before
    the PDL wait gives the plain loop's numbers (bitwise in the interpreter), K split or not (3
    slices of K = 100: the last one empty)."""
    monkeypatch.setattr(mm, "_matvec_split_k", lambda n_rows, k: split_k)
    n_w = 2 * 601 if activation == "silu_mul" else 601
    x, w, b = rand(1, k, dtype=dtype), rand(n_w, k, dtype=dtype), rand(n_w, dtype=dtype)
    res = rand(1, 601, dtype=dtype)
    kernel_options(matvec_preload=1)
    assert plan_meta(mm._plan(x, w, b, activation, res, None, None, None))["PRELOAD"]
    y = matmul(x, w, b, activation=activation, residual=res, alpha=0.5)
    expected = reference(x, w, b, activation, res, 0.5)
    assert_close(y, expected, TOL[dtype], f"matvec preload {activation} split {split_k}")
    kernel_options(matvec_preload=0)
    y_plain = matmul(x, w, b, activation=activation, residual=res, alpha=0.5)
    if mm.INTERPRET:
        assert torch.equal(y, y_plain), "preload changed the sums"
    assert_close(y, y_plain, TOL[dtype], "matvec preload on vs off")


def test_splitk_epilogue_grid_fills_the_sms(monkeypatch):
    """On the GPU the split-K epilogue halves its column blocks (256 down to 32) until its grid has
    two programs per SM: Llama-3-8B's o projection at batch 32 sums its partials in 256 programs
    of 16 x 32, not 32 of 16 x 256; the batch-128 grid stops at 64 columns, a large one stays at
    256. The interpreter keeps its 128."""
    monkeypatch.setattr(mm, "INTERPRET", False)
    monkeypatch.setattr(mm, "num_sms", lambda device: 132)
    device = torch.device("cpu")
    grids = {
        (m, n): mm._splitk_epilogue(m, n, 4, {}, block_m=16, device=device).grid
        for m, n in [(32, 4096), (128, 4096), (1024, 4096), (1, 4096)]
    }
    assert grids == {(32, 4096): (2, 128), (128, 4096): (8, 64), (1024, 4096): (64, 16),
                     (1, 4096): (1, 128)}  # fmt: skip
    assert mm._splitk_epilogue(1, 4096, 2, {}, block_m=1, device=device).meta["BLOCK_N"] == 32
    monkeypatch.setattr(mm, "INTERPRET", True)
    assert mm._splitk_epilogue(32, 4096, 4, {}, block_m=16, device=device).meta["BLOCK_N"] == 128


def test_decode_table_covers_only_decode_buckets(kernel_options):
    kernel_options(matmul_decode_table=1)
    assert [mm._config_table(b) for b in (1, 16, 32, 64, 128, 256, 512)] == (
        ["default"] * 2 + ["decode"] * 3 + ["default"] * 2
    )
    kernel_options(matmul_decode_table=0)
    assert {mm._config_table(b) for b in (32, 64, 128)} == {"default"}


def test_decode_table_split_k_on_the_gpu_path(monkeypatch):
    """On a GPU the decode table's plans split K by _decode_split_k; the default table keeps the
    earlier rule (64x64 output tiles: 128 of them at M bucket 128 for Llama's o projection)."""
    monkeypatch.setattr(mm, "INTERPRET", False)
    monkeypatch.setattr(mm, "num_sms", lambda device: 132)
    pick = mm._pick_split_k.__wrapped__  # uncached: INTERPRET is patched
    cuda = torch.device("cuda")
    assert pick(128, 4096, 4096, cuda, "decode") == 4
    assert pick(128, 4096, 4096, cuda, "default") == 2


@pytest.mark.parametrize(
    "n, k, split_k",
    [
        (6144, 4096, 2),  # Llama-3-8B qkv: 96 column blocks, 2 slices fill 132 SMs
        (4096, 4096, 4),  # o: 64 blocks
        (14336, 4096, 1),  # gate-up (I columns): 224 blocks
        (4096, 14336, 4),  # down
        (128256, 4096, 1),  # lm_head
        (64, 768, 1),  # a slice would keep less than 512 of K
        (64, 100_000, 8),  # at most 8 slices
    ],
)
def test_decode_split_k_table(n, k, split_k):
    """The decode table's K split on an H200 (132 SMs) at Llama-3-8B's projections."""
    assert mm._decode_split_k(n, k, 132) == split_k
    blocks = -(-n // mm._DECODE_BLOCK_N)
    if split_k > 1:
        assert k // split_k >= mm._DECODE_MIN_K_SLICE and blocks * split_k // 2 < 132


@pytest.mark.parametrize("dtype", [t for t in DTYPES if t != torch.float32])
@pytest.mark.parametrize(
    "activation, n_w, k, has_bias, has_residual",
    [(None, 70, 72, True, False), ("silu_mul", 74, 40, False, True), ("gelu", 100, 48, True, True)],
)
def test_tma_kernel(dtype, activation, n_w, k, has_bias, has_residual):
    """Large-M fp16/bf16 problems take the persistent TMA kernel (on Hopper and under the
    interpreter): ragged M, N and K tiles read as zeros past the edges; gate rows past N."""
    m = 300
    x, w = rand(m, k, dtype=dtype), rand(n_w, k, dtype=dtype)
    if not (mm.INTERPRET or mm.is_hopper_or_newer(x.device)):
        pytest.skip("TMA needs a Hopper (or newer) GPU")
    assert mm._takes_tma(x, w, mm.next_pow2(m))
    b = rand(n_w, dtype=dtype) if has_bias else None
    n = n_w // 2 if activation == "silu_mul" else n_w
    res = rand(m, n, dtype=dtype) if has_residual else None
    y = matmul(x, w, b, activation=activation, residual=res, alpha=0.5)
    expected = reference(x, w, b, activation, res, 0.5)
    assert_close(y, expected, TOL[dtype], f"TMA matmul {m}x{n_w}x{k} {activation}")


TMA_VARIANTS = [
    pytest.param(dict(epilogue_subtile=sub, tma_store=store, warp_specialize=ws), id=name)
    for name, sub, store, ws in [
        ("subtile2", 2, 0, 0),
        ("subtile4", 4, 0, 0),
        ("tma-store", 1, 1, 0),
        ("subtile2-tma-store", 2, 1, 0),
        ("subtile4-tma-store", 4, 1, 0),
        ("warp-specialize", 1, 0, 1),
        ("subtile2-tma-store-warp-specialize", 2, 1, 1),
    ]
]


@pytest.mark.parametrize("dtype", [t for t in DTYPES if t != torch.float32])
@pytest.mark.parametrize("variant", TMA_VARIANTS)
@pytest.mark.parametrize(
    "activation, n_w, k, has_bias, has_residual",
    [
        ("gelu", 104, 48, True, True),
        ("silu_mul", 208, 40, False, True),
        (None, 72, 40, True, False),
    ],
)
def test_tma_epilogue_variants(
    monkeypatch, kernel_options, dtype, variant, activation, n_w, k, has_bias, has_residual
):
    """The persistent TMA kernel's epilogue variants (column slices, TMA stores, warp
    specialization) against the reference and against the default epilogue: ragged M and N
    edges (N = 104 / 72: partial tiles and slices), the gated activation, the residual."""
    m = 300
    x, w = rand(m, k, dtype=dtype), rand(n_w, k, dtype=dtype)
    if not (mm.INTERPRET or mm.is_hopper_or_newer(x.device)):
        pytest.skip("TMA needs a Hopper (or newer) GPU")
    b = rand(n_w, dtype=dtype) if has_bias else None
    n = n_w // 2 if activation == "silu_mul" else n_w
    res = rand(m, n, dtype=dtype) if has_residual else None
    # on the GPU: one 8-warp config with both accumulators of a gated tile in registers
    fresh_tuning(monkeypatch, mm._matmul_tma_kernel_tuned, [mm._tma_config(128, 128, 64, 3, 8)])
    default = matmul(x, w, b, activation=activation, residual=res, alpha=0.5)
    kernel_options(**variant)
    plan = mm._plan(x, w, b, activation, res, None, None, None)
    assert plan.tma
    meta = plan_meta(plan)
    assert meta["EPILOGUE_SUBTILE"] == variant["epilogue_subtile"]
    assert meta["TMA_STORE"] == bool(variant["tma_store"])  # n * 2 bytes is 16-byte aligned
    y = matmul(x, w, b, activation=activation, residual=res, alpha=0.5)
    expected = reference(x, w, b, activation, res, 0.5)
    assert_close(y, expected, TOL[dtype], f"TMA matmul {variant} {activation}")
    assert_close(y, default, TOL[dtype], f"TMA matmul {variant} vs the default epilogue")


@pytest.mark.parametrize("dtype", [t for t in DTYPES if t != torch.float32])
@pytest.mark.parametrize(
    "activation, has_bias, has_residual", [(None, True, True), ("gelu", True, False)]
)
def test_tma_split_k(monkeypatch, dtype, activation, has_bias, has_residual):
    """The persistent TMA kernel with each tile's K split in two (uneven slices): the last of a
    tile's programs sums the partials and runs the epilogue, and every tile's count is back at 0
    after the call, so the next call (or a graph's replay) starts clean: the same bits again,
    the reference's numbers."""
    m, n, k = 300, 72, 2104  # K: ragged against BLOCK_K, rows 16-byte aligned (TMA)
    x, w = rand(m, k, dtype=dtype), rand(n, k, dtype=dtype)
    if not (mm.INTERPRET or mm.is_hopper_or_newer(x.device)):
        pytest.skip("TMA needs a Hopper (or newer) GPU")
    monkeypatch.setattr(mm, "_INTERPRET_TMA_CONFIG", {**mm._INTERPRET_TMA_CONFIG, "SPLIT_K": 2})
    fresh_tuning(
        monkeypatch, mm._matmul_tma_kernel_tuned, [mm._tma_config(128, 128, 64, 4, 4, split_k=2)]
    )
    b = rand(n, dtype=dtype) if has_bias else None
    res = rand(m, n, dtype=dtype) if has_residual else None
    y = matmul(x, w, b, activation=activation, residual=res, alpha=0.5)
    (plan,) = [p for p in mm._plans.values() if p.tma_split is not None]
    assert_close(y, reference(x, w, b, activation, res, 0.5), TOL[dtype], "TMA split-K matmul")
    counts = plan.tma_split[1]
    assert counts.numel() > 1 and not counts.any(), "tile counts left for the next launch"
    again = matmul(x, w, b, activation=activation, residual=res, alpha=0.5)
    assert torch.equal(again, y)
    # on the GPU the plan's launch is fixed at its second call (the first one tunes)
    assert plan_meta(plan)["SPLIT_K"] == 2 and not counts.any()


def test_tma_split_k_only_where_tiles_leave_sms_idle():
    """K splits are tried only for 16-bit operands without the fused gate or warp
    specialization, with enough K per slice, where the tiles of the M bucket fill fewer than two
    rounds of the SMs."""
    split = mm._tma_config(128, 128, 64, 4, 4, split_k=2).kwargs
    plain = mm._tma_config(128, 128, 64, 4, 4).kwargs
    useful = mm._tma_split_useful
    meta = {"FUSED_GATE": False, "X_FP8": False, "WARP_SPECIALIZE": False}
    assert useful(split, 4096, 768, 3072, meta, 132)  # Bert down: 192 tiles
    assert not useful(split, 4096, 768, 768, meta, 132)  # K slices too short
    assert not useful(split, 16384, 768, 3072, meta, 132)  # 768 tiles: rounds enough
    assert not useful(split, 4096, 768, 3072, {**meta, "FUSED_GATE": True}, 132)
    assert not useful(split, 4096, 768, 3072, {**meta, "X_FP8": True}, 132)
    assert not useful(split, 4096, 768, 3072, {**meta, "WARP_SPECIALIZE": True}, 132)
    every = {"FUSED_GATE": True, "X_FP8": True, "WARP_SPECIALIZE": True}
    assert useful(plain, 16384, 768, 768, every, 132)  # unsplit configs always run


@pytest.mark.parametrize("dtype", [t for t in DTYPES if t != torch.float32])
@pytest.mark.parametrize("variant", TMA_VARIANTS[:5])
@pytest.mark.parametrize("n, has_bias, has_residual", [(104, True, True), (176, False, False)])
def test_tma_tail_columns(monkeypatch, kernel_options, dtype, variant, n, has_bias, has_residual):
    """The persistent TMA kernel with tiles one block plus a narrower tail of columns wide:
    ragged M and N (N = 104 ends inside a main block, 176 inside a tail, with the interpreter's
    64 + 32 columns and the GPU's 128 + 64), every epilogue variant (the tail stored through TMA
    where the output's block is its shape), the reference's numbers and the default kernel's."""
    m, k = 300, 72
    x, w = rand(m, k, dtype=dtype), rand(n, k, dtype=dtype)
    if not (mm.INTERPRET or mm.is_hopper_or_newer(x.device)):
        pytest.skip("TMA needs a Hopper (or newer) GPU")
    b = rand(n, dtype=dtype) if has_bias else None
    res = rand(m, n, dtype=dtype) if has_residual else None
    default = matmul(x, w, b, activation="gelu", residual=res, alpha=0.5)
    kernel_options(**variant)
    tail = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_N_TAIL": 32}
    monkeypatch.setattr(mm, "_INTERPRET_TMA_CONFIG", {**mm._INTERPRET_TMA_CONFIG, **tail})
    tail_config = mm._tma_config(128, 128, 64, 3, 8, tail=64)
    monkeypatch.setattr(mm, "_tma_tail_useful", lambda *args: True)
    fresh_tuning(monkeypatch, mm._matmul_tma_kernel_tuned, [tail_config])
    y = matmul(x, w, b, activation="gelu", residual=res, alpha=0.5)
    assert_close(y, reference(x, w, b, "gelu", res, 0.5), TOL[dtype], f"TMA tail {variant}")
    assert_close(y, default, TOL[dtype], f"TMA tail {variant} vs the default tiles")
    assert torch.equal(matmul(x, w, b, activation="gelu", residual=res, alpha=0.5), y)
    # on the GPU the plan's launch is fixed at its second call (the first one tunes)
    (plan,) = [p for p in mm._plans.values() if p.tma and plan_meta(p).get("BLOCK_N_TAIL", 0) > 0]
    assert plan.tma_blocks[3] == [plan_meta(plan)["BLOCK_N_TAIL"], plan_meta(plan)["BLOCK_K"]]


def test_tma_residual_slices_per_config():
    """A config reads a residual in four slices where its accumulator takes 128 registers per
    thread (128 x 256 with 8 warps, 128 x 128 with 4), else in the epilogue option's."""
    assert mm._tma_config(128, 256, 64, 3, 8).kwargs["RESIDUAL_SLICES"] == 4
    assert mm._tma_config(128, 128, 64, 4, 4).kwargs["RESIDUAL_SLICES"] == 4
    assert mm._tma_config(128, 128, 64, 4, 8).kwargs["RESIDUAL_SLICES"] == 1
    assert mm._tma_config(128, 128, 64, 3, 8, tail=64).kwargs["RESIDUAL_SLICES"] == 1
    meta = {"EPILOGUE_SUBTILE": 2, "HAS_RESIDUAL": True, "RESIDUAL_SLICES": 4}
    assert mm._epilogue_slices(meta) == 4
    assert mm._epilogue_slices({**meta, "HAS_RESIDUAL": False}) == 2
    assert mm._epilogue_slices({**meta, "RESIDUAL_SLICES": 1}) == 2


# the interpreter runs its own tile (with RESIDUAL_SLICES 4): one tile there
RESIDUAL_SLICE_TILES = [(128, 128, 64, 4, 4)] + ([] if mm.INTERPRET else [(128, 256, 64, 3, 8)])


@pytest.mark.parametrize("dtype", [t for t in DTYPES if t != torch.float32])
@pytest.mark.parametrize("variant", [
    pytest.param(dict(epilogue_subtile=1, tma_store=1), id="tma-store"),
    pytest.param(dict(epilogue_subtile=1, tma_store=0), id="pointer-store"),
    pytest.param(dict(epilogue_subtile=2, tma_store=1), id="subtile2-tma-store"),
])  # fmt: skip
@pytest.mark.parametrize("tile", RESIDUAL_SLICE_TILES)
def test_tma_residual_slices(monkeypatch, kernel_options, dtype, variant, tile):
    """Tiles whose accumulator takes 128 registers per thread read a residual in four column
    slices whatever the epilogue option says: ragged M and N (N = 200 ends inside a slice), the
    reference's numbers and the one-slice epilogue's, the output descriptor's block a slice;
    without a residual the option's slices stay."""
    m, n, k = 300, 200, 72
    x, w = rand(m, k, dtype=dtype), rand(n, k, dtype=dtype)
    if not (mm.INTERPRET or mm.is_hopper_or_newer(x.device)):
        pytest.skip("TMA needs a Hopper (or newer) GPU")
    b, res = rand(n, dtype=dtype), rand(m, n, dtype=dtype)
    default = matmul(x, w, b, activation="gelu", residual=res, alpha=0.5)
    kernel_options(**variant)
    config = mm._tma_config(*tile)
    assert config.kwargs["RESIDUAL_SLICES"] == 4
    monkeypatch.setattr(
        mm, "_INTERPRET_TMA_CONFIG", {**mm._INTERPRET_TMA_CONFIG, "RESIDUAL_SLICES": 4}
    )
    fresh_tuning(monkeypatch, mm._matmul_tma_kernel_tuned, [config])
    y = matmul(x, w, b, activation="gelu", residual=res, alpha=0.5)
    assert_close(y, reference(x, w, b, "gelu", res, 0.5), TOL[dtype], f"TMA residual slices {tile}")
    assert_close(y, default, TOL[dtype], f"TMA residual slices {tile} vs the default tiles")
    assert torch.equal(matmul(x, w, b, activation="gelu", residual=res, alpha=0.5), y)
    # on the GPU the plan's launch is fixed at its second call (the first one tunes)
    (plan,) = [p for p in mm._plans.values() if p.tma and plan_meta(p)["HAS_RESIDUAL"]]
    meta = plan_meta(plan)
    assert mm._epilogue_slices(meta) == 4
    assert plan.tma_blocks[2] == [meta["BLOCK_M"], meta["BLOCK_N"] // 4]
    assert mm._epilogue_slices({**meta, "HAS_RESIDUAL": False}) == variant["epilogue_subtile"]
    y = matmul(x, w, b, activation="gelu", alpha=0.5)  # no residual: the option's slices
    assert_close(y, reference(x, w, b, "gelu", None, 0.5), TOL[dtype], f"TMA slices {tile}")


@pytest.mark.parametrize("dtype", [t for t in DTYPES if t != torch.float32])
@pytest.mark.parametrize(
    "activation, has_residual", [("gelu", False), (None, True), ("silu_mul", False)]
)
def test_tma_two_programs_per_sm(monkeypatch, dtype, activation, has_residual):
    """The persistent kernel launched with two programs per SM (128 x 128 tiles, 4 warps): more
    tiles than programs, so each program walks several, against the reference."""
    m, n_w, k = 1100, 400, 136
    x, w = rand(m, k, dtype=dtype), rand(n_w, k, dtype=dtype)
    if not (mm.INTERPRET or mm.is_hopper_or_newer(x.device)):
        pytest.skip("TMA needs a Hopper (or newer) GPU")
    b = rand(n_w, dtype=dtype)
    n = n_w // 2 if activation == "silu_mul" else n_w
    res = rand(m, n, dtype=dtype) if has_residual else None
    config = mm._tma_config(128, 128, 64, 3, 4, 2)
    assert config.kwargs in [c.kwargs for c in mm._TMA_CONFIGS]  # one the autotuner tries
    assert config.kwargs["PROGRAMS_PER_SM"] == 2
    fresh_tuning(monkeypatch, mm._matmul_tma_kernel_tuned, [config])
    y = matmul(x, w, b, activation=activation, residual=res, alpha=0.5)
    expected = reference(x, w, b, activation, res, 0.5)
    assert_close(y, expected, TOL[dtype], f"TMA 2 programs per SM {activation}")


def test_tma_only_where_int32_offsets_reach_the_output(monkeypatch):
    """The TMA kernel's epilogue addresses the output and residual with int32 offsets: outputs
    spanning 2**31 elements or more take the pointer kernel (int64 offsets)."""
    x, w = torch.zeros(512, 64, dtype=torch.float16), torch.zeros(64, 64, dtype=torch.float16)
    rows = torch.zeros(4, 10, dtype=torch.float16)[:, 2:7]  # 4 rows of 5, row stride 10
    assert mm._elements_spanned(rows) == 35 and mm._elements_spanned(None) == 0
    assert mm._elements_spanned(torch.zeros(3, 0)) == 0
    monkeypatch.setattr(mm, "INTERPRET", True)  # TMA taken wherever the operands allow it
    assert mm._takes_tma(x, w, 512, out_span=2**31 - 1)
    assert not mm._takes_tma(x, w, 512, out_span=2**31)


def test_tma_tail_only_where_it_fills_the_last_round():
    """Tiles with a tail of columns are tried only for 16-bit operands without the fused gate
    or warp specialization, where their rounds of the SMs are fuller than the narrower tiles'."""
    tail = mm._tma_config(128, 128, 64, 3, 8, tail=64).kwargs
    useful = mm._tma_tail_useful
    meta = {"FUSED_GATE": False, "X_FP8": False, "WARP_SPECIALIZE": False}
    assert useful(tail, 4096, 768, meta, 132)  # Bert down at 32x128: 128 tiles against 192
    assert useful(tail, 4096, 2304, meta, 132)  # Bert QKV: 384 against 576
    assert not useful(tail, 16384, 768, meta, 132)  # 512 against 768: both rounds ~full
    assert not useful(tail, 1024, 768, meta, 132)  # 32 against 48: fewer SMs busy
    assert not useful(tail, 2048, 4096, meta, 132)  # Llama o: 352 against 512
    for name in meta:
        assert not useful(tail, 4096, 768, {**meta, name: True}, 132)
    assert useful(mm._tma_config(128, 128, 64, 3, 8).kwargs, 1024, 768, meta, 132)


@pytest.mark.parametrize("dtype", [t for t in DTYPES if t != torch.float32])
def test_tma_store_in_place_and_unaligned_outputs(monkeypatch, kernel_options, dtype):
    """TMA stores write an in-place residual add; an output whose rows TMA cannot address
    (37 halves: 74 bytes) keeps pointer stores under the same options."""
    x, w = rand(300, 48, dtype=dtype), rand(64, 48, dtype=dtype)
    if not (mm.INTERPRET or mm.is_hopper_or_newer(x.device)):
        pytest.skip("TMA needs a Hopper (or newer) GPU")
    fresh_tuning(monkeypatch, mm._matmul_tma_kernel_tuned, [mm._tma_config(128, 64, 64, 3, 4)])
    kernel_options(epilogue_subtile=2, tma_store=1)
    h = rand(300, 64, dtype=dtype)
    expected = reference(x, w, None, "relu", h, 0.5)
    assert matmul(x, w, activation="relu", residual=h, alpha=0.5, out=h) is h
    assert_close(h, expected, TOL[dtype], "TMA store, in-place residual add")
    w37 = rand(37, 48, dtype=dtype)
    plan = mm._plan(x, w37, None, None, None, None, None, None)
    assert plan.tma and not plan_meta(plan)["TMA_STORE"]
    assert_close(matmul(x, w37), reference(x, w37), TOL[dtype], "unaligned output rows")


def test_tma_needs_aligned_rows():
    """A row stride TMA cannot address (K = 36 halves: 72 bytes) takes the pointer kernel."""
    x, w = rand(300, 36, dtype=torch.float16), rand(40, 36, dtype=torch.float16)
    assert not mm._takes_tma(x, w, 512)
    assert_close(matmul(x, w), reference(x, w), TOL[torch.float16], "unaligned rows")


def test_empty_rows():
    y = matmul(rand(0, 16), rand(8, 16))
    assert y.shape == (0, 8)


def test_errors():
    x, w = rand(3, 16), rand(8, 16)
    with pytest.raises(ValueError, match=r"weight.*\[N, 16\].*\(3, 16\).*\(8, 12\)"):
        matmul(x, rand(8, 12))
    with pytest.raises(ValueError, match=r"bias.*\(8,\).*\(7,\)"):
        matmul(x, w, rand(7))
    with pytest.raises(ValueError, match=r"residual.*\(3, 8\).*\(3, 9\)"):
        matmul(x, w, residual=rand(3, 9))
    with pytest.raises(ValueError, match=r"out.*\(3, 8\).*\(2, 8\)"):
        matmul(x, w, out=rand(2, 8))
    with pytest.raises(ValueError, match="weight: dtype"):
        matmul(x, w.half())
    with pytest.raises(ValueError, match="bias: dtype"):
        matmul(x, w, rand(8).half())
    with pytest.raises(ValueError, match="residual: dtype"):
        matmul(x, w, residual=rand(3, 8).half())
    with pytest.raises(ValueError, match="x: dtype"):
        matmul(x.double(), w.double())
    with pytest.raises(ValueError, match="activation"):
        matmul(x, w, activation="swish")
    with pytest.raises(ValueError, match="odd number of rows"):
        matmul(x, rand(7, 16), activation="silu_mul")
    with pytest.raises(ValueError, match="weight: the last dimension must be contiguous"):
        matmul(x, rand(16, 8).t())
