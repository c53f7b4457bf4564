"""T5 generation benchmark on the GPU: ours (eager and CUDA graph) vs HF transformers.

Random weights at the real architecture (`zoo.load(name, pretrained=False)`), bf16, greedy, a
fixed number of new tokens (EOS ignored). The time is a whole generate call (encoder, then every
decoder step), the median of a few runs after a warm-up, for ours and for HF eager and HF with a
static cache + torch.compile (HF's generate compiles the decoder forward itself). `--peers`
measures the HF numbers into benchmarks/results/, later runs reuse them. The roofline floor of a
call is the encoder's (its FLOPs or its weights' bytes, whichever takes longer at the limits
measured in the run) plus, per new token, the decoder step's (its weights, the head and the
self- and cross-attention caches read once).

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
    Roofline,
    attempt,
    fmt,
    gpu_tag,
    head_weight,
    load_peers,
    median_seconds,
    roofline_cells,
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


def _linear_params(module: torch.nn.Module) -> int:
    return sum(
        p.numel()
        for m in module.modules()
        if not isinstance(m, torch.nn.Embedding)
        for p in m.parameters(recurse=False)
        if p.dim() == 2
    )


def generate_floor(model, roofline: Roofline, batch: int, seq: int, new: int) -> dict:
    """Roofline of generate(): the encoder pass (with the cross-attention K/V projections, done
    once), then `new` decoder steps at the mean decoder length, the phases one after the other."""
    c = model.config
    elem = next(model.parameters()).element_size()
    inner = c.num_heads * c.d_kv
    cross_kv = sum(layer.cross.kv.weight.numel() for layer in model.decoder.layers)
    encoder = _linear_params(model.encoder) + cross_kv
    step = _linear_params(model.decoder) - cross_kv + head_weight(model).numel()
    tokens = batch * seq
    encoder_flops = 2 * encoder * tokens + 4 * c.num_layers * tokens * seq * inner
    context = seq + new / 2  # cross-attention keys plus the mean self-attention length
    cache = 2 * c.num_decoder_layers * batch * context * inner
    bytes_moved = (encoder + new * (step + cache)) * elem
    flops = encoder_flops + new * (2 * step * batch + 2 * cache)
    floor_s = roofline.floor_s(encoder * elem, encoder_flops) + new * roofline.floor_s(
        (step + cache) * elem, 2 * step * batch + 2 * cache
    )
    # the fields of a floor that sums two phases, each at its own bound
    bound = roofline.bound(bytes_moved, flops)
    return {
        "floor_ms": 1e3 * floor_s,
        "floor_bound": bound,
        "bytes_moved": bytes_moved,
        "flops": flops,
    }


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

    roofline = Roofline.measure()
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
    row.update(generate_floor(model, roofline, args.batch, args.input, args.new))
    row["roofline_pct"] = 100 * row["floor_ms"] / row["ours_graph_ms"]
    print(json.dumps(row))
    compiled = row.get("hf_compile_ms")
    speedup = f"{compiled / row['ours_graph_ms']:.2f}x" if compiled else "n/a"
    print(f"\n{args.model} on {torch.cuda.get_device_name()}, bf16, ms per generate call")
    print(roofline.header())
    print(
        "| batch x input x new | ours (graph) | ours (eager) | HF eager | HF static+compile "
        "| vs compile | roofline floor | % of roofline |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {shape} | {fmt(row['ours_graph_ms'], 1)} | {fmt(row['ours_eager_ms'], 1)} "
        f"| {fmt(row.get('hf_eager_ms'), 1)} | {fmt(compiled, 1)} | {speedup} "
        f"{roofline_cells(row, 2)}"
    )
    if args.out:
        write_result(args.out, torch.cuda.get_device_name(), **row)


if __name__ == "__main__":
    main()
