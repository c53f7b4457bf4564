"""Sliding-window attention on the GPU: prefill and decode with and without a window, at
Mistral-7B shapes (32 query heads, 8 kv heads, head dim 128, bf16, window 4096).

Windowed prefill skips the key blocks below the window, so at T = 16384 it should run near
window / (T / 2) of the full causal time; windowed decode scans window keys instead of the whole
cache. Each case runs in a CUDA graph (launch overhead does not count). SDPA (flash, full causal)
is the peer for the unwindowed prefill.

    PYTHONPATH=. python benchmarks/bench_window.py [--out results/window.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton.testing

from kernels.attention import attention
from kernels.decode import decode_attention

HQ, HKV, D, WINDOW = 32, 8, 128, 4096


def bench(fn) -> float:
    fn()  # compile and autotune outside the graph
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def prefill_row(batch: int, seq: int) -> dict:
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
    return row


def decode_row(batch: int, cache_len: int) -> dict:
    q = torch.randn(batch, 1, HQ, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, cache_len, HKV, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    kv_end = torch.full((batch,), cache_len, dtype=torch.int32, device="cuda")
    kw = dict(scale=D**-0.5, kv_end=kv_end)
    row = {"case": f"decode {batch}x{cache_len}"}
    row["ours_full_us"] = bench(lambda: decode_attention(q, k, v, **kw))
    row["ours_window_us"] = bench(lambda: decode_attention(q, k, v, **kw, window=WINDOW))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    rows = [prefill_row(b, t) for b, t in ((1, 4096), (1, 8192), (1, 16384), (4, 8192))]
    rows += [decode_row(b, s) for b, s in ((1, 4096), (1, 16384), (8, 16384), (32, 8192))]
    keys = ["sdpa_full_us", "ours_full_us", "ours_window_us"]
    print(f"{'case':<22}" + "".join(f"{k:>16}" for k in keys))
    for row in rows:
        print(f"{row['case']:<22}" + "".join(f"{row.get(k, float('nan')):>16.1f}" for k in keys))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"window": WINDOW, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
