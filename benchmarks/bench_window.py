"""Sliding-window attention on the GPU: prefill and decode with and without a window, at
Mistral-7B shapes (32 query heads, 8 kv heads, head dim 128, bf16, window 4096).

Windowed prefill skips the key blocks below the window, so at T = 16384 it should run near
window / (T / 2) of the full causal time; windowed decode scans window keys instead of the whole
cache. Each case runs in a CUDA graph (launch overhead does not count). SDPA (flash, full causal)
is the peer for the unwindowed prefill. Each case has its roofline floors, full and windowed:
the larger of the bytes (prefill: q, k, v and the output; decode: the keys and values scanned)
over the measured copy bandwidth and the FLOPs of the (query, key) pairs computed (QK^T and PV)
over the measured matmul rate, and each of our times as a % of its floor.

    PYTHONPATH=. python benchmarks/bench_window.py [--out results/window.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, str(Path(__file__).parent))
from common import Roofline  # noqa: E402

from kernels.attention import attention  # noqa: E402
from kernels.decode import decode_attention  # noqa: E402

HQ, HKV, D, WINDOW = 32, 8, 128, 4096


def bench(fn) -> float:
    fn()  # compile and autotune outside the graph
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def causal_pairs(seq: int, window: int | None) -> int:
    """(query, key) pairs of causal attention over seq tokens, each query seeing at most window keys."""
    if window is None or window >= seq:
        return seq * (seq + 1) // 2
    return window * (window + 1) // 2 + (seq - window) * window


def add_floors(row: dict, roofline: Roofline, bytes_full, bytes_window, pairs_full, pairs_window):
    """The row's floors (us) and our % of them; pairs are per (batch, query head)."""
    for name, bytes_moved, pairs in (
        ("full", bytes_full, pairs_full),
        ("window", bytes_window, pairs_window),
    ):
        flops = 4 * D * pairs  # QK^T and PV: 2 * D each per pair
        row[f"floor_{name}_us"] = 1e6 * roofline.floor_s(bytes_moved, flops)
        row[f"ours_{name}_roofline_pct"] = roofline.percent(
            row[f"ours_{name}_us"] * 1e-6, bytes_moved, flops
        )
    return row


def prefill_row(roofline: Roofline, batch: int, seq: int) -> dict:
    q = torch.randn(batch, seq, HQ, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, seq, HKV, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    scale = D**-0.5
    # SDPA's flash kernel gets the kv heads repeated (MHA), in its native [B, H, T, D] layout
    qt = q.transpose(1, 2).contiguous()
    kt, vt = (t.repeat_interleave(HQ // HKV, dim=2).transpose(1, 2).contiguous() for t in (k, v))
    row = {"case": f"prefill {batch}x{seq}"}
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        row["sdpa_full_us"] = bench(
            lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)
        )
    row["ours_full_us"] = bench(lambda: attention(q, k, v, causal=True, scale=scale))
    row["ours_window_us"] = bench(
        lambda: attention(q, k, v, causal=True, scale=scale, window=WINDOW)
    )
    bytes_moved = batch * seq * (2 * HQ + 2 * HKV) * D * q.element_size()  # q, o, k, v
    heads = batch * HQ
    return add_floors(row, roofline, bytes_moved, bytes_moved,
                      heads * causal_pairs(seq, None), heads * causal_pairs(seq, WINDOW))  # fmt: skip


def decode_row(roofline: Roofline, batch: int, cache_len: int) -> dict:
    q = torch.randn(batch, 1, HQ, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, cache_len, HKV, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    kv_end = torch.full((batch,), cache_len, dtype=torch.int32, device="cuda")
    kw = dict(scale=D**-0.5, kv_end=kv_end)
    row = {"case": f"decode {batch}x{cache_len}"}
    row["ours_full_us"] = bench(lambda: decode_attention(q, k, v, **kw))
    row["ours_window_us"] = bench(lambda: decode_attention(q, k, v, **kw, window=WINDOW))
    scanned = min(cache_len, WINDOW)
    kv_bytes = 2 * batch * HKV * D * k.element_size()  # per key position: its key and value
    heads = batch * HQ
    return add_floors(row, roofline, kv_bytes * cache_len, kv_bytes * scanned,
                      heads * cache_len, heads * scanned)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    roofline = Roofline.measure()
    print(roofline.header())
    cases = ((1, 4096), (1, 8192), (1, 16384), (4, 8192))
    rows = [prefill_row(roofline, b, t) for b, t in cases]
    rows += [decode_row(roofline, b, s) for b, s in ((1, 4096), (1, 16384), (8, 16384), (32, 8192))]
    keys = ["sdpa_full_us", "ours_full_us", "floor_full_us", "ours_window_us", "floor_window_us"]
    print(f"{'case':<22}" + "".join(f"{k:>16}" for k in keys) + f"{'full %':>10}{'window %':>10}")
    for row in rows:
        print(
            f"{row['case']:<22}"
            + "".join(f"{row.get(k, float('nan')):>16.1f}" for k in keys)
            + "".join(
                f"{row[k]:>9.0f}%" if row[k] is not None else f"{'n/a':>10}"
                for k in ("ours_full_roofline_pct", "ours_window_roofline_pct")
            )
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"window": WINDOW, **roofline.limits(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
