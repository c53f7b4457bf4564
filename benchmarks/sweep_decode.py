"""Decode kernels' launch choices swept one by one at Llama-3-8B's shapes (bf16, random data), and
where one CUDA-graph decode step's time goes. Each sweep prints one line per case; the logs are
kept in benchmarks/results/<gpu>_*_sweep.log and cited where the choices are made.

- attention: decode attention's (BLOCK_N, warps, stages) x split count at batch 1..128, over 32
  layers' caches at context 544 of 576 slots (kernels/decode.py, _launch_config).
- matvec: the matrix-vector kernel's configs x K splits at batch 1, bf16 weights beside the
  tl.dot kernel's time (or FP8 weights, --quantize fp8), over 4 layers' weights so they stream
  from HBM (kernels/matmul.py, _MATVEC_16BIT_CONFIGS and _MATVEC_CONFIGS).
- epilogue: the split-K epilogue's grid, _SPLITK_EPILOGUE_PROGRAMS_PER_SM 0 (256-column blocks),
  1, 2 and 4, at the projections that split K (bf16 batch 1..128, FP8 batch 1).
- timeline: a decode step replayed from its CUDA graph inside `generate`, traced by
  torch.profiler: each kernel's exclusive share of the step's wall time (its overlap with the
  kernel before it, programmatic dependent launch, taken off), totals by kernel, one layer.

    PYTHONPATH=. python benchmarks/sweep_decode.py attention|matvec|epilogue|timeline [--quantize fp8]
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).parent))
from bench_options import (  # noqa: E402
    CACHE_SLOTS,
    CONTEXT,
    HEAD_DIM,
    KV_HEADS,
    LAYER_PROJECTIONS,
    LAYERS,
    NUM_LAYERS,
    Q_HEADS,
    attention_step,
)
from common import measure_copy_bandwidth  # noqa: E402

import kernels.decode as decode_module  # noqa: E402
import kernels.matmul as matmul_module  # noqa: E402
import kernels.utils  # noqa: E402
from convert.fp8 import quantize_rows  # noqa: E402
from kernels.launch import clear_plans  # noqa: E402

ATTENTION_CONFIGS = [(64, 4, 3), (64, 4, 2), (32, 4, 3), (32, 4, 4), (32, 2, 3), (64, 8, 3),
                     (128, 8, 2), (128, 4, 2), (16, 4, 4), (64, 2, 3)]  # fmt: skip
# (rows per program, bytes of each row per step, warps, stages)
MATVEC_CONFIGS = [(8, 512, 4, 1), (8, 1024, 4, 1), (16, 512, 4, 1), (16, 1024, 4, 1),
                  (16, 1024, 8, 1), (32, 512, 4, 1), (32, 1024, 8, 1), (16, 2048, 8, 1),
                  (8, 1024, 4, 3), (16, 512, 4, 3), (8, 2048, 4, 1), (4, 2048, 4, 1),
                  (4, 4096, 4, 1), (8, 4096, 8, 1), (8, 512, 2, 1), (4, 1024, 2, 1),
                  (4, 512, 1, 1), (2, 2048, 2, 1), (8, 256, 2, 2), (16, 256, 4, 2),
                  (4, 1024, 4, 2), (8, 512, 4, 2), (2, 1024, 1, 1), (1, 4096, 4, 1),
                  (2, 4096, 4, 1), (16, 128, 4, 4)]  # fmt: skip


def graph_us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median")


def layer_weights(n_w: int, k: int, fp8: bool) -> list:
    """LAYERS random (weight, row scales) of one projection: FP8 with its scales, or bf16."""
    if fp8:
        return [quantize_rows(torch.randn(n_w, k, device="cuda") / k**0.5) for _ in range(LAYERS)]
    return [
        (torch.randn(n_w, k, device="cuda", dtype=torch.bfloat16) / k**0.5, None)
        for _ in range(LAYERS)
    ]


def projections(x, weights, activation, residual) -> None:
    for weight, scale in weights:
        matmul_module.matmul(
            x, weight, activation=activation, residual=residual, weight_scale=scale
        )


def sweep_attention(bandwidth: float) -> None:
    launch_config = decode_module._launch_config
    for batch in (1, 8, 32, 64, 128):
        q = torch.randn(batch, 1, Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        caches = [
            torch.randn(2, batch, KV_HEADS, CACHE_SLOTS, HEAD_DIM, device="cuda", dtype=q.dtype)
            for _ in range(NUM_LAYERS)
        ]
        kv_end = torch.full((batch,), CONTEXT, dtype=torch.int32, device="cuda")
        out = torch.empty_like(q)
        floor_us = 1e6 * NUM_LAYERS * 2 * batch * KV_HEADS * CONTEXT * HEAD_DIM * 2 / bandwidth

        cells, best = [], (float("inf"), None)
        for config in ATTENTION_CONFIGS:
            decode_module._launch_config = lambda block_d, elem_size, config=config: config
            for splits in (1, 2, 3, 4, 6, 8, 12, 16):
                if (batch >= 64 and splits > 4) or (batch == 1 and splits < 4):
                    continue
                clear_plans()
                us = graph_us(functools.partial(attention_step, q, caches, kv_end, out, splits))
                cells.append(f"{config} s{splits}: {us:.0f} ({100 * floor_us / us:.0f}%)")
                best = min(best, (us, (config, splits)))
        decode_module._launch_config = launch_config
        clear_plans()
        print(
            f"batch {batch} floor {floor_us:.0f}us best {best[0]:.0f}us {best[1]} "
            f"({100 * floor_us / best[0]:.0f}%)",
            flush=True,
        )
        print("   " + "; ".join(cells), flush=True)
        del caches
        torch.cuda.empty_cache()


def sweep_matvec(bandwidth: float, quantize: str | None) -> None:
    """FP8 weights (--quantize fp8), else bf16 weights: each config x split of the
    matrix-vector kernel, and for bf16 the tl.dot kernel beside (kernel option matvec=0)."""
    fp8 = quantize == "fp8"
    tuner = matmul_module._matvec_fp8_kernel_tuned if fp8 else matmul_module._matvec_kernel_tuned
    split_rule, configs = matmul_module._matvec_split_k, tuner.configs
    options = dict(kernels.utils.KERNEL_OPTIONS)
    elem_bytes = 1 if fp8 else 2
    x = torch.randn(1, 14336, device="cuda", dtype=torch.bfloat16)
    for name, n_w, k, activation, has_residual in LAYER_PROJECTIONS:
        weights = layer_weights(n_w, k, fp8)
        n = n_w // 2 if activation else n_w
        residual = torch.randn(1, n, device="cuda", dtype=x.dtype) if has_residual else None
        floor_us = 1e6 * n_w * k * elem_bytes / bandwidth
        step = functools.partial(projections, x[:, :k], weights, activation, residual)
        cells, best = [], (float("inf"), None)
        if not fp8:  # the tl.dot kernel, tuned over its own configs
            kernels.utils.set_kernel_options(**{**options, "matvec": 0})
            matmul_module._tuned_configs.clear()
            clear_plans()
            us = graph_us(step) / LAYERS
            cells.append(f"tl.dot: {us:.1f} {100 * floor_us / us:.0f}%")
            kernels.utils.set_kernel_options(**{**options, "matvec": 1})
        for split in (1, 2, 4):
            matmul_module._matvec_split_k = lambda n_rows, k, split=split: split
            for block_n, row_bytes, warps, stages in MATVEC_CONFIGS:
                block_k = row_bytes // elem_bytes
                meta = {"BLOCK_N": block_n, "BLOCK_K": block_k}
                config = triton.Config(meta, num_warps=warps, num_stages=stages)
                per_thread = matmul_module._matvec_bytes_per_thread(
                    config, bool(activation), elem_bytes
                )
                if per_thread > matmul_module._MATVEC_MAX_BYTES_PER_THREAD or k < split * block_k:
                    continue  # pruned by the autotuner, or a slice shorter than one step
                tuner.configs = [config]
                tuner.cache.clear()
                matmul_module._tuned_configs.clear()
                clear_plans()
                us = graph_us(step) / LAYERS
                label = f"s{split} {block_n}x{block_k} w{warps} st{stages}"
                cells.append(f"{label}: {us:.1f} {100 * floor_us / us:.0f}%")
                best = min(best, (us, label))
        print(
            f"{quantize or 'bf16'} {name}: floor {floor_us:.1f}us best {best[0]:.1f}us {best[1]} "
            f"({100 * floor_us / best[0]:.0f}%), default split {split_rule(n_w, k)}",
            flush=True,
        )
        print("   " + "; ".join(cells), flush=True)
    tuner.configs, matmul_module._matvec_split_k = configs, split_rule
    kernels.utils.set_kernel_options(**options)
    tuner.cache.clear()
    matmul_module._tuned_configs.clear()
    clear_plans()


def sweep_epilogue(bandwidth: float) -> None:
    programs_per_sm = matmul_module._SPLITK_EPILOGUE_PROGRAMS_PER_SM
    for fp8, batches in ((False, (1, 8, 32, 64, 128)), (True, (1,))):
        for batch in batches:
            for name, n_w, k, _, has_residual in LAYER_PROJECTIONS:
                if name == "gate-up":
                    continue  # not split at these sizes
                weights = layer_weights(n_w, k, fp8)
                x = torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
                residual = torch.randn(batch, n_w, device="cuda", dtype=x.dtype)
                residual = residual if has_residual else None
                floor_us = 1e6 * n_w * k * (1 if fp8 else 2) / bandwidth
                cells = []
                for per_sm in (0, 1, 2, 4):
                    matmul_module._SPLITK_EPILOGUE_PROGRAMS_PER_SM = per_sm
                    clear_plans()
                    step = functools.partial(projections, x, weights, None, residual)
                    us = graph_us(step) / LAYERS
                    cells.append(f"{per_sm}/SM {us:.2f}")
                print(
                    f"{'fp8' if fp8 else 'bf16'} M={batch} {name} floor {floor_us:.1f}us: "
                    + "; ".join(cells),
                    flush=True,
                )
    matmul_module._SPLITK_EPILOGUE_PROGRAMS_PER_SM = programs_per_sm
    clear_plans()


def step_kernels(model, batch: int, prompt: int) -> list:
    """The GPU kernels of one decode step replayed from its graph, in start order."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device="cuda")

    def generate():
        model.generate(ids, max_new_tokens=6, eos_token_id=[], cuda_graph=True)
        torch.cuda.synchronize()

    generate()  # compile, tune and capture outside the trace
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        generate()
    events = sorted(
        (e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
        key=lambda e: e.time_range.start,
    )
    steps = [i for i, e in enumerate(events) if "embedding" in e.name]
    return events[steps[-3] : steps[-2]]  # a full step: from one token's embedding to the next


def print_timeline(label: str, events: list) -> None:
    start = events[0].time_range.start
    busy_until, idle = start, 0.0
    totals = collections.defaultdict(lambda: [0, 0.0, 0.0])  # calls, exclusive, durations
    rows = []
    for e in events:
        begin, end = e.time_range.start, e.time_range.end
        exclusive = max(0.0, end - max(begin, busy_until))
        idle += max(0.0, begin - busy_until)
        busy_until = max(busy_until, end)
        name = e.name.split("(")[0][:40]
        total = totals[name]
        total[0], total[1], total[2] = total[0] + 1, total[1] + exclusive, total[2] + end - begin
        rows.append((name, begin - start, end - begin, exclusive))
    wall = events[-1].time_range.end - start
    print(
        f"\n== {label}: step {wall / 1e3:.3f} ms, idle {idle / 1e3:.3f} ms, {len(events)} kernels"
    )
    print("| kernel | calls | exclusive ms | sum of durations ms |\n| --- | --- | --- | --- |")
    for name, (calls, exclusive, durations) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        print(f"| {name} | {calls} | {exclusive / 1e3:.3f} | {durations / 1e3:.3f} |")
    norms = [i for i, row in enumerate(rows) if "norm" in row[0]]
    if len(norms) > 12:  # one layer in the middle: name, start, duration, exclusive (us)
        print("one layer (us): kernel, start, duration, exclusive")
        for name, begin, duration, exclusive in rows[norms[10] : norms[12]]:
            print(f"  {name:40s} {begin:9.1f} {duration:7.2f} {exclusive:7.2f}")


def timeline(quantize: str | None, batches: list[int]) -> None:
    import zoo

    model = zoo.load(
        "llama3-8b", pretrained=False, device="cuda", dtype=torch.bfloat16, quantize=quantize
    )
    with torch.inference_mode():
        for batch in batches:
            label = f"{quantize or 'bf16'} batch {batch} prompt 512"
            print_timeline(label, step_kernels(model, batch, 512))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["attention", "matvec", "epilogue", "timeline"])
    parser.add_argument(
        "--quantize", choices=["fp8"], default=None, help="timeline, matvec: FP8 weights"
    )
    parser.add_argument("--batches", default="1,32,128", help="timeline: batch sizes")
    args = parser.parse_args()
    started = time.time()
    if args.what == "timeline":
        timeline(args.quantize, [int(b) for b in args.batches.split(",")])
    else:
        bandwidth = measure_copy_bandwidth()
        print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
        if args.what == "matvec":
            sweep_matvec(bandwidth, args.quantize)
        else:
            {"attention": sweep_attention, "epilogue": sweep_epilogue}[args.what](bandwidth)
    print(f"took {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
