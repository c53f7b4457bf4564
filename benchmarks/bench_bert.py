"""Bert encoder benchmark on the GPU: ours (eager and CUDA graph) vs HF transformers.

Random weights at the real architecture (`zoo.load(name, pretrained=False)`), bf16, full-length
batches. Providers, timed alike with triton.testing.do_bench (median): ours eager, ours replayed
from a CUDA graph, HF eager (SDPA attention) and HF + torch.compile(mode="max-autotune"), which
uses CUDA graphs too. Prints ms and TFLOP/s against the bf16 matmul rate measured in the same
run. HF compile numbers take minutes per shape: `--peers` measures them into
benchmarks/results/, later runs reuse them.

    PYTHONPATH=. python benchmarks/bench_bert.py --model bert-base-uncased [--peers]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    RESULTS,
    attempt,
    fmt,
    gpu_tag,
    load_peers,
    measure_matmul_flops,
    parse_shapes,
    write_result,
)

import zoo  # noqa: E402

SHAPES = "1x16,1x128,1x512,8x128,8x512,32x128,32x512"


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def flops(config, batch: int, seq: int) -> float:
    """Matmul FLOPs of one forward: the layers' weights once per token, plus QK^T and PV."""
    c = config
    per_layer = 4 * c.hidden_size**2 + 2 * c.hidden_size * c.intermediate_size
    attention = 4 * batch * seq * seq * c.hidden_size
    return c.num_layers * (2 * batch * seq * per_layer + attention)


def inputs(vocab: int, batch: int, seq: int):
    ids = torch.randint(0, vocab, (batch, seq), device="cuda")
    return ids, torch.ones_like(ids), torch.zeros_like(ids)


def graphed(model, ids, mask, types):
    """Our forward captured once for these inputs; returns the replay function."""
    model(ids, attention_mask=mask, token_type_ids=types, cuda_graph=False)  # compile, autotune
    kv_end = mask.sum(-1).to(torch.int32)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        model.encode(ids, types, kv_end)
    torch.cuda.current_stream().wait_stream(stream)
    return graph.replay


def bench_peers(name: str, shapes, save) -> dict:
    import transformers

    entry = zoo.registry.get_entry(name)
    config = transformers.BertConfig(**entry.config)
    with torch.device("cuda"):
        model = transformers.BertModel(config).to(torch.bfloat16).eval()
    # one static graph per shape (dynamic=False): HF compiled at its best for each shape
    compiled = torch.compile(model, mode="max-autotune", dynamic=False)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    result = {"transformers": transformers.__version__, "rows": {}}
    with torch.inference_mode():
        for batch, seq in shapes:
            ids, mask, types = inputs(config.vocab_size, batch, seq)
            kwargs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
            row = {
                "hf_eager_ms": attempt(
                    "HF eager", lambda kwargs=kwargs: bench(lambda: model(**kwargs))
                )
            }
            start = time.perf_counter()
            if attempt("HF compile", lambda kwargs=kwargs: compiled(**kwargs)) is not None:
                row["hf_compile_s"] = time.perf_counter() - start
                row["hf_compile_ms"] = attempt(
                    "HF compile", lambda kwargs=kwargs: bench(lambda: compiled(**kwargs))
                )
            result["rows"][f"{batch}x{seq}"] = row
            save(result)
            print(f"  HF {batch}x{seq}: {json.dumps(row)}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bert-base-uncased")
    parser.add_argument("--shapes", default=SHAPES, help="batch x seq, ...")
    parser.add_argument("--peers", action="store_true", help="measure HF peers (minutes)")
    parser.add_argument(
        "--peer-shapes", default=None, help="the shapes --peers measures (default: --shapes)"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    shapes = parse_shapes(args.shapes)
    peer_shapes = parse_shapes(args.peer_shapes or args.shapes)

    device = torch.cuda.get_device_name()
    peak = measure_matmul_flops()
    print(f"{device}: bf16 matmul {peak / 1e12:.0f} TFLOP/s")

    def measure_peers(save):
        result = bench_peers(args.model, peer_shapes, save)
        gc.collect()
        torch.cuda.empty_cache()
        return result

    peers_path = RESULTS / f"{gpu_tag()}_{args.model}_hf_peers.json"
    peers = load_peers(peers_path, measure_peers if args.peers else None).get("rows", {})

    model = zoo.load(args.model, pretrained=False, device="cuda", dtype=torch.bfloat16)
    rows = []
    with torch.inference_mode():
        for batch, seq in shapes:
            ids, mask, types = inputs(model.config.vocab_size, batch, seq)
            row = {"shape": f"{batch}x{seq}"}
            row["ours_eager_ms"] = bench(
                lambda ids=ids, mask=mask, types=types: model(
                    ids, attention_mask=mask, token_type_ids=types, cuda_graph=False
                )
            )
            row["ours_graph_ms"] = bench(graphed(model, ids, mask, types))
            row["tflops"] = flops(model.config, batch, seq) / (row["ours_graph_ms"] * 1e-3) / 1e12
            row.update(peers.get(row["shape"], {}))
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\n{args.model} on {device}, bf16, ms per forward (lower is better)")
    print(
        "| batch x seq | ours (graph) | ours (eager) | HF eager | HF compile max-autotune "
        "| vs best HF | vs HF eager | TFLOP/s (% of matmul peak) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        hf = [v for v in (r.get("hf_eager_ms"), r.get("hf_compile_ms")) if v is not None]
        best = f"{min(hf) / r['ours_graph_ms']:.2f}x" if hf else "n/a"
        vs_eager = (
            f"{r['hf_eager_ms'] / r['ours_graph_ms']:.1f}x" if r.get("hf_eager_ms") else "n/a"
        )
        print(
            f"| {r['shape']} | {fmt(r['ours_graph_ms'], 3)} | {fmt(r['ours_eager_ms'], 3)} "
            f"| {fmt(r.get('hf_eager_ms'), 3)} | {fmt(r.get('hf_compile_ms'), 3)} | {best} "
            f"| {vs_eager} | {r['tflops']:.0f} ({100 * r['tflops'] * 1e12 / peak:.0f}%) |"
        )
    if args.out:
        write_result(args.out, device, model=args.model, bf16_matmul_flops=peak, rows=rows)


if __name__ == "__main__":
    main()
