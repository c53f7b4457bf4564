"""Bert encoder benchmark on the GPU: the plain call a user makes vs HF transformers.

Random weights at the real architecture (`zoo.load(name, pretrained=False)`), bf16, full-length
batches. The headline is the plain call `model(ids, attention_mask=mask)` timed as a user calls
it: steady state after a warm-up, each call on an idle GPU between CUDA events and followed by a
sync (common.call_ms), so its launches, input checks and host syncs all count. Beside it: the
same call back to back (triton.testing.do_bench, the method the HF peers were timed with), the
summed durations (and count) of the GPU kernels of one call in a torch.profiler trace, the
call with cuda_graph=False where the model takes that argument, and a CUDA graph captured by hand
around `model.encode` and replayed (the floor of launch overhead; timed both ways). HF peers:
eager (SDPA attention) and torch.compile(mode="max-autotune"), which uses CUDA graphs too, timed
with do_bench. Prints ms, the ratios and TFLOP/s against the bf16 matmul rate measured in the
same run, and the roofline line: the floor of a forward (the larger of its matmul FLOPs over the
measured matmul rate and the weights' bytes over the measured copy bandwidth) and the plain
call's % of it. HF compile numbers take minutes per shape: `--peers` measures them into
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
    Roofline,
    accepts,
    attempt,
    call_ms,
    fmt,
    gpu_kernel_ms,
    gpu_tag,
    load_peers,
    parse_shapes,
    ratio,
    roofline_cells,
    weight_bytes,
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
    model(ids, attention_mask=mask, token_type_ids=types)  # compile and autotune first
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
    roofline = Roofline.measure()
    peak = roofline.matmul_flops
    print(f"{device}: {roofline.header()}")

    def measure_peers(save):
        result = bench_peers(args.model, peer_shapes, save)
        gc.collect()
        torch.cuda.empty_cache()
        return result

    peers_path = RESULTS / f"{gpu_tag()}_{args.model}_hf_peers.json"
    peers = load_peers(peers_path, measure_peers if args.peers else None).get("rows", {})

    model = zoo.load(args.model, pretrained=False, device="cuda", dtype=torch.bfloat16)
    # the plain call's opt-out of CUDA graphs, where the model has one
    opt_out = accepts(model.forward, "cuda_graph")
    rows = []
    with torch.inference_mode():
        for batch, seq in shapes:
            ids, mask, types = inputs(model.config.vocab_size, batch, seq)
            row = {"shape": f"{batch}x{seq}"}

            def plain(ids=ids, mask=mask):
                return model(ids, attention_mask=mask)

            row["ours_call_ms"] = call_ms(plain)
            row["ours_call_bench_ms"] = bench(plain)
            row["ours_gpu_ms"], row["ours_kernels"] = gpu_kernel_ms(plain)
            if opt_out:
                row["ours_eager_ms"] = bench(
                    lambda ids=ids, mask=mask: model(ids, attention_mask=mask, cuda_graph=False)
                )
            # hand capture of model.encode: n/a if encode can no longer be captured from outside
            replay = attempt(
                "graph capture",
                lambda ids=ids, mask=mask, types=types: graphed(model, ids, mask, types),
            )
            row["ours_graph_ms"] = bench(replay) if replay else None
            row["ours_replay_call_ms"] = call_ms(replay) if replay else None
            row["tflops"] = flops(model.config, batch, seq) / (row["ours_call_ms"] * 1e-3) / 1e12
            row.update(
                roofline.fields(
                    row["ours_call_ms"] * 1e-3,
                    weight_bytes(model, batch * seq),
                    flops(model.config, batch, seq),
                )
            )
            row.update(peers.get(row["shape"], {}))
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\n{args.model} on {device}, bf16, ms per forward (lower is better)")
    print(roofline.header())
    print(
        "plain call: model(ids, attention_mask=mask), each call on an idle GPU and synced; "
        "back to back: the same call under do_bench, as the HF peers were timed; graph replay: "
        "a CUDA graph captured by hand around model.encode"
        + ("" if opt_out else "; this model has no cuda_graph option: the plain call is eager")
    )
    print(
        "| batch x seq | ours plain call | back to back | its GPU kernels | cuda_graph=False "
        "| graph replay (synced) "
        "| HF eager | HF compile max-autotune | vs HF compile | vs HF eager "
        "| plain / replay | TFLOP/s (% of matmul peak) | roofline floor | % of roofline |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ours = r["ours_call_ms"]
        print(
            f"| {r['shape']} | {fmt(ours, 3)} | {fmt(r['ours_call_bench_ms'], 3)} "
            f"| {fmt(r['ours_gpu_ms'], 3)} ({r['ours_kernels']}) "
            f"| {fmt(r.get('ours_eager_ms'), 3)} | {fmt(r.get('ours_replay_call_ms'), 3)} "
            f"| {fmt(r.get('hf_eager_ms'), 3)} | {fmt(r.get('hf_compile_ms'), 3)} "
            f"| {ratio(r.get('hf_compile_ms'), ours)} | {ratio(r.get('hf_eager_ms'), ours, 1)} "
            f"| {ratio(ours, r.get('ours_replay_call_ms'))} "
            f"| {r['tflops']:.0f} ({100 * r['tflops'] * 1e12 / peak:.0f}%) {roofline_cells(r)}"
        )
    if args.out:
        write_result(
            args.out,
            device,
            model=args.model,
            **roofline.limits(),
            plain_call_cuda_graph_option=opt_out,
            rows=rows,
        )


if __name__ == "__main__":
    main()
