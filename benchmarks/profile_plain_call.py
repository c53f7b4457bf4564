"""Where a Bert plain call's time beyond its GPU work goes.

For each shape: the plain call `model(ids, attention_mask=mask)` timed synced (median wall clock,
the GPU idle before each call), then ten synced calls under torch.profiler with the host's ops and
the GPU's kernels: the host ops' table (a device-to-host copy's time includes its wait for the GPU:
the value checks read back after the replay wait for the whole graph) and the GPU kernel time per
call. Random weights at the real architecture, bf16, full rows.

    PYTHONPATH=. python benchmarks/profile_plain_call.py [--shapes 1x512,8x128,32x128,8x512]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from common import wall_ms  # noqa: E402

import zoo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bert-base-uncased")
    parser.add_argument("--shapes", default="1x512,8x128,32x128,8x512", help="batch x seq, ...")
    args = parser.parse_args()
    model = zoo.load(args.model, pretrained=False, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        for shape in args.shapes.split(","):
            batch, seq = map(int, shape.split("x"))
            ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
            mask = torch.ones_like(ids)

            def plain(ids=ids, mask=mask):
                return model(ids, attention_mask=mask)

            # warm-up calls first: compilation, autotuning, capture
            median = wall_ms(plain, warmup=20, repeats=50)
            print(f"\n== {batch}x{seq}: plain call synced median {median:.3f} ms")
            calls = 10
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    plain()
                    torch.cuda.synchronize()
            print(
                prof.key_averages().table(
                    sort_by="cpu_time_total", row_limit=22, max_name_column_width=50
                )
            )
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            gpu_ms = sum(e.device_time for e in kernels) / calls / 1e3
            print(f"GPU kernel time per call {gpu_ms:.3f} ms")


if __name__ == "__main__":
    main()
