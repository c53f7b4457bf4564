"""FP8 x FP8 matmul error against float64 arithmetic on the same FP8 operands, at Llama-3-8B's
shapes and a few small ones, with each K slice's sum added in fp32 (the default) and with the
tensor cores' own accumulation over the whole K (the kernel option fp8_fast_accum=1).

y = x @ W.T + r with a random residual r. The operands are exact (x quantized per row by kernels/quantize.py, weights per row), so the
error is the accumulation's alone: relative in the max norm, fp32 outputs.

    PYTHONPATH=. python benchmarks/fp8_accumulation.py [--out fp8_accumulation.json]
"""

from __future__ import annotations

import argparse

import torch
from common import write_result

from convert.fp8 import dequantize_rows, quantize_rows
from kernels.matmul import matmul
from kernels.quantize import quantize_fp8
from kernels.utils import set_kernel_options

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # (the CPU: Triton's interpreter)
# (M, K, N): M above the FP8-dot threshold; Llama-3-8B's attention-out / down projections last
SHAPES = [(100, 96, 74), (300, 96, 74), (200, 4096, 74), (512, 4096, 4096), (512, 14336, 4096)]


def relative_error(x, weight, scale, residual) -> float:
    """y = x @ W.T + residual through our FP8 path against float64 on the same FP8 operands."""
    y = matmul(x, weight, None, residual=residual, weight_scale=scale)
    q, x_scale = quantize_fp8(x)
    expected = (q.double() * x_scale.double()[:, None]) @ dequantize_rows(weight, scale).double().T
    expected += residual.double()
    return ((y.double() - expected).abs().max() / expected.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    print("| M x K x N | fp32 sums per K slice | tensor cores' accumulation (fp8_fast_accum=1) |")
    print("| --- | --- | --- |")
    for m, k, n in SHAPES:
        x = torch.randn(m, k, device=DEVICE)
        weight, scale = quantize_rows(torch.randn(n, k, device=DEVICE) * 0.1)
        residual = torch.randn(m, n, device=DEVICE)
        errors = {}
        for fast in (0, 1):
            previous = set_kernel_options(fp8_fast_accum=fast)
            errors[fast] = relative_error(x, weight, scale, residual)
            set_kernel_options(**previous)
        rows.append({"m": m, "k": k, "n": n, "promoted": errors[0], "fast_accum": errors[1]})
        print(f"| {m} x {k} x {n} | {errors[0]:.2e} | {errors[1]:.2e} |")
    if args.out:
        device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (interpreter)"
        write_result(args.out, device, rows=rows)


if __name__ == "__main__":
    main()
