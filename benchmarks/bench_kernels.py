"""Kernel benchmark on the GPU: our matmul and attention against cuBLAS and SDPA at model shapes.

Each case runs in a CUDA graph (triton.testing.do_bench_cudagraph), so launch overhead does not
count: this measures the kernels alone. The matmul peer is torch.nn.functional.linear (cuBLAS,
bias fused, no activation or residual), ours runs the model's full epilogue; attention's peer is
scaled_dot_product_attention (flash) in its native [B, H, T, D] layout, ours reads the
[B, T, H, D] views the models pass. `--paths` also times our matmul with the TMA kernel turned
off, and `--configs` prints the autotuner's time per tile config. Each table has a roofline
line: the floor of each case (its bytes over the measured copy bandwidth or its FLOPs over the
measured bf16 matmul rate, the larger) and ours' and the peer's % of it.

    PYTHONPATH=. python benchmarks/bench_kernels.py [--paths] [--configs] [--fp8-decode [M ...]]
        [--tma-split]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).parent))
from common import Roofline, write_result  # noqa: E402

import kernels.attention as attention_module  # noqa: E402
import kernels.matmul as matmul_module  # noqa: E402

# (label, M, weight rows, K, activation, bias, residual): the projections of one layer
MATMULS = [
    *[
        case
        for tokens, shape in ((1024, "8x128"), (4096, "32x128"), (16384, "32x512"))
        for case in (
            (f"bert {shape} qkv", tokens, 2304, 768, None, True, False),
            (f"bert {shape} out", tokens, 768, 768, None, True, True),
            (f"bert {shape} up", tokens, 3072, 768, "gelu", True, False),
            (f"bert {shape} down", tokens, 768, 3072, None, True, True),
        )
    ],
    ("llama3-8b 1x2048 qkv", 2048, 6144, 4096, None, False, False),
    ("llama3-8b 1x2048 o", 2048, 4096, 4096, None, False, True),
    ("llama3-8b 1x2048 gate-up", 2048, 28672, 4096, "silu_mul", False, False),
    ("llama3-8b 1x2048 down", 2048, 4096, 14336, None, False, True),
]
# Llama-3-8B's projections at decode batch 1 (label, weight rows, K, activation, residual), for
# --fp8-decode: bf16 weights beside FP8 ones through the matrix-vector kernel and the tl.dot one
DECODE_MATMULS = [
    ("llama3-8b 1x1 qkv", 6144, 4096, None, False),
    ("llama3-8b 1x1 o", 4096, 4096, None, True),
    ("llama3-8b 1x1 gate-up", 28672, 4096, "silu_mul", False),
    ("llama3-8b 1x1 down", 4096, 14336, None, True),
]
# --tma-split: projections whose 128 x 128 tiles fill the SMs' last round only in part (label, M,
# N, K; bias and residual), tuned with and without the persistent kernel's K-split configs
TMA_SPLIT_MATMULS = [
    ("bert 1x512 down", 512, 768, 3072),
    ("bert 8x128 down / gpt2 1x1024 c_proj", 1024, 768, 3072),
    ("bert 32x128 down", 4096, 768, 3072),
]
# (label, batch, seq, heads, head dim, causal)
ATTENTIONS = [
    ("bert 8x128", 8, 128, 12, 64, False),
    ("bert 32x128", 32, 128, 12, 64, False),
    ("bert 8x512", 8, 512, 12, 64, False),
    ("bert 32x512", 32, 512, 12, 64, False),
    ("llama3-8b 1x2048", 1, 2048, 32, 128, True),
]


def bench(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def tuned_timings(tuner) -> str:
    timings = getattr(tuner, "configs_timings", None) or {}
    rows = sorted(timings.items(), key=lambda item: item[1][0] if item[1] else float("inf"))
    blocks = ("BLOCK_M", "BLOCK_N", "BLOCK_K")  # those a kernel's configs have
    return "; ".join(
        "x".join(str(c.kwargs[b]) for b in blocks if b in c.kwargs)
        + f" w{c.num_warps} s{c.num_stages}"
        + (f" {c.kwargs['PROGRAMS_PER_SM']}/SM" if c.kwargs.get("PROGRAMS_PER_SM", 1) > 1 else "")
        + (f" split {c.kwargs['SPLIT_K']}" if c.kwargs.get("SPLIT_K", 1) > 1 else "")
        + (f" tail {c.kwargs['BLOCK_N_TAIL']}" if c.kwargs.get("BLOCK_N_TAIL", 0) else "")
        + f": {t[0] * 1e3:.1f}us"
        for c, t in rows
    )


def matmul_case(case, roofline: Roofline, paths: bool, configs: bool) -> dict:
    label, m, n_w, k, activation, has_bias, has_residual = case
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(m, k, device=dev, dtype=dt)
    w = torch.randn(n_w, k, device=dev, dtype=dt) / k**0.5
    b = torch.randn(n_w, device=dev, dtype=dt) if has_bias else None
    n = n_w // 2 if activation in ("silu_mul", "gelu_tanh_mul") else n_w
    res = torch.randn(m, n, device=dev, dtype=dt) if has_residual else None
    flops = 2 * m * n_w * k
    row = {"case": label, "M": m, "N": n_w, "K": k}
    row["cublas_us"] = 1e3 * bench(lambda: F.linear(x, w, b))

    def ours():
        return matmul_module.matmul(x, w, b, activation=activation, residual=res)

    ours()
    if configs:
        print(f"  {label} TMA: {tuned_timings(matmul_module._matmul_tma_kernel_tuned)}")
    row["ours_us"] = 1e3 * bench(ours)
    if paths:
        saved = matmul_module._TMA_MIN_M_BUCKET
        matmul_module._TMA_MIN_M_BUCKET = 1 << 30
        try:
            ours()
            if configs:
                print(f"  {label} pointer: {tuned_timings(matmul_module._matmul_kernel_tuned)}")
            row["pointer_us"] = 1e3 * bench(ours)
        finally:
            matmul_module._TMA_MIN_M_BUCKET = saved
    row["ours_tflops"] = flops / (row["ours_us"] * 1e-6) / 1e12
    row["cublas_tflops"] = flops / (row["cublas_us"] * 1e-6) / 1e12
    # x, the weight and the output once (and the residual and bias where the epilogue reads them)
    elems = m * k + n_w * k + m * n * (2 if has_residual else 1) + (n_w if has_bias else 0)
    row.update(roofline.fields(row["ours_us"] * 1e-6, elems * x.element_size(), flops))
    row["cublas_roofline_pct"] = roofline.percent(row["cublas_us"] * 1e-6, elems * 2, flops)
    return row


def tma_split_case(case, configs: bool) -> dict:
    """One projection tuned over every TMA config, then over the unsplit ones only: both times,
    the configs picked, the relative error against fp32 and whether a second call repeats the
    bits (the split's partials are summed in a fixed order)."""
    label, m, n, k = case
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(m, k, device=dev, dtype=dt)
    w = torch.randn(n, k, device=dev, dtype=dt) / k**0.5
    b = torch.randn(n, device=dev, dtype=dt)
    res = torch.randn(m, n, device=dev, dtype=dt)
    expected = x.float() @ w.float().T + b.float() + res.float()
    row = {
        "case": label,
        "M": m,
        "N": n,
        "K": k,
        "cublas_us": 1e3 * bench(lambda: F.linear(x, w, b)),
    }
    tuner = matmul_module._matmul_tma_kernel_tuned
    every = list(tuner.configs)
    try:
        for name, kept in (
            ("split", every),
            ("unsplit", [c for c in every if c.kwargs["SPLIT_K"] == 1]),
        ):
            matmul_module._tuned_configs.clear()
            tuner.cache.clear()
            matmul_module._plans.clear()
            tuner.configs = kept
            y = matmul_module.matmul(x, w, b, residual=res)
            if configs and name == "split":
                print(f"  {label} TMA: {tuned_timings(tuner)}")
            again = matmul_module.matmul(x, w, b, residual=res)
            best = tuner.best_config.kwargs
            row[f"{name}_us"] = 1e3 * bench(lambda: matmul_module.matmul(x, w, b, residual=res))
            tail = f"+{best['BLOCK_N_TAIL']}" if best.get("BLOCK_N_TAIL", 0) else ""
            row[f"{name}_config"] = (
                f"{best['BLOCK_M']}x{best['BLOCK_N']}{tail} split {best['SPLIT_K']}"
            )
            row[f"{name}_rel_error"] = float(
                (y.float() - expected).abs().max() / expected.abs().max()
            )
            row[f"{name}_repeats"] = torch.equal(y, again)
    finally:
        tuner.configs = every
        matmul_module._tuned_configs.clear()
        tuner.cache.clear()
        matmul_module._plans.clear()
    return row


def fp8_decode_case(case, roofline: Roofline, configs: bool, m: int = 1) -> dict:
    """One decode projection at M rows: bf16 weights, then FP8 ones down each kernel path (M = 1:
    the matrix-vector kernel, unsplit too where it splits K, and the tl.dot kernel; M > 1: the
    weights converted for a tl.dot as its right and its left operand, and x quantized for the
    FP8 tensor cores)."""
    from convert.fp8 import quantize_rows
    from kernels.utils import set_kernel_options

    label, n_w, k, activation, has_residual = case
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(m, k, device=dev, dtype=dt)
    w = torch.randn(n_w, k, device=dev, dtype=dt) / k**0.5
    w8, scale = quantize_rows(w.float())
    n = n_w // 2 if activation == "silu_mul" else n_w
    res = torch.randn(m, n, device=dev, dtype=dt) if has_residual else None
    row = {"case": label.replace("1x1", f"{m}x1"), "M": m, "N": n_w, "K": k}
    row["bf16_us"] = 1e3 * bench(
        lambda: matmul_module.matmul(x, w, activation=activation, residual=res)
    )

    def ours():
        return matmul_module.matmul(x, w8, activation=activation, residual=res, weight_scale=scale)

    if m == 1:
        paths = {"matvec": {"fp8_matvec": 1}, "dot": {"fp8_matvec": 0}}
        if matmul_module._matvec_split_k(n_w, k) > 1:  # beside it, the same kernel unsplit
            paths["matvec_unsplit"] = {"fp8_matvec": 1, "fp8_matvec_split_k": 0}
    else:
        paths = {
            "weights": {"fp8_swap_ab": 0, "fp8_dot_min_m": 64},
            "weights_swap_ab": {"fp8_swap_ab": 1, "fp8_dot_min_m": 64},
            "x_quantized": {"fp8_dot_min_m": 16},
        }
    expected = None
    for name, options in paths.items():
        previous = set_kernel_options(**options)
        try:
            y = ours()
            expected = y if expected is None else expected
            if configs:
                tuner = (
                    matmul_module._matvec_fp8_kernel_tuned
                    if m == 1 and options["fp8_matvec"]
                    else matmul_module._matmul_kernel_tuned
                )
                print(f"  {row['case']} {name}: {tuned_timings(tuner)}")
            row[f"fp8_{name}_us"] = 1e3 * bench(ours)
            row[f"fp8_{name}_max_diff"] = (y.float() - expected.float()).abs().max().item()
        finally:
            set_kernel_options(**previous)
    row["paths"] = list(paths)
    elems = m * k + m * n * (2 if has_residual else 1)  # x, the output (and the residual), in bf16
    flops = 2 * m * n_w * k
    row["bf16_roofline_pct"] = roofline.percent(
        row["bf16_us"] * 1e-6, 2 * n_w * k + 2 * elems, flops
    )
    for name in paths:
        bytes_moved = n_w * k + 2 * elems + 4 * n_w  # FP8 weights and their row scales
        row[f"fp8_{name}_roofline_pct"] = roofline.percent(
            row[f"fp8_{name}_us"] * 1e-6, bytes_moved, flops
        )
    return row


def print_fp8_decode(rows: list[dict]) -> None:
    paths = rows[0]["paths"]
    print(
        f"\n| decode matmul, M = {rows[0]['M']} | N x K | bf16 us (% of roofline) | "
        + " | ".join(f"FP8 {name} us (%)" for name in paths)
        + " | bf16 / best FP8 time |"
    )
    print("| --- " * (4 + len(paths)) + "|")
    for r in rows:
        best = min(r[f"fp8_{name}_us"] for name in paths)
        cells = " | ".join(
            f"{r[f'fp8_{name}_us']:.1f} ({r[f'fp8_{name}_roofline_pct']:.0f}%)" for name in paths
        )
        print(
            f"| {r['case']} | {r['N']}x{r['K']} | {r['bf16_us']:.1f} ({r['bf16_roofline_pct']:.0f}%) "
            f"| {cells} | {r['bf16_us'] / best:.2f}x |"
        )
    print(
        "max |FP8 output - the first path's| per path:",
        [[r[f"fp8_{name}_max_diff"] for name in paths] for r in rows],
    )


def attention_case(case, roofline: Roofline, configs: bool) -> dict:
    label, batch, seq, heads, head_dim, causal = case
    dev, dt = "cuda", torch.bfloat16
    qkv = torch.randn(batch, seq, 3, heads, head_dim, device=dev, dtype=dt)
    q, k, v = qkv.unbind(2)  # [B, T, H, D] views of a fused QKV output, as the models pass
    scale = head_dim**-0.5
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    flops = 4 * batch * heads * seq * seq * head_dim // (2 if causal else 1)
    row = {"case": label}
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        row["sdpa_us"] = 1e3 * bench(
            lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale)
        )

    def ours():
        return attention_module.attention(q, k, v, causal=causal, scale=scale)

    ours()
    if configs:
        print(f"  {label}: {tuned_timings(attention_module._attn_fwd)}")
    row["ours_us"] = 1e3 * bench(ours)
    row["ours_tflops"] = flops / (row["ours_us"] * 1e-6) / 1e12
    row["sdpa_tflops"] = flops / (row["sdpa_us"] * 1e-6) / 1e12
    bytes_moved = 4 * batch * seq * heads * head_dim * q.element_size()  # q, k, v and out
    row.update(roofline.fields(row["ours_us"] * 1e-6, bytes_moved, flops))
    row["sdpa_roofline_pct"] = roofline.percent(row["sdpa_us"] * 1e-6, bytes_moved, flops)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", action="store_true", help="also time the pointer kernel")
    parser.add_argument("--configs", action="store_true", help="print autotune timings")
    parser.add_argument(
        "--fp8-decode",
        nargs="*",
        type=int,
        default=None,
        help="only Llama-3-8B's decode projections at these batch sizes (none given: 1), bf16 and "
        "FP8 weights down each kernel path",
    )
    parser.add_argument(
        "--tma-split",
        action="store_true",
        help="only the projections where the TMA kernel may split K: tuned with and without it",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    roofline = Roofline.measure()
    print(f"{device}: {roofline.header()}")
    if args.tma_split:
        rows = [tma_split_case(case, args.configs) for case in TMA_SPLIT_MATMULS]
        print(
            "\n| matmul (bf16, + bias + residual) | M x N x K | cuBLAS us | tuned with K splits us "
            "| its config | unsplit only us | its config | repeats bitwise |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(
                f"| {r['case']} | {r['M']}x{r['N']}x{r['K']} | {r['cublas_us']:.1f} | {r['split_us']:.1f} "
                f"| {r['split_config']} | {r['unsplit_us']:.1f} | {r['unsplit_config']} "
                f"| {r['split_repeats'] and r['unsplit_repeats']} |"
            )
        if args.out:
            write_result(args.out, device, **roofline.limits(), tma_split=rows)
        return
    if args.fp8_decode is not None:
        rows = []
        for m in args.fp8_decode or [1]:
            m_rows = [fp8_decode_case(case, roofline, args.configs, m) for case in DECODE_MATMULS]
            print_fp8_decode(m_rows)
            rows += m_rows
        if args.out:
            write_result(args.out, device, **roofline.limits(), fp8_decode=rows)
        return

    matmuls = [matmul_case(case, roofline, args.paths, args.configs) for case in MATMULS]
    print(
        "\n| matmul (bf16) | M x N x K | cuBLAS us | ours us | ours / cuBLAS speed |"
        + (" pointer kernel us |" if args.paths else "")
        + " ours TFLOP/s | floor us | ours % of roofline | cuBLAS % of roofline |"
    )
    print(
        "| --- | --- | --- | --- | --- |"
        + (" --- |" if args.paths else "")
        + " --- | --- | --- | --- |"
    )
    for r in matmuls:
        pointer = f" {r['pointer_us']:.1f} |" if args.paths else ""
        print(
            f"| {r['case']} | {r['M']}x{r['N']}x{r['K']} | {r['cublas_us']:.1f} "
            f"| {r['ours_us']:.1f} | {r['cublas_us'] / r['ours_us']:.2f}x |{pointer} "
            f"{r['ours_tflops']:.0f} | {1e3 * r['floor_ms']:.1f} | {r['roofline_pct']:.0f}% "
            f"| {r['cublas_roofline_pct']:.0f}% |"
        )

    attentions = [attention_case(case, roofline, args.configs) for case in ATTENTIONS]
    print(
        "\n| attention (bf16) | SDPA flash us | ours us | ours / SDPA speed | ours TFLOP/s "
        "| floor us | ours % of roofline | SDPA % of roofline |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in attentions:
        print(
            f"| {r['case']} | {r['sdpa_us']:.1f} | {r['ours_us']:.1f} "
            f"| {r['sdpa_us'] / r['ours_us']:.2f}x | {r['ours_tflops']:.0f} "
            f"| {1e3 * r['floor_ms']:.1f} | {r['roofline_pct']:.0f}% | {r['sdpa_roofline_pct']:.0f}% |"
        )
    if args.out:
        write_result(
            args.out,
            device,
            **roofline.limits(),
            matmul=matmuls,
            attention=attentions,
        )


if __name__ == "__main__":
    main()
