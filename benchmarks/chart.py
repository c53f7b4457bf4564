"""Render the speedups in benchmarks/results/*.json (written by the bench_* scripts' --out) as a
bar chart PNG: ours vs HF eager and vs HF + torch.compile, per workload. Needs matplotlib.

    python benchmarks/chart.py --gpu nvidia-h200 --out benchmarks/results/nvidia-h200_speedups.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def workloads(gpu: str) -> list[tuple[str, float | None, float | None]]:
    """(label, speedup vs HF eager, speedup vs HF compile) of every stored result for this GPU."""
    found = []
    for path in sorted(RESULTS.glob(f"{gpu}_*_ours*.json")):
        result = json.loads(path.read_text())
        model = result.get("model", path.stem)
        for row in result.get("rows", [result]):
            # a forward's plain call where measured (bench_bert), else the graph numbers
            ours = (
                row.get("ours_call_ms")
                or row.get("ours_graph_ms_per_step")
                or row.get("ours_graph_ms")
            )
            eager = row.get("hf_eager_ms_per_step") or row.get("hf_eager_ms")
            compiled = row.get("hf_compile_ms_per_step") or row.get("hf_compile_ms")
            if ours is None or (eager is None and compiled is None):
                continue
            label = f"{model}\n{row.get('shape', '')}"
            found.append(
                (label, eager / ours if eager else None, compiled / ours if compiled else None)
            )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", default="nvidia-h200")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = workloads(args.gpu)
    if not rows:
        raise SystemExit(f"no results with HF peers for {args.gpu} in {RESULTS}")
    labels = [r[0] for r in rows]
    x = range(len(rows))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    for offset, index, name in (
        (-width / 2, 1, "vs HF eager"),
        (width / 2, 2, "vs HF + torch.compile"),
    ):
        values = [r[index] or 0 for r in rows]
        bars = ax.bar([i + offset for i in x], values, width, label=name)
        ax.bar_label(bars, labels=[f"{v:.2f}x" if v else "n/m" for v in values], fontsize=8)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("speedup (higher is better)")
    ax.set_title(f"triton-zoo vs HF transformers, bf16, {args.gpu}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.out or RESULTS / f"{args.gpu}_speedups.png")
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
