"""Which GPU kernels run: one prefill and one decode step traced with torch.profiler.

Lists every GPU kernel with its count and time, and fails when a matmul or attention kernel is not
one of ours (cuBLAS, CUTLASS, cuDNN, flash or SDPA kernels): the models' matmuls and attention
must all be the Triton kernels of `kernels/`. Random weights at the real architecture.

    PYTHONPATH=. python benchmarks/profile_kernels.py --model llama3-8b [--quantize fp8]
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
import sys

import torch
import triton
from torch.profiler import ProfilerActivity, profile

import kernels
import zoo

# kernel-name fragments of library matmul and attention kernels
FOREIGN = re.compile(r"gemm|gemv|cublas|cutlass|xmma|cudnn|flash|fmha|sdpa|scaled_dot", re.I)


def our_kernel_names() -> set[str]:
    names = set()
    for module_info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"kernels.{module_info.name}")
        for name, value in vars(module).items():
            if isinstance(value, triton.runtime.KernelInterface):  # jit, autotuned, interpreted
                names.add(name)
    return names


def gpu_kernels(fn) -> dict[str, tuple[int, float]]:
    """name -> (calls, total ms) of the GPU kernels fn launches."""
    fn()  # compile and autotune outside the trace
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels_run: dict[str, tuple[int, float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            calls, ms = kernels_run.get(event.name, (0, 0.0))
            kernels_run[event.name] = (calls + 1, ms + event.device_time_total / 1e3)
    return kernels_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--quantize", choices=["fp8"], default=None, help="FP8 weights")
    args = parser.parse_args()

    model = zoo.load(
        args.model,
        pretrained=False,
        device="cuda",
        dtype=torch.bfloat16,
        quantize=args.quantize,
    )
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), device="cuda")
    ours = our_kernel_names()
    failures = []
    with torch.inference_mode():
        traces = {
            "prefill": lambda: model(ids, cuda_graph=False),
            "prefill + 1 decode step": lambda: model.generate(
                ids, max_new_tokens=2, eos_token_id=[], cuda_graph=False
            ),
        }
        for what, fn in traces.items():
            print(f"\n{args.model}, {what}: GPU kernels")
            print("| kernel | calls | ms | ours |")
            print("| --- | --- | --- | --- |")
            for name, (calls, ms) in sorted(gpu_kernels(fn).items(), key=lambda kv: -kv[1][1]):
                is_ours = any(name.startswith(n) for n in ours)
                print(f"| {name[:90]} | {calls} | {ms:.3f} | {'yes' if is_ours else ''} |")
                if FOREIGN.search(name) and not is_ours:
                    failures.append(f"{what}: {name}")
    if failures:
        print("\nmatmul/attention kernels that are not ours:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("\nevery matmul and attention kernel is one of ours")


if __name__ == "__main__":
    main()
