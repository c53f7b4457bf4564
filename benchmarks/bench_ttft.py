"""Time to first token and prefill forward on the GPU, as a user calls them, vs their GPU time.

Random weights at the real architecture (`zoo.load(name, pretrained=False)`), bf16, batch 1. At
each prompt length: the wall time of `model.generate(ids, max_new_tokens=1)` (the prefill and
the first token; steady state: median of --repeats calls after warm-up calls that compile,
autotune and capture) and of the plain forward `model(ids)` (logits of every position), each
beside the GPU time of one call: the summed durations of the kernels it runs in a
torch.profiler trace. wall / GPU is what the host adds (launches, checks, syncs, idle gaps).
The roofline line: the forward's floor (bench_decoder.prefill_roofline: its matmul FLOPs over
the measured matmul rate or its weights over the measured copy bandwidth, the larger) and the
plain forward's and the TTFT's % of it.

HF peers, stored in benchmarks/results/<gpu>_<model>_hf_peers.json (rows "ttft 1x<prompt>",
beside bench_decoder.py's rows; measured only with --peers): generate(max_new_tokens=1) eager
(dynamic cache) and with a static cache + torch.compile (HF's generate compiles by itself), and
the eager forward. Without a stored forward row, the file's eager prefill (bench_decoder.py's
--prefill length) is used at that length.

    PYTHONPATH=. python benchmarks/bench_ttft.py --model llama3-8b --prompts 16,128,512,2048
    PYTHONPATH=. python benchmarks/bench_ttft.py --model gpt2 --prompts 1024
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
from bench_decoder import hf_generate, load_hf, prefill_roofline  # noqa: E402
from common import (  # noqa: E402
    RESULTS,
    Roofline,
    attempt,
    fmt,
    gpu_kernel_ms,
    gpu_tag,
    load_peers,
    ratio,
    roofline_cells,
    wall_ms,
    write_result,
)

import zoo  # noqa: E402


def bench_peers(args, prompts: list[int], save) -> dict:
    import transformers

    model = load_hf(args.model)
    vocab = model.config.vocab_size
    result = {"transformers": transformers.__version__, "rows": {}}
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.randint(0, vocab, (1, prompt), device="cuda")
            row = result["rows"][f"ttft 1x{prompt}"] = {}
            row["hf_eager_forward_ms"] = attempt(
                "HF eager forward",
                lambda ids=ids: wall_ms(lambda: model(ids), args.warmup, args.repeats),
            )
            for provider, compiled in (("hf_eager", False), ("hf_compile", True)):
                generate = hf_generate(model, compiled)
                row[f"{provider}_ttft_ms"] = attempt(
                    f"{provider} generate",
                    lambda generate=generate, ids=ids: wall_ms(
                        lambda: generate(ids, 1), args.warmup, args.repeats
                    ),
                )
            save(result)
            print(f"  HF 1x{prompt}: {json.dumps(row)}", flush=True)
    return result


def peer_row(peers: dict, prompt: int) -> dict:
    """The stored HF numbers at this prompt length; the eager prefill of bench_decoder.py counts
    as the eager forward when it was measured at this length."""
    row = dict(peers.get("rows", {}).get(f"ttft 1x{prompt}", {}))
    if row.get("hf_eager_forward_ms") is None and peers.get("prefill_tokens") == prompt:
        row["hf_eager_forward_ms"] = peers.get("prefill_ms_eager")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--prompts", default="16,128,512,2048", help="prompt lengths, batch 1")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls (median)")
    parser.add_argument("--peers", action="store_true", help="measure HF peers")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    prompts = [int(p) for p in args.prompts.split(",")]

    device = torch.cuda.get_device_name()
    roofline = Roofline.measure()

    def measure_peers(save):
        result = bench_peers(args, prompts, save)
        gc.collect()  # the HF model is gone with bench_peers' frame
        torch.cuda.empty_cache()
        return result

    peers_path = RESULTS / f"{gpu_tag()}_{args.model}_hf_peers.json"
    peers = load_peers(peers_path, measure_peers if args.peers else None)

    start = time.perf_counter()
    model = zoo.load(args.model, pretrained=False, device="cuda", dtype=torch.bfloat16)
    print(f"{device}: {args.model} random init {time.perf_counter() - start:.1f} s", flush=True)
    vocab = model.config.vocab_size
    rows = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.randint(0, vocab, (1, prompt), device="cuda")
            row = {"shape": f"1x{prompt}"}

            def first_token(ids=ids):
                return model.generate(ids, max_new_tokens=1)

            def forward(ids=ids):
                return model(ids)

            start = time.perf_counter()
            # a prompt that fills the context leaves no room for a new token: forward only
            generates = prompt < model.max_length
            (first_token if generates else forward)()
            torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - start  # compile, autotune, capture
            row["ours_ttft_ms"] = row["ours_ttft_gpu_ms"] = row["ttft_kernels"] = None
            if generates:
                row["ours_ttft_ms"] = wall_ms(first_token, args.warmup, args.repeats)
                row["ours_ttft_gpu_ms"], row["ttft_kernels"] = gpu_kernel_ms(first_token)
            row["ours_forward_ms"] = wall_ms(forward, args.warmup, args.repeats)
            row["ours_forward_gpu_ms"], row["forward_kernels"] = gpu_kernel_ms(forward)
            row.update(peer_row(peers, prompt))
            row.update(prefill_roofline(model, roofline, prompt, row["ours_forward_ms"] * 1e-3))
            row["ttft_roofline_pct"] = roofline.percent(
                row["ours_ttft_ms"] and row["ours_ttft_ms"] * 1e-3, row["bytes_moved"], row["flops"]
            )
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\n{args.model} on {device}, bf16, batch 1, ms (lower is better)")
    print(roofline.header())
    print(
        "TTFT: wall time of generate(ids, max_new_tokens=1); GPU: summed kernel time of one call "
        "(torch.profiler; with dependent launches a kernel's time includes its wait for the one "
        "before, so the sum can exceed the wall time); forward: the plain call model(ids)"
    )
    print(
        "| prompt | ours TTFT | its GPU time | wall / GPU | HF eager TTFT | HF static+compile TTFT "
        "| vs HF compile | ours forward | its GPU time | wall / GPU | HF eager forward "
        "| vs HF eager | roofline floor | forward % of roofline | TTFT % of roofline |"
    )
    print(
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    for r in rows:
        ttft_pct = "n/a" if r["ttft_roofline_pct"] is None else f"{r['ttft_roofline_pct']:.0f}%"
        print(
            f"| {r['shape']} | {fmt(r['ours_ttft_ms'])} | {fmt(r['ours_ttft_gpu_ms'])} "
            f"| {ratio(r['ours_ttft_ms'], r['ours_ttft_gpu_ms'])} "
            f"| {fmt(r.get('hf_eager_ttft_ms'))} | {fmt(r.get('hf_compile_ttft_ms'))} "
            f"| {ratio(r.get('hf_compile_ttft_ms'), r['ours_ttft_ms'])} "
            f"| {fmt(r['ours_forward_ms'])} | {fmt(r['ours_forward_gpu_ms'])} "
            f"| {ratio(r['ours_forward_ms'], r['ours_forward_gpu_ms'])} "
            f"| {fmt(r.get('hf_eager_forward_ms'))} "
            f"| {ratio(r.get('hf_eager_forward_ms'), r['ours_forward_ms'])} "
            f"{roofline_cells(r, 2)} {ttft_pct} |"
        )
    if args.out:
        write_result(args.out, device, model=args.model, batch=1, rows=rows)


if __name__ == "__main__":
    main()
