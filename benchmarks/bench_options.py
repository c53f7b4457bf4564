"""Kernel options on the GPU: each choice still behind a switch, measured where it matters, and
the winners written out for the runs that follow.

- Epilogue variants of the persistent TMA matmul (kernel options epilogue_subtile, tma_store,
  warp_specialize) at the large-M matmuls with an activation (Bert 32x512 up + GELU, Llama-3-8B
  2048-token gate-up + SiLU*up), against cuBLAS running the matmul alone (F.linear, bias fused).
  The default epilogue is autotuned over every TMA config; each variant over the default's best
  --top configs (compiling every config for every variant would take most of a device call).
- Decode-batch tables at Llama-3-8B's decode shapes, batch 1/8/32/64/128: the matmuls of a step
  (qkv, o, gate-up + SiLU*up, down, over LAYERS distinct layers' weights so that they stream from
  HBM as in a real step, plus the head) with matmul_decode_table off and on, beside cuBLAS; the
  split-KV decode attention over LAYERS layers' caches at context 544 with decode_split_table off
  and on and at fixed split counts. Each is replayed from a CUDA graph (no launch overhead) and
  given with its roofline (bytes over the measured copy bandwidth, FLOPs over the matmul rate).

--options-out writes the winning options (the decode tables' as soon as they are known) as a ZOO_KERNELS string (e.g.
"matmul_decode_table=1,epilogue_subtile=2"): a variant wins where it is at least 1% faster on the
geometric mean of its cases, a table where it is at least 1% faster summed over the batches it
covers; otherwise today's choice stays.

    PYTHONPATH=. python benchmarks/bench_options.py [--out options.json] [--options-out opts.txt]

--skip-decode leaves the decode tables out and --variants picks epilogue variants: `--skip-decode
--variants default` gives only today's epilogue against cuBLAS (gpu_run.sh targets).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).parent))
from common import Roofline, write_result  # noqa: E402

import kernels.decode as decode_module  # noqa: E402
import kernels.matmul as matmul_module  # noqa: E402
import kernels.utils as kernel_utils  # noqa: E402

# (label, M, weight rows, K, activation): the targets' large-M matmuls with an activation
EPILOGUE_CASES = [
    ("bert 32x512 up + gelu", 16384, 3072, 768, "gelu"),
    ("llama3-8b 1x2048 gate-up + silu_mul", 2048, 28672, 4096, "silu_mul"),
]
# kernel options of each epilogue variant (the first is today's epilogue)
EPILOGUE_VARIANTS = {
    "default": dict(epilogue_subtile=1, tma_store=0, warp_specialize=0),
    "subtile2": dict(epilogue_subtile=2, tma_store=0, warp_specialize=0),
    "subtile4": dict(epilogue_subtile=4, tma_store=0, warp_specialize=0),
    "tma-store": dict(epilogue_subtile=1, tma_store=1, warp_specialize=0),
    "subtile2 + tma-store": dict(epilogue_subtile=2, tma_store=1, warp_specialize=0),
    "subtile4 + tma-store": dict(epilogue_subtile=4, tma_store=1, warp_specialize=0),
    "warp-specialize": dict(epilogue_subtile=1, tma_store=0, warp_specialize=1),
    "subtile2 + tma-store + warp-specialize": dict(
        epilogue_subtile=2, tma_store=1, warp_specialize=1
    ),
}
# Llama-3-8B decode: (label, weight rows, K, activation, residual) per layer, and the head
HIDDEN, LAYER_PROJECTIONS = (
    4096,
    [
        ("qkv", 6144, 4096, None, False),
        ("o", 4096, 4096, None, True),
        ("gate-up", 28672, 4096, "silu_mul", False),
        ("down", 4096, 14336, None, True),
    ],
)
HEAD_ROWS, NUM_LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM = 128256, 32, 8, 32, 128
DECODE_BATCHES = (1, 8, 32, 64, 128)
CONTEXT, CACHE_SLOTS = 544, 576  # prompt 512 + 64 new: the mean context and the cache's length
LAYERS = 4  # distinct layers per timed call: 4 x 218 MB of weights, far beyond the L2
FIXED_SPLITS = (1, 2, 4, 8, 16)
MARGIN = 0.99  # a choice other than today's is taken when it is at least 1% faster


def bench_us(fn) -> float:
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")


def attempt_us(what: str, fn) -> float | None:
    """bench_us(fn), or None after printing why (a variant that does not compile on this
    Triton, warp specialization on Hopper say, is reported as n/a)."""
    try:
        fn()
        return bench_us(fn)
    except Exception as err:  # reported, not raised: the other variants still run
        print(f"  {what}: failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
        return None


def restart_tuning() -> None:
    """Forget the matmul autotuner's picks, so the next calls tune under the current options."""
    matmul_module._tuned_configs.clear()
    for tuner in (
        matmul_module._matmul_kernel_tuned,
        matmul_module._matmul_tma_kernel_tuned,
        matmul_module._matvec_fp8_kernel_tuned,
        matmul_module._matvec_kernel_tuned,
    ):
        tuner.cache.clear()


def epilogue_row(case, roofline: Roofline, top: int, variants: list[str]) -> dict:
    """One matmul + activation case under each of the epilogue variants (the first: default)."""
    label, m, n_w, k, activation = case
    tuner = matmul_module._matmul_tma_kernel_tuned
    all_configs = list(tuner.configs)
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(m, k, device=dev, dtype=dt)
    w = torch.randn(n_w, k, device=dev, dtype=dt) / k**0.5
    b = torch.randn(n_w, device=dev, dtype=dt) if activation == "gelu" else None
    n = n_w // 2 if activation == "silu_mul" else n_w
    flops = 2 * m * n_w * k
    bytes_moved = (m * k + n_w * k + m * n) * x.element_size()
    row = {"case": label, "M": m, "N": n_w, "K": k}
    row["cublas_us"] = bench_us(lambda: F.linear(x, w, b))
    row["floor_us"] = 1e6 * roofline.floor_s(bytes_moved, flops)

    def ours():
        return matmul_module.matmul(x, w, b, activation=activation)

    best_configs, expected = all_configs, None
    for name in variants:
        kernel_utils.set_kernel_options(**EPILOGUE_VARIANTS[name])
        restart_tuning()
        tuner.configs = best_configs
        us = attempt_us(f"{label} {name}", ours)
        if name == "default":
            timings = getattr(tuner, "configs_timings", None) or {}
            ranked = sorted(timings, key=lambda c: timings[c][0] if timings[c] else math.inf)
            best_configs = ranked[:top] or all_configs
            expected = ours().float()
        elif us is not None:
            # a variant must compute what the default epilogue computes
            err = (ours().float() - expected).abs().max().item()
            if err > 1.6e-2 * expected.abs().max().item():
                print(f"  {label} {name}: differs from the default by {err:.3e}: left out")
                us = None
        tuned = list(matmul_module._tuned_configs.values())  # this case's pick alone
        row[name] = {
            "us": us,
            "speed_vs_cublas": row["cublas_us"] / us if us else None,
            "roofline_pct": roofline.percent(us and us * 1e-6, bytes_moved, flops),
            "config": str(tuned[0]) if tuned else None,
        }
    tuner.configs = all_configs
    kernel_utils.set_kernel_options(**EPILOGUE_VARIANTS["default"])
    restart_tuning()
    return row


def layer_weights(dev, dt):
    """LAYERS layers' projection weights and the head, bf16, scaled like trained weights."""
    layers = [
        [
            torch.randn(n_w, k, device=dev, dtype=dt) / k**0.5
            for _, n_w, k, _, _ in LAYER_PROJECTIONS
        ]
        for _ in range(LAYERS)
    ]
    return layers, torch.randn(HEAD_ROWS, HIDDEN, device=dev, dtype=dt) / HIDDEN**0.5


def _cublas_linear(x, w, activation, residual):
    y = F.linear(x, w)
    if activation == "silu_mul":
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y + residual if residual is not None else y


def _ours_linear(x, w, activation, residual):
    return matmul_module.matmul(x, w, activation=activation, residual=residual)


def decode_matmul_row(batch: int, layers, head, roofline: Roofline) -> dict:
    """The matmuls of LAYERS decode layers and the head at one batch: cuBLAS, ours with the
    decode table off and on."""
    dev, dt = "cuda", torch.bfloat16
    xs = {k: torch.randn(batch, k, device=dev, dtype=dt) for k in (HIDDEN, 14336)}
    h = torch.randn(batch, HIDDEN, device=dev, dtype=dt)

    def step(linear):
        for weights in layers:
            for (_, _, k, activation, residual), w in zip(LAYER_PROJECTIONS, weights, strict=True):
                linear(xs[k], w, activation, h if residual else None)
        linear(xs[HIDDEN], head, None, None)

    row = {"batch": batch, "cublas_us": bench_us(lambda: step(_cublas_linear))}
    for name, on in (("default", 0), ("decode_table", 1)):
        if on and matmul_module._m_bucket(batch) not in matmul_module._DECODE_CONFIGS:
            row[f"{name}_us"] = row["default_us"]  # the table does not cover this batch
            continue
        kernel_utils.set_kernel_options(matmul_decode_table=on)
        restart_tuning()
        row[f"{name}_us"] = attempt_us(
            f"decode matmuls batch {batch} {name}", lambda: step(_ours_linear)
        )
    kernel_utils.set_kernel_options(matmul_decode_table=0)
    restart_tuning()
    weights = LAYERS * sum(n_w * k for _, n_w, k, _, _ in LAYER_PROJECTIONS) + HEAD_ROWS * HIDDEN
    acts = LAYERS * batch * sum(k + n_w for _, n_w, k, _, _ in LAYER_PROJECTIONS)
    bytes_moved, flops = (weights + acts) * 2, 2 * batch * weights
    row["floor_us"] = 1e6 * roofline.floor_s(bytes_moved, flops)
    for name in ("cublas", "default", "decode_table"):
        us = row[f"{name}_us"]
        row[f"{name}_roofline_pct"] = roofline.percent(us and us * 1e-6, bytes_moved, flops)
    return row


def attention_step(q, caches, kv_end, out, num_splits: int | None) -> None:
    """Decode attention over each layer's cache ([2, B, Hkv, S, D]: keys, values) in turn."""
    for cache in caches:
        k, v = cache[0].transpose(1, 2), cache[1].transpose(1, 2)  # [B, S, Hkv, D] views
        decode_module.decode_attention(
            q, k, v, scale=HEAD_DIM**-0.5, kv_end=kv_end, num_splits=num_splits, out=out
        )


def decode_attention_row(batch: int, roofline: Roofline) -> dict:
    """Split-KV decode attention over NUM_LAYERS layers' caches at one batch: the default split,
    the table's, and fixed split counts."""
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(batch, 1, Q_HEADS, HEAD_DIM, device=dev, dtype=dt)
    caches = [
        torch.randn(2, batch, KV_HEADS, CACHE_SLOTS, HEAD_DIM, device=dev, dtype=dt)
        for _ in range(NUM_LAYERS)
    ]
    kv_end = torch.full((batch,), CONTEXT, dtype=torch.int32, device=dev)
    out = torch.empty_like(q)

    step = functools.partial(attention_step, q, caches, kv_end, out)

    block_n = decode_module._launch_config(HEAD_DIM, 2)[0]
    row = {"batch": batch}
    for name, on in (("default", 0), ("split_table", 1)):
        kernel_utils.set_kernel_options(decode_split_table=on)
        row[f"{name}_splits"] = decode_module._default_num_splits(
            batch, KV_HEADS, CACHE_SLOTS, block_n, q.device
        )
        row[f"{name}_us"] = attempt_us(f"decode attention batch {batch} {name}", lambda: step(None))
    kernel_utils.set_kernel_options(decode_split_table=0)
    for splits in FIXED_SPLITS:
        row[f"splits_{splits}_us"] = attempt_us(
            f"decode attention batch {batch} splits {splits}", lambda s=splits: step(s)
        )
    bytes_moved = NUM_LAYERS * 2 * batch * KV_HEADS * CONTEXT * HEAD_DIM * 2
    flops = NUM_LAYERS * 4 * batch * Q_HEADS * CONTEXT * HEAD_DIM
    row["floor_us"] = 1e6 * roofline.floor_s(bytes_moved, flops)
    for name in ("default", "split_table"):
        us = row[f"{name}_us"]
        row[f"{name}_roofline_pct"] = roofline.percent(us and us * 1e-6, bytes_moved, flops)
    return row


def _geomean(times) -> float:
    return math.exp(sum(map(math.log, times)) / len(times)) if all(times) else math.inf


def _total(rows: list[dict], name: str) -> float:
    times = [r[f"{name}_us"] for r in rows]
    return sum(times) if all(t is not None for t in times) else math.inf


def pick_decode_options(matmuls: list[dict], attentions: list[dict]) -> dict:
    """The decode tables that win (see the module docstring)."""
    covered = [
        r for r in matmuls if matmul_module._m_bucket(r["batch"]) in matmul_module._DECODE_CONFIGS
    ]
    return {
        "matmul_decode_table": int(
            _total(covered, "decode_table") < MARGIN * _total(covered, "default")
        ),
        "decode_split_table": int(
            _total(attentions, "split_table") < MARGIN * _total(attentions, "default")
        ),
    }


def pick_epilogue(epilogues: list[dict], variants: list[str]) -> dict:
    """The epilogue variant that wins (see the module docstring), as kernel options."""

    def geomean(name):
        return _geomean([r[name]["us"] for r in epilogues])

    best = min(variants, key=geomean)
    if geomean(best) > MARGIN * geomean("default"):
        best = "default"  # a choice other than today's must win by more than the timing noise
    return EPILOGUE_VARIANTS[best]


def write_options(path: str | None, options: dict) -> None:
    zoo_kernels = ",".join(f"{name}={value}" for name, value in options.items())
    print(f"\nwinning kernel options: ZOO_KERNELS={zoo_kernels}", flush=True)
    if path:
        Path(path).write_text(zoo_kernels + "\n")


def fmt_us(value) -> str:
    return f"{value:.1f}" if value is not None else "n/a"


def fmt_pct(value) -> str:
    return f"{value:.0f}%" if value is not None else "n/a"


def decode_tables(roofline: Roofline) -> tuple[list[dict], list[dict]]:
    """The decode matmuls (decode table off and on, cuBLAS) and the split-KV attention
    (split table off and on, fixed splits) at every batch of DECODE_BATCHES, printed."""
    layers, head = layer_weights("cuda", torch.bfloat16)
    matmuls = [decode_matmul_row(batch, layers, head, roofline) for batch in DECODE_BATCHES]
    del layers, head
    print(
        f"\nLlama-3-8B decode matmuls ({LAYERS} layers' qkv, o, gate-up + SiLU*up, down, then the "
        "head), us per call"
    )
    print("| batch | cuBLAS | ours default | ours decode table | floor | cuBLAS % | default % "
          "| table % |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in matmuls:
        print(
            f"| {r['batch']} | {fmt_us(r['cublas_us'])} | {fmt_us(r['default_us'])} "
            f"| {fmt_us(r['decode_table_us'])} | {r['floor_us']:.1f} "
            f"| {fmt_pct(r['cublas_roofline_pct'])} | {fmt_pct(r['default_roofline_pct'])} "
            f"| {fmt_pct(r['decode_table_roofline_pct'])} |"
        )

    torch.cuda.empty_cache()
    attentions = []
    for batch in DECODE_BATCHES:
        attentions.append(decode_attention_row(batch, roofline))
        torch.cuda.empty_cache()  # the batch's caches
    print(f"\nLlama-3-8B decode attention, {NUM_LAYERS} layers, context {CONTEXT}, us per step")
    print(
        "| batch | default (splits) | split table (splits) | "
        + " | ".join(f"{s} splits" for s in FIXED_SPLITS)
        + " | floor | default % | table % |"
    )
    print("| --- " * (6 + len(FIXED_SPLITS)) + "|")
    for r in attentions:
        fixed = " | ".join(fmt_us(r[f"splits_{s}_us"]) for s in FIXED_SPLITS)
        print(
            f"| {r['batch']} | {fmt_us(r['default_us'])} ({r['default_splits']}) "
            f"| {fmt_us(r['split_table_us'])} ({r['split_table_splits']}) | {fixed} "
            f"| {r['floor_us']:.1f} | {fmt_pct(r['default_roofline_pct'])} "
            f"| {fmt_pct(r['split_table_roofline_pct'])} |"
        )
    return matmuls, attentions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=4, help="configs each variant is tuned over")
    parser.add_argument("--out", default=None)
    parser.add_argument("--options-out", default=None, help="file for the ZOO_KERNELS string")
    parser.add_argument("--skip-decode", action="store_true", help="no decode tables")
    parser.add_argument(
        "--variants",
        default=",".join(EPILOGUE_VARIANTS),
        help="epilogue variants to measure, comma-separated (default: all)",
    )
    args = parser.parse_args()
    variants = ["default"] + [
        name for name in filter(None, args.variants.split(",")) if name != "default"
    ]
    unknown = [name for name in variants if name not in EPILOGUE_VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}, expected names of {list(EPILOGUE_VARIANTS)}")
    device = torch.cuda.get_device_name()
    roofline = Roofline.measure()
    print(f"{device}: {roofline.header()}; triton {triton.__version__}", flush=True)

    matmuls, attentions, decode_options = [], [], {}
    if not args.skip_decode:
        matmuls, attentions = decode_tables(roofline)
        # written now too: a variant that does not compile (or worse) below ends the run
        decode_options = pick_decode_options(matmuls, attentions)
        write_options(args.options_out, {**EPILOGUE_VARIANTS["default"], **decode_options})

    epilogues = [epilogue_row(case, roofline, args.top, variants) for case in EPILOGUE_CASES]
    print("\n| matmul + activation (bf16) | variant | us | cuBLAS matmul alone us | speed vs cuBLAS "
          "| % of roofline | config |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in epilogues:
        for name in variants:
            v = r[name]
            speed = f"{v['speed_vs_cublas']:.2f}x" if v["speed_vs_cublas"] else "n/a"
            print(
                f"| {r['case']} | {name} | {fmt_us(v['us'])} | {r['cublas_us']:.1f} | {speed} "
                f"| {fmt_pct(v['roofline_pct'])} | {v['config']} |"
            )

    options = {**pick_epilogue(epilogues, variants), **decode_options}
    write_options(args.options_out, options)
    if args.out:
        write_result(
            args.out,
            device,
            **roofline.limits(),
            epilogues=epilogues,
            decode_matmuls=matmuls,
            decode_attention=attentions,
            options=options,
        )


if __name__ == "__main__":
    main()
