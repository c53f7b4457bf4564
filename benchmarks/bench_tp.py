"""Tensor-parallel benchmark on the GPUs of one host: run under torchrun, one process per GPU.

    PYTHONPATH=. torchrun --nproc-per-node 2 benchmarks/bench_tp.py [--out out.json]

Random weights at the real architectures (`zoo.load(name, pretrained=False, tp=N)`: each rank
initialises only its share, on its GPU), bf16, greedy, CUDA-graph decode with the all-reduces
inside the graph. Measured, in this order:
  1. the small model (Llama-3-8B) at tp=1 on the first GPU alone (before the process group
     exists), then at tp=N: decode tokens/s at batch 1, prompt 128, 128 new, and their ratio;
  2. the large model (Llama-3-70B) at tp=N: the same decode, with its fraction of the
     bandwidth limit: the bytes one GPU must read per decode step (its share of the weights,
     without the embedding table of which a step reads one row per token, plus its KV heads at
     the mean context) over the copy bandwidth measured on that GPU (the slowest GPU's);
     prefill of 1 x 2048 tokens (a plain call, graphed); decode at batch 32;
  3. the batch-1 decodes again with every all-reduce through NCCL, when the default (zoo.load
     on CUDA) was the one-shot all-reduce over symmetric memory for the small ones.
Decode time per step is (generate(prompt, new) - generate(prompt, 1)) / (new - 1), each the median
of a few runs after a warm-up (as benchmarks/bench_decoder.py). Only the first rank prints and
writes the JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from bench_decoder import decode_timing, ours_generate  # noqa: E402
from common import measure_copy_bandwidth, median_seconds, write_result  # noqa: E402

import zoo  # noqa: E402
from zoo.parallel import destroy_group  # noqa: E402


def step_bytes_per_gpu(model, batch: int, context: float) -> float:
    """Bytes one GPU reads per decode step: its weights but the embedding table, and its KV
    cache at this context length (bf16)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.embed.weight
    weights -= embedding.numel() * embedding.element_size()
    if model.lm_head is None:  # a tied head: this rank's rows of the embedding are read whole
        rows = model.vocab_rows[1] - model.vocab_rows[0]
        weights += rows * embedding.shape[1] * embedding.element_size()
    c = model.config
    kv = 2 * c.num_layers * batch * model.num_kv_heads * context * c.head_dim * 2
    return weights + kv


def decode_row(model, batch: int, prompt: int, new: int, bandwidth: float | None) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=model.device)
    step_s, first_s = decode_timing(ours_generate(model, cuda_graph=True), ids, new)
    row = {
        "shape": f"{batch}x{prompt}x{new}",
        "ms_per_step": 1e3 * step_s,
        "tokens_per_s": batch / step_s,
        "prefill_and_first_token_ms": 1e3 * first_s,
    }
    if bandwidth is not None:
        row["bytes_per_gpu_per_step"] = step_bytes_per_gpu(model, batch, prompt + new / 2)
        row["bandwidth_fraction"] = row["bytes_per_gpu_per_step"] / step_s / bandwidth
    return row


def nccl_row(model, result: dict, key: str, args, bandwidth: float, say) -> None:
    """The batch-1 decode again with every all-reduce through NCCL (graphs captured afresh),
    when the model's default was the one-shot all-reduce over symmetric memory."""
    if args.default_only or not model.tp.symmetric_memory:
        return
    model.tp.disable_symmetric_memory()
    model.engine.reset()
    row = decode_row(model, 1, args.prompt, args.new, bandwidth)
    result[f"{key}_nccl"] = row
    say(json.dumps({f"{key}_nccl": row}), flush=True)
    model.tp.enable_symmetric_memory(torch.bfloat16)
    model.engine.reset()


def all_reduce_name(model) -> str:
    return "one-shot" if model.tp.symmetric_memory else "NCCL"


def load(name: str, tp: int | None):
    start = time.perf_counter()
    model = zoo.load(name, pretrained=False, dtype=torch.bfloat16, tp=tp)
    torch.cuda.synchronize()
    return model, time.perf_counter() - start


def free(model) -> None:
    model.engine.reset()
    del model
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", default="llama3-8b")
    parser.add_argument("--large", default="llama3-70b")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32, help="the large model's batched decode")
    parser.add_argument("--batch-new", type=int, default=64)
    parser.add_argument("--skip-tp1", action="store_true", help="no tp=1 run of the small model")
    parser.add_argument("--skip-small", action="store_true", help="no tp=N run of the small model")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument(
        "--default-only",
        action="store_true",
        help="no second batch-1 run with every all-reduce through NCCL",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    lead = rank == 0
    say = print if lead else lambda *a, **k: None
    bandwidth = measure_copy_bandwidth()
    result: dict = {"world": world, "small": args.small, "large": args.large}

    if lead and not args.skip_tp1:  # the other ranks wait in init_process_group meanwhile
        model, load_s = load(args.small, None)
        row = decode_row(model, 1, args.prompt, args.new, None)
        result["small_tp1"] = row | {"load_s": load_s}
        say(json.dumps({"small_tp1": result["small_tp1"]}), flush=True)
        free(model)
    dist.init_process_group("nccl")
    torch.manual_seed(0)  # the same prompts on every rank
    bandwidths = [None] * world
    dist.all_gather_object(bandwidths, bandwidth)
    bandwidth = min(bandwidths)
    result["copy_bandwidth_Bps"] = bandwidths
    say(f"copy bandwidth per GPU: {', '.join(f'{b / 1e12:.2f}' for b in bandwidths)} TB/s")

    if not args.skip_small:
        model, load_s = load(args.small, world)
        row = decode_row(model, 1, args.prompt, args.new, bandwidth)
        result["small_tp"] = row | {"load_s": load_s}
        say(json.dumps({"small_tp": result["small_tp"]}), flush=True)
        result["small_tp"]["all_reduce"] = all_reduce_name(model)
        nccl_row(model, result, "small_tp", args, bandwidth, say)
        free(model)

    if not args.skip_large:
        model, load_s = load(args.large, world)
        say(f"{args.large} tp={world}: random init in {load_s:.1f} s", flush=True)
        row = decode_row(model, 1, args.prompt, args.new, bandwidth)
        result["large_tp"] = row | {"load_s": load_s, "all_reduce": all_reduce_name(model)}
        say(json.dumps({"large_tp": result["large_tp"]}), flush=True)
        ids = torch.randint(0, model.config.vocab_size, (1, args.prefill), device=model.device)
        result["large_prefill_ms"] = 1e3 * median_seconds(lambda: model(ids), repeats=5)
        say(json.dumps({"large_prefill_ms": result["large_prefill_ms"]}), flush=True)
        row = decode_row(model, args.batch, args.prompt, args.batch_new, bandwidth)
        result["large_batch_tp"] = row | {"all_reduce": all_reduce_name(model)}
        say(json.dumps({"large_batch_tp": row}), flush=True)
        nccl_row(model, result, "large_tp", args, bandwidth, say)
        free(model)

    report(result, args, bandwidth, say)
    if lead and args.out:
        write_result(args.out, torch.cuda.get_device_name(), **result)
    destroy_group()  # not dist.destroy_process_group() alone: see zoo.parallel.destroy_group


def report(result: dict, args, bandwidth: float, say) -> None:
    world = result["world"]
    say(f"\n{torch.cuda.get_device_name()} x{world}, bf16, CUDA-graph decode")
    say("| model | tp | all-reduce | workload | ms per step | tokens/s | % of bandwidth limit |")
    say("| --- | --- | --- | --- | --- | --- | --- |")
    rows = [
        (args.small, 1, result.get("small_tp1")),
        (args.small, world, result.get("small_tp")),
        (args.small, world, result.get("small_tp_nccl")),
        (args.large, world, result.get("large_tp")),
        (args.large, world, result.get("large_tp_nccl")),
        (args.large, world, result.get("large_batch_tp")),
    ]
    for name, tp, row in rows:
        if row is None:
            continue
        reduce = row.get("all_reduce", "NCCL" if tp > 1 else "-")
        fraction = row.get("bandwidth_fraction")
        shown = f"{100 * fraction:.0f}%" if fraction is not None else "n/a"
        say(
            f"| {name} | {tp} | {reduce} | decode {row['shape']} | {row['ms_per_step']:.2f} "
            f"| {row['tokens_per_s']:.1f} | {shown} |"
        )
    baseline = result.get("small_tp1")
    for key in ("small_tp", "small_tp_nccl"):
        if baseline is not None and key in result:
            speedup = result[key]["tokens_per_s"] / baseline["tokens_per_s"]
            result[f"{key}_speedup"] = speedup
            say(f"{args.small} decode tp={world} ({key}) vs tp=1: {speedup:.2f}x tokens/s")
    if "large_prefill_ms" in result:
        say(f"{args.large} prefill 1x{args.prefill}: {result['large_prefill_ms']:.1f} ms")
    say(f"bandwidth limit per GPU: {bandwidth / 1e12:.2f} TB/s (the slowest GPU's copy)")


if __name__ == "__main__":
    main()
