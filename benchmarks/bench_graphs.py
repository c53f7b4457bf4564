"""What a plain call costs with and without the per-bucket CUDA graphs (zoo.graphs).

Random weights at the real architecture, bf16. Per model and shape: the first graphed call of the
bucket (eager warm-up + capture, seconds), then the plain call `model(...)` (a replay of the
bucket's graph) against `cuda_graph=False` (every kernel launched from Python), timed alike with
triton.testing.do_bench (median), and whether the two outputs are bitwise equal. Lengths that
are not powers of two show the padding to the bucket.

    PYTHONPATH=. python benchmarks/bench_graphs.py [--models bert-base-uncased,gpt2,t5-small]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton.testing

import zoo
from zoo import graphs

SHAPES = {  # batch x length (T5: encoder length, the decoder gets a quarter)
    "bert": "1x16,1x100,1x128,8x128,32x128,8x500",
    "decoder": "1x16,1x100,1x128,4x300,8x512",
    "t5": "1x16,1x100,4x128,8x512",
}


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def call_for(model, batch: int, seq: int):
    """(plain call, its eager twin, output -> tensor) for this model family."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), device="cuda")
    family = type(model).__name__
    if family == "Bert":
        return (
            lambda **kw: model(ids, attention_mask=torch.ones_like(ids), **kw),
            lambda out: out.last_hidden_state,
        )
    if family == "T5":
        dec = torch.randint(0, vocab, (batch, max(seq // 4, 1)), device="cuda")
        return (lambda **kw: model(ids, decoder_input_ids=dec, **kw), lambda out: out)
    return (lambda **kw: model(ids, **kw), lambda out: out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="bert-base-uncased,gpt2,t5-small")
    parser.add_argument("--shapes", default=None, help="batch x seq, ... (default per family)")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, bf16, ms per plain call")
    print("| model | batch x seq | padded to | first call (s) | graph | eager | speedup | equal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        model = zoo.load(name, pretrained=False, device="cuda", dtype=torch.bfloat16)
        family = type(model).__name__
        default = SHAPES["bert" if family == "Bert" else "t5" if family == "T5" else "decoder"]
        for shape in (args.shapes or default).split(","):
            batch, seq = (int(v) for v in shape.split("x"))
            call, tensor = call_for(model, batch, seq)
            with torch.inference_mode():
                eager_out = tensor(call(cuda_graph=False)).clone()  # compiles and autotunes
                torch.cuda.synchronize()
                start = time.perf_counter()
                graph_out = tensor(call())
                torch.cuda.synchronize()
                first_s = time.perf_counter() - start
                graph_ms = bench(lambda call=call: call())
                eager_ms = bench(lambda call=call: call(cuda_graph=False))
            row = {
                "model": name,
                "shape": shape,
                "padded_to": graphs.padded_length(batch, seq),
                "first_call_s": round(first_s, 2),
                "graph_ms": round(graph_ms, 4),
                "eager_ms": round(eager_ms, 4),
                "equal": bool(torch.equal(graph_out, eager_out)),
            }
            print(
                f"| {name} | {shape} | {row['padded_to']} | {first_s:.2f} | {graph_ms:.3f} "
                f"| {eager_ms:.3f} | {eager_ms / graph_ms:.1f}x | {row['equal']} |",
                flush=True,
            )
            print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
