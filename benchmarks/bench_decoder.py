"""Decoder-only benchmark on the GPU: ours (eager and CUDA graph) vs HF transformers.

Random weights at the real architecture (`zoo.load(name, pretrained=False)`), bf16. Prints a table
and writes JSON: decode tokens/s, the fraction of the memory-bandwidth limit it reaches (bytes read
per step / measured copy bandwidth), and prefill time. HF peers (eager; static cache +
torch.compile) take minutes to compile: `--peers` measures them, and they are stored in
benchmarks/results/ to reuse.

    PYTHONPATH=. python benchmarks/bench_decoder.py --model llama3-8b [--peers] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import zoo


def measure_copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB, in bytes/s counting bytes read plus written."""
    import triton.testing

    src = torch.empty(2**30, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def measure_matmul_flops() -> float:
    import triton.testing

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=200, return_mode="median")
    return 2 * 8192**3 / (ms * 1e-3)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes_per_step(config, batch: int, context: int, dtype_bytes: int = 2) -> int:
    """K and V read by one decode step at this context length."""
    return (
        2
        * config.num_layers
        * batch
        * config.num_kv_heads
        * context
        * config.head_dim
        * dtype_bytes
    )


def time_generate(model, ids, new_tokens: int, cuda_graph: bool, repeats: int = 3) -> float:
    """Median seconds of model.generate(..., max_new_tokens=new_tokens) (after a warm-up call)."""
    model.generate(ids, max_new_tokens=new_tokens, eos_token_id=[], cuda_graph=cuda_graph)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, eos_token_id=[], cuda_graph=cuda_graph)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def time_prefill(model, ids) -> float:
    import triton.testing

    return 1e-3 * triton.testing.do_bench(
        lambda: model(ids), warmup=3, rep=20, return_mode="median"
    )


def bench_ours(name: str, batch: int, prompt: int, new_tokens: int, bandwidth: float) -> dict:
    model = zoo.load(name, pretrained=False, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device="cuda")
    prefill_s = time_prefill(model, ids[:, :prompt])
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=4, eos_token_id=[], cuda_graph=True)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - start
    result = {"model": name, "batch": batch, "prompt": prompt, "new_tokens": new_tokens}
    result["prefill_ms"] = prefill_s * 1e3
    result["warmup_and_capture_s"] = warmup_s
    for mode, graph in (("eager", False), ("graph", True)):
        total = time_generate(model, ids, new_tokens, graph)
        decode_s = max(total - prefill_s, 1e-9) / max(new_tokens - 1, 1)
        mean_context = prompt + new_tokens / 2
        step_bytes = weight_bytes(model) + kv_bytes_per_step(model.config, batch, mean_context)
        result[f"{mode}_tokens_per_s"] = batch / decode_s
        result[f"{mode}_ms_per_step"] = decode_s * 1e3
        result[f"{mode}_bandwidth_fraction"] = step_bytes / decode_s / bandwidth
    del model
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--shapes", default="1x128x128,2x512x256", help="batch x prompt x new, ...")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    bandwidth = measure_copy_bandwidth()
    flops = measure_matmul_flops()
    device = torch.cuda.get_device_name()
    print(f"{device}: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s")
    rows = []
    for shape in args.shapes.split(","):
        batch, prompt, new = (int(v) for v in shape.split("x"))
        row = bench_ours(args.model, batch, prompt, new, bandwidth)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        "\n| model | batch x prompt x new | prefill ms | eager tok/s | graph tok/s | graph ms/step | % of bandwidth limit |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['model']} | {r['batch']}x{r['prompt']}x{r['new_tokens']} | {r['prefill_ms']:.1f} "
            f"| {r['eager_tokens_per_s']:.1f} | {r['graph_tokens_per_s']:.1f} "
            f"| {r['graph_ms_per_step']:.2f} | {100 * r['graph_bandwidth_fraction']:.0f}% |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "device": device,
                    "date": time.strftime("%Y-%m-%d"),
                    "torch": torch.__version__,
                    "copy_bandwidth_Bps": bandwidth,
                    "bf16_matmul_flops": flops,
                    "rows": rows,
                    "argv": sys.argv[1:],
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
