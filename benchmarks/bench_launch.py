"""Launch overhead on the GPU: microseconds per call of every kernel launcher at tiny sizes, where
the GPU work is negligible and the host's time per launch decides, next to torch's nearest op.

Each case is called N times back to back between two synchronizations (the per-call time is the
host's as long as it exceeds the kernel's); every case is warmed up before any is timed, and each
figure is the median of --rounds such timings (a busy host moves single timings by several
microseconds). Columns: ours with launch plans and the direct launch
of the compiled kernel (the default), ours with plans but Triton's own dispatch
(kernel[grid](...), what ZOO_FAST_LAUNCH=0 gives), a plan miss (the first call of a new signature:
checks, planning and a launch through Triton, kernels already compiled), and the torch peer.

    PYTHONPATH=. python benchmarks/bench_launch.py [--calls 2000] [--rounds 5] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import fmt, gpu_tag, write_result  # noqa: E402

import kernels.launch as launch  # noqa: E402
from kernels.attention import attention  # noqa: E402
from kernels.decode import decode_attention  # noqa: E402
from kernels.embedding import embedding  # noqa: E402
from kernels.matmul import matmul  # noqa: E402
from kernels.norm import layer_norm, rms_norm  # noqa: E402
from kernels.relative_bias import relative_position_bias  # noqa: E402
from kernels.rope import rope_cache_write  # noqa: E402


def cases(device: str, dtype: torch.dtype) -> list[tuple[str, object, object]]:
    """(label, our call, torch's nearest call or None), at tiny sizes."""
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, device=device).to(dt)

    int32 = dict(dtype=torch.int32, device=device)
    x, w, b, r = randn(4, 64), randn(64, 64), randn(64), randn(4, 64)
    w_gate = randn(128, 64)
    norm_w, norm_b = randn(64), randn(64)
    ids = torch.randint(0, 100, (1, 4), device=device)
    table = randn(100, 64)
    qkv = randn(1, 4, (2 + 2 * 2) * 32)
    k_cache, v_cache = randn(1, 2, 64, 32), randn(1, 2, 64, 32)
    lengths = torch.zeros(1, **int32)
    positions = torch.arange(4, device=device).view(1, 4)
    inv_freq = 1.0 / 10000 ** (torch.arange(16, device=device) / 16)
    q, k, v = randn(1, 4, 2, 32), randn(1, 4, 2, 32), randn(1, 4, 2, 32)
    q_t, k_t, v_t = (t.transpose(1, 2) for t in (q, k, v))  # SDPA's [B, H, T, D]
    kv_end = torch.full((1,), 4, **int32)
    q_dec, k_dec, v_dec = randn(1, 1, 2, 32), randn(1, 64, 2, 32), randn(1, 64, 2, 32)
    kv_end_dec = torch.full((1,), 64, **int32)
    qd_t, kd_t, vd_t = (t.transpose(1, 2) for t in (q_dec, k_dec, v_dec))
    bias_table = randn(32, 2)
    buckets = torch.randint(0, 32, (9,), device=device, dtype=torch.int32)
    return [
        ("matmul", lambda: matmul(x, w, b), lambda: F.linear(x, w, b)),
        (
            "matmul gelu + residual",
            lambda: matmul(x, w, b, activation="gelu", residual=r),
            lambda: r + F.gelu(F.linear(x, w, b)),
        ),
        ("matmul silu_mul (gate-up)", lambda: matmul(x, w_gate, activation="silu_mul"), None),
        ("rms_norm", lambda: rms_norm(x, norm_w, 1e-6), lambda: F.rms_norm(x, (64,), norm_w, 1e-6)),
        (
            "rms_norm + residual",
            lambda: rms_norm(x, norm_w, 1e-6, residual=r),
            lambda: F.rms_norm(x + r, (64,), norm_w, 1e-6),
        ),
        (
            "layer_norm",
            lambda: layer_norm(x, norm_w, norm_b, 1e-5),
            lambda: F.layer_norm(x, (64,), norm_w, norm_b, 1e-5),
        ),
        ("embedding", lambda: embedding(ids, table), lambda: F.embedding(ids, table)),
        (
            "rope_cache_write",
            lambda: rope_cache_write(
                qkv,
                k_cache,
                v_cache,
                lengths,
                num_q_heads=2,
                num_kv_heads=2,
                head_dim=32,
                positions=positions,
                inv_freq=inv_freq,
            ),
            None,
        ),  # fmt: skip
        (
            "attention (causal)",
            lambda: attention(q, k, v, causal=True, scale=0.18, kv_end=kv_end),
            lambda: F.scaled_dot_product_attention(q_t, k_t, v_t, is_causal=True, scale=0.18),
        ),
        (
            "decode_attention (split + combine)",
            lambda: decode_attention(q_dec, k_dec, v_dec, scale=0.18, kv_end=kv_end_dec),
            lambda: F.scaled_dot_product_attention(qd_t, kd_t, vd_t, scale=0.18),
        ),
        (
            "relative_position_bias",
            lambda: relative_position_bias(bias_table, buckets, 4, 4),
            None,
        ),
    ]


def us_per_call(fn, calls: int, rounds: int = 1) -> float:
    """Median over `rounds` of the host time per call of `calls` back-to-back calls."""
    times = []
    for _ in range(rounds):
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(times)[len(times) // 2]


def plan_miss_us(fn, repeats: int = 5) -> float:
    """Median time of a call right after the plans were dropped."""
    times = []
    for _ in range(repeats):
        launch.clear_plans()
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e6)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_launch.py needs a CUDA GPU")
    device = "cuda"
    dtype = getattr(torch, args.dtype)
    direct_available = launch.DIRECT
    rows = []
    header = f"{'launcher':36s} {'ours us':>8s} {'Triton us':>9s} {'miss us':>8s} {'torch us':>8s}"
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, {args.calls} calls per case\n{header}")
    all_cases = cases(device, dtype)
    for _, ours, peer in all_cases:  # compile, autotune and warm every path first
        ours()
        if peer is not None:
            peer()
    torch.cuda.synchronize()
    for label, ours, peer in all_cases:
        direct = us_per_call(ours, args.calls, args.rounds)
        miss = plan_miss_us(ours)
        launch.DIRECT = False
        launch.clear_plans()
        triton_dispatch = us_per_call(ours, args.calls, args.rounds)
        launch.DIRECT = direct_available
        launch.clear_plans()
        torch_us = us_per_call(peer, args.calls, args.rounds) if peer is not None else None
        rows.append(
            dict(
                launcher=label,
                ours_us=direct,
                triton_dispatch_us=triton_dispatch,
                plan_miss_us=miss,
                torch_us=torch_us,
            )
        )
        print(
            f"{label:36s} {fmt(direct, 1):>8s} {fmt(triton_dispatch, 1):>9s} {fmt(miss, 1):>8s} "
            f"{fmt(torch_us, 1):>8s}",
            flush=True,
        )
    out = args.out or str(Path(__file__).parent / "results" / f"{gpu_tag()}_launch.json")
    write_result(
        out,
        torch.cuda.get_device_name(),
        dtype=args.dtype,
        calls=args.calls,
        rounds=args.rounds,
        direct_launch_available=direct_available,
        launch=rows,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
