"""T5 generation benchmark on the GPU: ours (eager and CUDA graph) vs HF transformers.

Random weights at the real architecture (`zoo.load(name, pretrained=False)`), bf16, greedy, a
fixed number of new tokens (EOS ignored). The time is a whole generate call (encoder, then every
decoder step), the median of a few runs after a warm-up, for ours and for HF eager and HF with a
static cache + torch.compile (HF's generate compiles the decoder forward itself). `--peers`
measures the HF numbers into benchmarks/results/, later runs reuse them.

    PYTHONPATH=. python benchmarks/bench_t5.py --model t5-base --input 256 --new 64 [--peers]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    RESULTS,
    attempt,
    fmt,
    gpu_tag,
    load_peers,
    median_seconds,
    write_result,
)

import zoo  # noqa: E402


def bench_peers(name: str, batch: int, seq: int, new: int) -> dict:
    import transformers

    entry = zoo.registry.get_entry(name)
    config = transformers.T5Config(**entry.config)
    with torch.device("cuda"):
        model = transformers.T5ForConditionalGeneration(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (batch, seq), device="cuda")
    mask = torch.ones_like(ids)
    result = {"transformers": transformers.__version__}
    with torch.inference_mode():
        for provider, extra in (
            ("hf_eager", {"disable_compile": True}),
            ("hf_compile", {"cache_implementation": "static"}),
        ):
            seconds = attempt(
                provider,
                lambda extra=extra: median_seconds(
                    lambda: model.generate(
                        ids,
                        attention_mask=mask,
                        max_new_tokens=new,
                        min_new_tokens=new,
                        do_sample=False,
                        **extra,
                    )
                ),
            )
            if seconds is not None:
                result[f"{provider}_ms"] = 1e3 * seconds
                print(f"  {provider}: {1e3 * seconds:.1f} ms", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="t5-base")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--input", type=int, default=256)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--peers", action="store_true", help="measure HF peers (minutes)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    shape = f"{args.batch}x{args.input}x{args.new}"

    def measure_peers(save):
        result = bench_peers(args.model, args.batch, args.input, args.new)
        gc.collect()
        torch.cuda.empty_cache()
        return {"rows": {shape: result}}

    peers_path = RESULTS / f"{gpu_tag()}_{args.model}_hf_peers.json"
    peers = load_peers(peers_path, measure_peers if args.peers else None)
    peer_row = peers.get("rows", {}).get(shape, {})

    model = zoo.load(args.model, pretrained=False, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.input), device="cuda")
    mask = torch.ones_like(ids)
    row = {"model": args.model, "shape": shape, **peer_row}
    with torch.inference_mode():
        for provider, graph in (("ours_eager", False), ("ours_graph", True)):
            seconds = median_seconds(
                lambda graph=graph: model.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=args.new,
                    eos_token_id=[],
                    cuda_graph=graph,
                )
            )
            row[f"{provider}_ms"] = 1e3 * seconds
    print(json.dumps(row))
    compiled = row.get("hf_compile_ms")
    speedup = f"{compiled / row['ours_graph_ms']:.2f}x" if compiled else "n/a"
    print(f"\n{args.model} on {torch.cuda.get_device_name()}, bf16, ms per generate call")
    print(
        "| batch x input x new | ours (graph) | ours (eager) | HF eager | HF static+compile | vs compile |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    print(
        f"| {shape} | {fmt(row['ours_graph_ms'], 1)} | {fmt(row['ours_eager_ms'], 1)} "
        f"| {fmt(row.get('hf_eager_ms'), 1)} | {fmt(compiled, 1)} | {speedup} |"
    )
    if args.out:
        write_result(args.out, torch.cuda.get_device_name(), **row)


if __name__ == "__main__":
    main()
