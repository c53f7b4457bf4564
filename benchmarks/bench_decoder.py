"""Decoder-only benchmark on the GPU: ours (eager and CUDA graph) vs HF transformers.

Random weights at the real architecture (`zoo.load(name, pretrained=False)`), bf16, greedy.
Every provider is timed the same way: generate(prompt, new) and generate(prompt, 1) (the prefill
plus one token), each the median of a few runs after a warm-up; decode time per step is their
difference over new - 1. The roofline line: a decode step must read the weights (an untied
word embedding only for its B rows) and the KV cache at the mean context, and multiply every
matmul weight once per row; its floor is the larger of those bytes over the copy bandwidth and
those FLOPs over the bf16 matmul rate, both measured in the same run (common.Roofline), and the
table gives our % of it. The same for the prefill, a full forward of 1 x 2048 tokens.

HF peers (eager with its dynamic cache; static cache + torch.compile, which HF's generate compiles
by itself) take minutes to compile: `--peers` measures them and stores them under
benchmarks/results/, and later runs on the same GPU kind and versions reuse them.

    PYTHONPATH=. python benchmarks/bench_decoder.py --model llama3-8b [--peers] [--out out.json]
    PYTHONPATH=. python benchmarks/bench_decoder.py --shapes 1x512x64,8x512x64,32x512x64 --graph-only

`--quantize fp8` runs ours with FP8 weights (random bf16 weights quantized per row), and with
`--versus-bf16` the bf16 model too, in the same process, printing FP8's speedup over bf16:

    PYTHONPATH=. python benchmarks/bench_decoder.py --model llama3-8b --quantize fp8 \
        --versus-bf16 --graph-only --shapes 1x128x128,32x512x64
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    RESULTS,
    Roofline,
    attempt,
    fmt,
    gpu_tag,
    load_peers,
    matmul_params,
    median_seconds,
    parse_shapes,
    ratio,
    roofline_cells,
    weight_bytes,
    write_result,
)

import zoo  # noqa: E402


def decode_timing(generate, ids, new_tokens: int) -> tuple[float, float]:
    """(seconds per decode step, seconds of prefill + first token)."""
    first = median_seconds(lambda: generate(ids, 1))
    total = median_seconds(lambda: generate(ids, new_tokens))
    return (total - first) / (new_tokens - 1), first


def _dims(config) -> tuple[int, int, int, int]:
    """(layers, query heads, kv heads, head dim) of a decoder config (ours: Llama or GPT-2)."""
    layers = getattr(config, "num_layers", getattr(config, "n_layer", None))
    heads = getattr(config, "num_heads", getattr(config, "n_head", None))
    kv_heads = getattr(config, "num_kv_heads", heads)
    return layers, heads, kv_heads, config.head_dim


def step_bytes(model, batch: int, context: float) -> float:
    """Bytes one decode step reads: the weights (gathered tables: B rows) and K and V at this
    context length, in the cache's dtype."""
    layers, _, kv_heads, head_dim = _dims(model.config)
    elem = next(model.parameters()).element_size()
    return weight_bytes(model, batch) + 2 * layers * batch * kv_heads * context * head_dim * elem


def step_flops(model, batch: int, context: float) -> float:
    """Matmul FLOPs of one decode step: every weight once per row, plus q.K and p.V."""
    layers, heads, _, head_dim = _dims(model.config)
    return 2 * matmul_params(model) * batch + 4 * layers * batch * heads * context * head_dim


def prefill_roofline(model, roofline: Roofline, tokens: int, seconds: float) -> dict:
    """A forward of 1 x tokens (causal): the weights read once, every token through every matmul
    weight, and the causal half of q.K and p.V."""
    layers, heads, _, head_dim = _dims(model.config)
    flops = 2 * matmul_params(model) * tokens + 2 * layers * heads * tokens * tokens * head_dim
    return roofline.fields(seconds, weight_bytes(model, tokens), flops)


def ours_generate(model, cuda_graph: bool):
    def generate(ids, new):
        return model.generate(ids, max_new_tokens=new, eos_token_id=[], cuda_graph=cuda_graph)

    return generate


def hf_generate(model, compiled: bool):
    def generate(ids, new):
        kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
        if compiled:
            kwargs["cache_implementation"] = "static"  # generate then compiles the forward itself
        else:
            kwargs["disable_compile"] = True
        return model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)

    return generate


def load_hf(model_name: str):
    import transformers

    entry = zoo.registry.get_entry(model_name)
    config = transformers.AutoConfig.for_model(**entry.config)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def bench_peers(model_name: str, shapes, prefill_tokens: int, save) -> dict:
    import transformers

    model = load_hf(model_name)
    vocab = model.config.vocab_size
    result = {
        "transformers": transformers.__version__,
        "prefill_tokens": prefill_tokens,
        "rows": {},
    }
    with torch.inference_mode():
        ids = torch.randint(0, vocab, (1, prefill_tokens), device="cuda")
        result["prefill_ms_eager"] = 1e3 * median_seconds(lambda: model(ids), repeats=5)
        for batch, prompt, new in shapes:
            ids = torch.randint(0, vocab, (batch, prompt), device="cuda")
            row = {}
            for provider, compiled in (("hf_eager", False), ("hf_compile", True)):
                start = time.perf_counter()
                timing = attempt(
                    provider,
                    lambda compiled=compiled, ids=ids, new=new: decode_timing(
                        hf_generate(model, compiled), ids, new
                    ),
                )
                if timing is None:
                    continue
                row[f"{provider}_ms_per_step"] = 1e3 * timing[0]
                row[f"{provider}_bench_s"] = time.perf_counter() - start
                print(
                    f"  {provider} {batch}x{prompt}x{new}: {1e3 * timing[0]:.2f} ms/step",
                    flush=True,
                )
            result["rows"][f"{batch}x{prompt}x{new}"] = row
            save(result)
    return result


def bench_ours(args, shapes, quantize, roofline, peers) -> dict:
    """Our model (bf16, or FP8 weights): a warm-up generate, prefill of 1 x args.prefill, and
    decode time per step of each shape, each with its roofline fields."""
    model = zoo.load(
        args.model, pretrained=False, device="cuda", dtype=torch.bfloat16, quantize=quantize
    )
    vocab = model.config.vocab_size
    rows = []
    with torch.inference_mode():
        start = time.perf_counter()
        ids = torch.randint(0, vocab, (1, 16), device="cuda")
        model.generate(ids, max_new_tokens=4, eos_token_id=[], cuda_graph=True)
        torch.cuda.synchronize()
        warmup_s = time.perf_counter() - start
        ids = torch.randint(0, vocab, (1, args.prefill), device="cuda")
        prefill_ms = 1e3 * median_seconds(lambda: model(ids), repeats=5)
        for batch, prompt, new in shapes:
            ids = torch.randint(0, vocab, (batch, prompt), device="cuda")
            row = {"shape": f"{batch}x{prompt}x{new}", "weights": quantize or "bf16"}
            providers = (("ours_graph", True),) + (
                () if args.graph_only else (("ours_eager", False),)
            )
            for provider, graph in providers:
                step_s, _ = decode_timing(ours_generate(model, graph), ids, new)
                row[f"{provider}_ms_per_step"] = 1e3 * step_s
            step_s = row["ours_graph_ms_per_step"] * 1e-3
            row["tokens_per_s"] = batch / step_s
            context = prompt + new / 2  # mean context of the decode steps
            bytes_moved = step_bytes(model, batch, context)
            row["bandwidth_fraction"] = bytes_moved / step_s / roofline.copy_Bps
            row.update(roofline.fields(step_s, bytes_moved, step_flops(model, batch, context)))
            if row["shape"] in peers["rows"]:
                row.update(peers["rows"][row["shape"]])
            rows.append(row)
            print(json.dumps(row), flush=True)
    prefill = prefill_roofline(model, roofline, args.prefill, prefill_ms * 1e-3)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model = None  # freed before the next model loads
    gc.collect()
    torch.cuda.empty_cache()
    return dict(
        rows=rows,
        prefill_ms=prefill_ms,
        prefill=prefill,
        warmup_s=warmup_s,
        weight_bytes=weight_bytes,
    )


def print_versus_bf16(model_name: str, prefill: int, fp8: dict, bf16: dict) -> None:
    print(f"\n{model_name}: FP8 weights vs bf16 (ours, CUDA graph; higher speedup is better)")
    print("| workload | bf16 | FP8 | FP8 speedup |")
    print("| --- | --- | --- | --- |")
    for a, b in zip(fp8["rows"], bf16["rows"], strict=True):
        print(
            f"| decode {a['shape']} | {b['tokens_per_s']:.0f} tok/s "
            f"({100 * b['bandwidth_fraction']:.0f}% of bandwidth) | {a['tokens_per_s']:.0f} tok/s "
            f"({100 * a['bandwidth_fraction']:.0f}%) | "
            f"**{a['tokens_per_s'] / b['tokens_per_s']:.2f}x** |"
        )
    print(
        f"| prefill 1x{prefill} | {bf16['prefill_ms']:.1f} ms | {fp8['prefill_ms']:.1f} ms | "
        f"**{bf16['prefill_ms'] / fp8['prefill_ms']:.2f}x** |"
    )
    print(
        f"weights: bf16 {bf16['weight_bytes'] / 1e9:.2f} GB, FP8 {fp8['weight_bytes'] / 1e9:.2f} GB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--shapes", default="1x128x128,2x512x256", help="batch x prompt x new, ...")
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--peers", action="store_true", help="measure HF peers (minutes)")
    parser.add_argument(
        "--graph-only", action="store_true", help="time only the CUDA-graph decode (not eager)"
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--quantize", choices=["fp8"], default=None, help="ours with FP8 weights")
    parser.add_argument(
        "--versus-bf16", action="store_true", help="with --quantize: the bf16 model too"
    )
    args = parser.parse_args()
    shapes = parse_shapes(args.shapes)

    device = torch.cuda.get_device_name()
    roofline = Roofline.measure()
    print(f"{device}: {roofline.header()}")

    def measure_peers(save):
        result = bench_peers(args.model, shapes, args.prefill, save)
        gc.collect()  # the HF model is gone with bench_peers' frame
        torch.cuda.empty_cache()
        return result

    peers_path = RESULTS / f"{gpu_tag()}_{args.model}_hf_peers.json"
    peers = load_peers(peers_path, measure_peers if args.peers else None)
    peers.setdefault("rows", {})

    ours = bench_ours(args, shapes, args.quantize, roofline, peers)
    rows, prefill_ms, warmup_s = ours["rows"], ours["prefill_ms"], ours["warmup_s"]
    prefill = ours["prefill"]
    bf16 = None
    if args.quantize and args.versus_bf16:
        bf16 = bench_ours(args, shapes, None, roofline, peers)

    weights = args.quantize or "bf16"
    print(f"\n{args.model} on {device}, {weights} weights, ms per decode step (lower is better)")
    print(roofline.header())
    print(
        "| batch x prompt x new | ours (graph) | ours (eager) | HF eager | HF static+compile "
        "| speedup vs compile | tok/s | % of bandwidth limit | roofline floor ms | % of roofline |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        hf_e = r.get("hf_eager_ms_per_step")
        hf_c = r.get("hf_compile_ms_per_step")
        speedup = f"{hf_c / r['ours_graph_ms_per_step']:.2f}x" if hf_c else "n/a"
        print(
            f"| {r['shape']} | {fmt(r['ours_graph_ms_per_step'])} "
            f"| {fmt(r.get('ours_eager_ms_per_step'))} "
            f"| {fmt(hf_e)} | {fmt(hf_c)} | {speedup} | {r['tokens_per_s']:.0f} "
            f"| {100 * r['bandwidth_fraction']:.0f}% {roofline_cells(r)}"
        )
    hf_prefill = peers.get("prefill_ms_eager")
    print(
        f"\nprefill 1x{args.prefill}: ours {prefill_ms:.1f} ms, HF eager "
        f"{fmt(hf_prefill)} ms ({ratio(prefill_ms, hf_prefill)} of its time); roofline floor "
        f"{prefill['floor_ms']:.1f} ms ({prefill['floor_bound']}), ours at "
        f"{prefill['roofline_pct']:.0f}%; first generate (compile + autotune + capture) "
        f"{warmup_s:.1f} s"
    )
    if bf16 is not None:
        print_versus_bf16(args.model, args.prefill, ours, bf16)
    if args.out:
        write_result(
            args.out,
            device,
            model=args.model,
            **roofline.limits(),
            prefill_tokens=args.prefill,
            ours_prefill_ms=prefill_ms,
            hf_eager_prefill_ms=hf_prefill,
            prefill_roofline=prefill,
            warmup_s=warmup_s,
            rows=rows,
            weights=weights,
            bf16=bf16,
        )


if __name__ == "__main__":
    main()
