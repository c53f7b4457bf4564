"""Launch plans (kernels/launch.py): one plan per input signature, a new one whenever something the
checks, the plan or Triton's specialization depend on changes (strides, dtype, 16-byte alignment,
flags), and results that stay right across signatures. The direct launch of the compiled kernel
is off under the interpreter; its argument handling is checked here with stand-in objects, and on
the GPU its outputs must equal Triton's own launch bitwise."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, assert_close

import kernels.launch as launch
import kernels.matmul
import kernels.norm
import kernels.utils
from kernels.attention import attention
from kernels.decode import decode_attention
from kernels.embedding import embedding
from kernels.launch import KernelLaunch, PlanCache, clear_plans, tensor_key
from kernels.matmul import matmul
from kernels.norm import layer_norm, rms_norm
from kernels.relative_bias import relative_position_bias
from kernels.rope import rope_cache_write

ON_GPU = DEVICE == "cuda"
FP32_RTOL = 1e-5


def _misaligned(shape, dtype=torch.float32):
    """A tensor of `shape` whose data starts 1 element past a 16-byte boundary."""
    numel = torch.Size(shape).numel()
    return torch.randn(numel + 1, device=DEVICE).to(dtype)[1:].view(shape)


def test_tensor_key_tells_apart_what_the_launch_depends_on():
    x = torch.randn(6, 40, device=DEVICE)
    assert tensor_key(x) == tensor_key(torch.randn(6, 40, device=DEVICE))
    assert tensor_key(x) != tensor_key(x.half())  # dtype
    assert tensor_key(x) != tensor_key(x.t().contiguous().t())  # strides
    assert tensor_key(x) != tensor_key(x[:5])  # shape
    assert tensor_key(x) != tensor_key(_misaligned((6, 40)))  # alignment
    assert tensor_key(x[:, 4:8]) != tensor_key(x[:, 1:5])  # 16-byte vs 4-byte offset
    assert tensor_key(None) is None


def test_norm_plan_reused_and_renewed():
    clear_plans()
    w = torch.randn(40, device=DEVICE)
    x = torch.randn(5, 40, device=DEVICE)
    rms_norm(x, w, 1e-6)
    assert len(kernels.norm._plans) == 1
    plan = next(iter(kernels.norm._plans.values()))
    rms_norm(torch.randn(5, 40, device=DEVICE), w, 1e-6)  # same signature
    assert len(kernels.norm._plans) == 1 and next(iter(kernels.norm._plans.values())) is plan

    # a misaligned view after an aligned one of the same shape: a plan of its own, right result
    x_odd = _misaligned((5, 40))
    y = rms_norm(x_odd, w, 1e-6)
    assert len(kernels.norm._plans) == 2
    assert_close(y, F.rms_norm(x_odd, (40,), w, 1e-6), FP32_RTOL, "misaligned x")
    # a row stride, a dtype, a flag (residual) and another op (layer norm): new plans
    x_strided = torch.randn(5, 48, device=DEVICE)[:, :40]
    assert_close(rms_norm(x_strided, w, 1e-6), F.rms_norm(x_strided, (40,), w, 1e-6), FP32_RTOL)
    rms_norm(x.half(), w.half(), 1e-6)
    y, s = rms_norm(x, w, 1e-6, residual=x_odd)
    assert_close(s, x + x_odd, 0.0, "residual sum")
    assert_close(y, F.rms_norm(x + x_odd, (40,), w, 1e-6), FP32_RTOL, "residual norm")
    layer_norm(x, w, None, 1e-5)
    assert len(kernels.norm._plans) == 6


def test_matmul_plan_reused_and_renewed():
    clear_plans()
    w = torch.randn(24, 40, device=DEVICE)
    b = torch.randn(24, device=DEVICE)
    x = torch.randn(7, 40, device=DEVICE)
    matmul(x, w, b)
    matmul(torch.randn(7, 40, device=DEVICE), w, b)
    assert len(kernels.matmul._plans) == 1
    x_odd = _misaligned((7, 40))
    assert_close(matmul(x_odd, w, b), F.linear(x_odd, w, b), FP32_RTOL, "misaligned x")
    assert len(kernels.matmul._plans) == 2
    # activation, residual, alpha (a runtime scalar: same plan), out, 3-d input
    assert_close(matmul(x, w, b, activation="relu"), F.relu(F.linear(x, w, b)), FP32_RTOL)
    r = torch.randn(7, 24, device=DEVICE)
    assert_close(matmul(x, w, b, residual=r, alpha=0.5), r + 0.5 * F.linear(x, w, b), FP32_RTOL)
    assert_close(matmul(x, w, b, residual=r, alpha=2.0), r + 2.0 * F.linear(x, w, b), FP32_RTOL)
    assert len(kernels.matmul._plans) == 4
    out = torch.empty(7, 24, device=DEVICE)
    assert matmul(x, w, b, out=out) is out
    assert_close(out, F.linear(x, w, b), FP32_RTOL)
    x3 = torch.randn(2, 5, 40, device=DEVICE)
    assert_close(matmul(x3, w), F.linear(x3, w), FP32_RTOL, "3-d x")
    assert len(kernels.matmul._plans) == 6


def test_checks_run_for_every_new_signature():
    """A signature that fails its checks gets no plan, and raises again on the next call."""
    clear_plans()
    x = torch.randn(5, 40, device=DEVICE)
    for _ in range(2):
        with pytest.raises(ValueError, match="weight"):
            rms_norm(x, torch.randn(41, device=DEVICE), 1e-6)
        with pytest.raises(ValueError, match="weight"):
            matmul(x, torch.randn(24, 41, device=DEVICE))
    assert len(kernels.norm._plans) == len(kernels.matmul._plans) == 0


def test_every_launcher_plans_once_per_signature():
    clear_plans()
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    int32 = dict(dtype=torch.int32, device=DEVICE)
    ids = torch.tensor([[1, 4, 0], [7, 2, 2]], device=DEVICE)
    table = randn(11, 20)
    q, k, v = randn(2, 3, 2, 8), randn(2, 5, 1, 8), randn(2, 5, 1, 8)
    qd = randn(2, 1, 2, 8)
    kv_end = torch.tensor([5, 4], **int32)
    buckets = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 7], **int32)
    bias_table = randn(8, 3)
    calls = [
        lambda: embedding(ids, table, scale=2.0),
        lambda: attention(q, k, v, causal=True, scale=0.3, kv_end=kv_end),
        lambda: decode_attention(qd, k, v, scale=0.3, kv_end=kv_end),
        lambda: relative_position_bias(bias_table, buckets, 3, 5),
    ]
    for call in calls:
        first = call()
        sizes = [len(cache) for cache in launch._plan_caches]
        again = call()
        assert [len(cache) for cache in launch._plan_caches] == sizes
        assert torch.equal(first, again)

    # rope_cache_write writes in place: the same signature twice, on fresh copies
    qkv = randn(2, 3, 4 * 8)
    cache = randn(2, 1, 6, 8)
    lengths = torch.tensor([0, 2], **int32)
    positions = torch.arange(3, device=DEVICE).expand(2, 3)
    inv_freq = 1.0 / 10000 ** (torch.arange(4, device=DEVICE) / 4)
    results = []
    for _ in range(2):
        qkv_i, k_i, v_i = qkv.clone(), cache.clone(), cache.clone()
        rope_cache_write(
            qkv_i, k_i, v_i, lengths, num_q_heads=2, num_kv_heads=1, head_dim=8,
            positions=positions, inv_freq=inv_freq,
        )  # fmt: skip
        results.append((qkv_i, k_i, v_i))
        if len(results) == 1:
            sizes = [len(cache) for cache in launch._plan_caches]
    assert [len(cache) for cache in launch._plan_caches] == sizes
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_pdl_switch_drops_the_plans(monkeypatch):
    clear_plans()
    x = torch.randn(3, 16, device=DEVICE)
    rms_norm(x, torch.ones(16, device=DEVICE), 1e-6)
    assert len(kernels.norm._plans) == 1
    monkeypatch.setattr(kernels.utils, "PDL", not kernels.utils.PDL)
    assert kernels.norm._plans.get("anything") is None
    assert len(kernels.norm._plans) == 0


def test_plan_cache_is_bounded():
    cache = PlanCache(max_plans=3)
    for i in range(3):
        cache.put(i, str(i))
    cache.put(3, "3")  # full: starts over
    assert dict(cache) == {3: "3"}


# The direct path with stand-ins for Triton's objects: what it hands the compiled kernel's launcher.
def _kernel_source(a_ptr, b_ptr, n, scale, BLOCK, FLAG=False, OTHER=7):
    pass


class _FakeCompiled:
    packed_metadata = ("packed",)
    function = 42

    def __init__(self) -> None:
        self.launches = []

    def run(self, *args):
        self.launches.append(args)


class _FakeJIT:
    signature = inspect.signature(_kernel_source)

    def __init__(self, compiled) -> None:
        self.compiled = compiled
        self.triton_launches = []

    def __getitem__(self, grid):
        def launch_through_triton(*args, **meta):
            self.triton_launches.append((grid, args, meta))
            return self.compiled

        return launch_through_triton


@pytest.fixture
def direct_path(monkeypatch):
    monkeypatch.setattr(launch, "DIRECT", True)
    monkeypatch.setattr(launch, "_raw_stream", lambda device: 1000 + device)
    monkeypatch.setattr(launch, "_hooks_installed", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return monkeypatch


def test_direct_launch_hands_every_parameter_in_order(direct_path):
    kernel = _FakeJIT(_FakeCompiled())
    meta = {"BLOCK": 64, "FLAG": True, "num_warps": 4}
    kernel_launch = KernelLaunch(kernel, (3, 2), meta)
    kernel_launch("a", "b", 10, 0.5)  # first call: through Triton, which compiles
    assert kernel.triton_launches == [((3, 2), ("a", "b", 10, 0.5), meta)]
    assert kernel.compiled.launches == []
    kernel_launch("c", "d", 10, 0.25)
    assert len(kernel.triton_launches) == 1
    # grid padded to 3 dims, the stream of the device, then the runtime arguments, the
    # constexprs from meta and the defaults (what JITFunction.run hands the launcher)
    assert kernel.compiled.launches == [
        (3, 2, 1, 1000, 42, ("packed",), None, None, None, "c", "d", 10, 0.25, 64, True, 7)
    ]


def test_direct_launch_steps_aside(direct_path):
    # launch hooks (profilers) installed: every call through Triton, which calls them
    kernel = _FakeJIT(_FakeCompiled())
    kernel_launch = KernelLaunch(kernel, (1,), {"BLOCK": 16})
    kernel_launch("a", "b", 1, 1.0)
    direct_path.setattr(launch, "_hooks_installed", lambda: True)
    kernel_launch("a", "b", 1, 1.0)
    assert len(kernel.triton_launches) == 2 and kernel.compiled.launches == []
    # a constexpr with no value and no default: no direct path
    kernel = _FakeJIT(_FakeCompiled())
    kernel_launch = KernelLaunch(kernel, (1,), {})
    kernel_launch("a", "b", 1, 1.0)
    assert kernel_launch.direct is None
    # a Triton whose compiled kernels lack the launcher's metadata: no direct path
    kernel = _FakeJIT(object())
    kernel_launch = KernelLaunch(kernel, (1,), {"BLOCK": 16})
    kernel_launch("a", "b", 1, 1.0)
    kernel_launch("a", "b", 1, 1.0)
    assert kernel_launch.direct is None and len(kernel.triton_launches) == 2


def test_launch_hooks_are_seen():
    knobs = pytest.importorskip("triton.knobs")
    assert not launch._hooks_installed()
    chain = knobs.runtime.launch_enter_hook
    if not hasattr(chain, "add"):
        pytest.skip("this Triton's launch hooks are plain functions")
    hook = lambda metadata: None  # noqa: E731
    chain.add(hook)
    try:
        assert launch._hooks_installed()
    finally:
        chain.remove(hook)
    assert not launch._hooks_installed()


def test_no_direct_path_under_the_interpreter():
    assert not (kernels.utils.INTERPRET and launch.DIRECT)


# GPU: the direct path's outputs equal Triton's own launch bitwise, on views with odd strides
# and unaligned storage offsets.
def _gpu_cases(dtype):
    g = torch.Generator(device=DEVICE).manual_seed(7)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, device=DEVICE).to(dt)

    def misaligned(*shape):
        return randn(torch.Size(shape).numel() + 1)[1:].view(shape)

    int32 = dict(dtype=torch.int32, device=DEVICE)
    # inputs made once: every call of a case sees the same data
    w, b, w_gate, w_long = randn(40, 72), randn(40), randn(80, 72), randn(64, 4096)
    x_odd, res_strided = misaligned(3, 72), randn(3, 48)[:, :40]
    x3, x_long = randn(2, 3, 72), randn(4, 4096)
    x_large, res_large, x_large_odd = randn(300, 72), randn(300, 40), misaligned(300, 72)
    h_odd, h_res, w_norm = misaligned(3, 5, 72), randn(15, 72).view(3, 5, 72), randn(72)
    h_strided, b_norm = randn(7, 80)[:, :72], randn(72)
    ids = torch.tensor([[1, 4, 0], [7, 2, 2]], device=DEVICE)
    pos = torch.tensor([[0, 1, 2], [2, 1, 0]], device=DEVICE)
    table, pos_table = randn(11, 72), randn(3, 72)
    bias_table = randn(8, 3)
    buckets = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 7], **int32)
    query_offset = torch.tensor([0, 1], **int32)
    qkv = randn(2, 5, 3 * 2 * 16 + 8)[:, :, : 3 * 2 * 16]  # row stride past the last dim
    q, k, v = qkv.view(2, 5, 3, 2, 16).unbind(2)
    kv_start, kv_end = torch.tensor([1, 0], **int32), torch.tensor([5, 3], **int32)
    attn_bias, decode_bias = randn(1, 2, 5, 5), randn(2, 1, 1, 5)
    rope_buffer, cache = randn(2, 5, 104), randn(2, 2, 9, 16)
    cache_lengths = torch.tensor([0, 4], **int32)
    positions = torch.arange(5, device=DEVICE).expand(2, 5)
    inv_freq = 1.0 / 10000 ** (torch.arange(8, device=DEVICE) / 8)

    def rope():
        qkv_i = rope_buffer.clone()[:, :, : 5 * 16]  # (B, T, (1 + 2 * 2) * 16), row stride 104
        k_i, v_i = cache.clone(), cache.clone()
        q_i = rope_cache_write(
            qkv_i, k_i, v_i, cache_lengths, num_q_heads=1, num_kv_heads=2, head_dim=16,
            positions=positions, inv_freq=inv_freq,
        )  # fmt: skip
        return q_i, qkv_i, k_i, v_i

    return {
        "matmul": lambda: matmul(x_odd, w, b, residual=res_strided),
        "matmul_gate": lambda: matmul(x3, w_gate, activation="silu_mul"),
        "matmul_split_k": lambda: matmul(x_long, w_long, activation="gelu"),
        "matmul_large_m": lambda: matmul(x_large, w, b, residual=res_large),
        "matmul_large_m_misaligned": lambda: matmul(x_large_odd, w, b),
        "rms_norm": lambda: rms_norm(h_odd, w_norm, 1e-6, residual=h_res),
        "layer_norm": lambda: layer_norm(h_strided, w_norm, b_norm, 1e-5),
        "embedding": lambda: embedding(
            ids, table, scale=0.5, positions=pos, position_weight=pos_table
        ),
        "relative_position_bias": lambda: relative_position_bias(
            bias_table, buckets, 3, 5, query_offset
        ),
        "attention": lambda: attention(
            q, k, v, causal=True, scale=0.25, kv_end=kv_end, bias=attn_bias
        ),
        "decode_attention": lambda: decode_attention(
            q[:, :1],
            k,
            v,
            scale=0.25,
            kv_start=kv_start,
            kv_end=kv_end,
            bias=decode_bias,
            num_splits=2,
        ),  # fmt: skip
        "rope_cache_write": rope,
    }


def _kernel_launches() -> list[KernelLaunch]:
    found = []

    def walk(obj):
        if isinstance(obj, KernelLaunch):
            found.append(obj)
        elif isinstance(obj, tuple):
            for item in obj:
                walk(item)
        elif type(obj).__name__ == "_Plan":
            for name in type(obj).__slots__:
                walk(getattr(obj, name, None))

    for cache in launch._plan_caches:
        for plan in cache.values():
            walk(plan)
    return found


def _as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.skipif(not ON_GPU, reason="the direct path needs a GPU")
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("name", list(_gpu_cases(torch.float32) if ON_GPU else ["all"]))
def test_direct_launch_equals_triton_launch(monkeypatch, name, dtype):
    call = _gpu_cases(dtype)[name]
    monkeypatch.setattr(launch, "DIRECT", False)
    clear_plans()
    expected = _as_tuple(call())
    call()  # a plan's later calls, still through Triton
    expected_again = _as_tuple(call())
    monkeypatch.setattr(launch, "DIRECT", True)
    clear_plans()
    for _ in range(3):  # plan, first launch through Triton, then direct
        actual = _as_tuple(call())
    assert any(kernel_launch.direct is not None for kernel_launch in _kernel_launches())
    torch.cuda.synchronize()
    for a, e, e2 in zip(actual, expected, expected_again, strict=True):
        assert torch.equal(e, e2), f"{name}: Triton's launches differ between calls"
        assert torch.equal(a, e), f"{name}: direct launch != Triton launch"


def test_kernel_options_parse_and_errors():
    """ZOO_KERNELS: bare names mean 1, unnamed options keep their first choice, and a wrong name
    or value is refused naming it."""
    from kernels.utils import parse_kernel_options

    options = parse_kernel_options("matmul_decode_table, epilogue_subtile=4")
    assert options["matmul_decode_table"] == 1 and options["epilogue_subtile"] == 4
    assert options["tma_store"] == 1 and options["decode_split_table"] == 0
    assert parse_kernel_options("")["epilogue_subtile"] == 1
    assert parse_kernel_options("matmul_decode_table=0")["matmul_decode_table"] == 0
    with pytest.raises(ValueError, match="unknown option 'subtile'"):
        parse_kernel_options("subtile=2")
    with pytest.raises(ValueError, match=r"epilogue_subtile='3', expected one of \(1, 2, 4\)"):
        parse_kernel_options("epilogue_subtile=3")
    with pytest.raises(ValueError, match="tma_store='yes'"):
        parse_kernel_options("tma_store=yes")


def test_plans_dropped_when_kernel_options_change(kernel_options):
    cache = PlanCache()
    cache.put("key", "plan")
    assert cache.get("key") == "plan"
    previous = kernel_options(tma_store=0)
    assert previous["tma_store"] == 1
    assert cache.get("key") is None
