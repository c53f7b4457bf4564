"""Decode-step A/B: variants of the same model measured side by side in one process.

Each variant is NAME=SPEC: a set of kernel options (ZOO_KERNELS syntax, e.g.
"decode_split_table=1"; unnamed options keep their defaults) and/or kernels to skip (skip:norm,
skip:rope), comma-separated; an empty SPEC is the defaults. A skipped kernel's output is left as
it came in (the RMSNorm returns its input; RoPE + cache write neither rotates nor writes), so the
outputs are wrong: the time saved is an upper bound of what fusing that kernel away could save.
(FP8 projections compute their input's RMSNorm themselves, fp8_fused_norm: skip:norm leaves
those as they are.)
Variants alternate inside each run, and every variant gets a fresh decode runner (its own CUDA
graph), timed as bench_decoder.py times a step: `generate` with and without the new tokens, the
difference per token. Each shape's floor (the step's bytes over the measured copy bandwidth, or
its FLOPs over the measured matmul rate, at the mean context) stands beside the times, with each
variant's best % of it, and beside each run the card's mean SM clock, power draw and share of
the time its power cap lowered the clocks (nvidia-smi, sampled while the run was timed).

    PYTHONPATH=. python benchmarks/ab_decode.py --shapes 1x128x128,32x512x64 \\
        --variant base= --variant split-table=decode_split_table=1 --variant no-norm=skip:norm
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decoder import decode_timing, ours_generate, step_bytes, step_flops  # noqa: E402
from common import ClockLog, Roofline, parse_shapes, write_result  # noqa: E402

import kernels.utils  # noqa: E402
import zoo  # noqa: E402
import zoo.layers  # noqa: E402

SKIPPABLE = ("norm", "rope")
_rms_norm_forward = zoo.layers.RMSNorm.forward
_rope_cache_write = zoo.layers.rope_cache_write


def _unrotated_query(qkv, k_cache, v_cache, cache_lengths, *, num_q_heads, head_dim, **_):
    """rope_cache_write skipped: the query view of qkv as it is, the caches untouched."""
    batch, seq, _ = qkv.shape
    return qkv.view(batch, seq, -1, head_dim)[:, :, :num_q_heads]


def parse_variant(text: str) -> tuple[str, dict, tuple[str, ...]]:
    """'name=opt=1,skip:norm' -> (name, kernel options, skipped kernels)."""
    name, _, spec = text.partition("=")
    options, skips = [], []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        if item.startswith("skip:"):
            what = item[len("skip:") :]
            if what not in SKIPPABLE:
                raise SystemExit(f"--variant {text!r}: can skip {SKIPPABLE}, not {what!r}")
            skips.append(what)
        else:
            options.append(item)
    parsed = kernels.utils.parse_kernel_options(",".join(options))  # raises on unknown options
    return name, parsed, tuple(skips)


def apply_variant(options: dict, skips: tuple[str, ...]) -> None:
    kernels.utils.set_kernel_options(**options)
    zoo.layers.RMSNorm.forward = (
        (lambda self, x, residual=None: x) if "norm" in skips else _rms_norm_forward
    )
    zoo.layers.rope_cache_write = _unrotated_query if "rope" in skips else _rope_cache_write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama3-8b", help="registry name or checkpoint path")
    parser.add_argument("--quantize", choices=["fp8"], default=None)
    parser.add_argument("--shapes", default="1x128x128,8x512x64,32x512x64")
    parser.add_argument("--runs", type=int, default=2, help="alternations of all variants")
    parser.add_argument("--variant", action="append", required=True, help="name=spec")
    parser.add_argument("--eager", action="store_true", help="no CUDA graph (CPU smoke runs)")
    parser.add_argument(
        "--configs", action="store_true", help="print the matmul autotuner's picks at the end"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    variants = [parse_variant(text) for text in args.variant]
    default_options = dict(kernels.utils.KERNEL_OPTIONS)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # a smoke run (--eager, TRITON_INTERPRET=1): no GPU work to wait for
        torch.cuda.synchronize = lambda device=None: None
    path = Path(args.model)
    model = zoo.load(
        args.model,
        pretrained=path.exists(),
        device=device,
        dtype=torch.bfloat16 if device == "cuda" else torch.float32,
        quantize=args.quantize,
    )
    roofline = Roofline.measure() if device == "cuda" else None
    if roofline is not None:
        print(roofline.header())
    vocab = model.config.vocab_size
    weights = args.quantize or str(next(model.parameters()).dtype).removeprefix("torch.")
    results = []
    start = time.perf_counter()
    clocks = ClockLog() if device == "cuda" else None
    with torch.inference_mode():
        for batch, prompt, new in parse_shapes(args.shapes):
            ids = torch.randint(0, vocab, (batch, prompt), device=device)
            for run in range(args.runs):
                for name, options, skips in variants:
                    apply_variant({**default_options, **options}, skips)
                    model.engine.reset()  # a new runner: this variant's kernels in its graph
                    timed_from = time.time()
                    step_s, _ = decode_timing(ours_generate(model, not args.eager), ids, new)
                    row = {"shape": f"{batch}x{prompt}x{new}", "variant": name, "run": run,
                           "ms_per_step": 1e3 * step_s}  # fmt: skip
                    if clocks is not None:  # what the card ran at while this run was timed
                        row.update(clocks.summary(timed_from, time.time()))
                    if roofline is not None:
                        context = prompt + new / 2  # mean context of the decode steps
                        row.update(roofline.fields(step_s, step_bytes(model, batch, context),
                                                   step_flops(model, batch, context)))  # fmt: skip
                    results.append(row)
                    print(json.dumps(row), flush=True)
    apply_variant(default_options, ())
    if clocks is not None:
        clocks.close()
    print(f"\n{args.model} ({weights}), ms per decode step, {args.runs} runs:")
    for batch, prompt, new in parse_shapes(args.shapes):
        shape = f"{batch}x{prompt}x{new}"
        rows = [r for r in results if r["shape"] == shape]
        if roofline is not None:
            print(
                f"{shape:>12} {'floor':>16}: {rows[0]['floor_ms']:.3f} ({rows[0]['floor_bound']})"
            )
        for name, _, _ in variants:
            runs = [r for r in rows if r["variant"] == name]
            line = " ".join(f"{r['ms_per_step']:.3f}" for r in runs)
            if roofline is not None:
                line += f"  (best {max(r['roofline_pct'] for r in runs):.0f}% of the floor)"
            if all("sm_mhz_mean" in r for r in runs):
                line += "; SM MHz, W, % power-capped per run: " + ", ".join(
                    f"{r['sm_mhz_mean']:.0f} {r['watts_mean']:.0f} {r['power_capped_pct']:.0f}%"
                    for r in runs
                )
            print(f"{shape:>12} {name:>16}: {line}")
    if args.configs:  # one line per autotune key (shape, epilogue, options) and its config
        print("\nmatmul configs picked:")
        for key, config in kernels.matmul._tuned_configs.items():
            print(f"  {key}: {config}")
    print(f"took {time.perf_counter() - start:.0f}s")
    if args.out:
        device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        limits = roofline.limits() if roofline is not None else {}
        write_result(args.out, device_name, model=args.model, quantize=args.quantize,
                     variants=args.variant, **limits, rows=results)  # fmt: skip


if __name__ == "__main__":
    main()
