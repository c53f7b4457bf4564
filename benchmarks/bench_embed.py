"""Sentence embeddings over texts of mixed lengths on the GPU: ours vs HF transformers, texts/s.

The workload examples/embed.py runs, at scale: 2048 texts whose lengths are uniform in 8..256
tokens (seed 0), in batches of 32 in their order, each right-padded to its longest text; each
batch goes to the GPU, through the plain call `model(ids, attention_mask=mask,
token_type_ids=types)` and the mean pooling + L2 normalisation of embed.py. Random weights at
the real architecture (`zoo.load(name, pretrained=False)`, bf16) and random token ids (no
tokenizer: tokenizing costs the same for every provider and is left out).

Ours: one call of a small batch first (kernel compilation), then the first pass over the texts
(autotuning and CUDA graph captures of new shapes, where the plain call captures), then steady
passes; each is reported separately. HF peers, the same passes: eager (SDPA attention) and
torch.compile(dynamic=True) (its first pass compiles). `--peers` measures them into
benchmarks/results/<gpu>_embed_hf_peers.json; later runs read that file.

The roofline floor of a pass: for each batch the larger of its bytes (the weights read once, the
gathered embedding rows) over the measured copy bandwidth and the FLOPs of its real tokens alone
(each text's projections and its own attention, no padding) over the measured matmul rate,
summed over the batches; each provider's steady pass is given as a % of that floor.

    PYTHONPATH=. python benchmarks/bench_embed.py --model bert-base-uncased [--peers]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_bert import flops  # noqa: E402
from common import (  # noqa: E402
    RESULTS,
    Roofline,
    attempt,
    fmt,
    gpu_tag,
    load_peers,
    ratio,
    weight_bytes,
    write_result,
)

import zoo  # noqa: E402
from zoo.layers import packed_tokens  # noqa: E402

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def mixed_batches(
    texts: int,
    low: int,
    high: int,
    batch_size: int,
    vocab_size: int,
    pad_id: int = 0,
    seed: int = 0,
) -> list[Batch]:
    """(ids, attention mask, token types) on the CPU, int64, of texts whose lengths are uniform
    in [low, high], cut into batches of batch_size in order, each right-padded to its longest."""
    if not 1 <= low <= high:
        raise ValueError(f"lengths: need 1 <= low <= high, got {low}..{high}")
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (texts,), generator=generator)
    batches = []
    for start in range(0, texts, batch_size):
        rows = lengths[start : start + batch_size]
        width = int(rows.max())
        mask = (torch.arange(width) < rows[:, None]).long()  # (B, T): ones, then zeros
        tokens = torch.randint(1, vocab_size, (len(rows), width), generator=generator)
        ids = torch.where(mask.bool(), tokens, pad_id)
        batches.append((ids, mask, torch.zeros_like(ids)))
    return batches


def pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """embed.py's embeddings: the mean over the real tokens, L2-normalised (fp32)."""
    weights = mask.unsqueeze(-1).float()  # (B, T, 1): padded positions count for nothing
    mean = (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return F.normalize(mean, dim=-1)


def embed_all(forward, batches: list[Batch]) -> list[torch.Tensor]:
    """Every batch to the GPU, through forward(ids, mask, types) -> last hidden state, pooled."""
    out = []
    for ids, mask, types in batches:
        ids, mask, types = (t.to("cuda") for t in (ids, mask, types))
        out.append(pool(forward(ids, mask, types), mask))
    return out


def pass_seconds(forward, batches: list[Batch]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    embed_all(forward, batches)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def passes(forward, batches: list[Batch], steady: int) -> dict:
    """Seconds of the first pass and the median of `steady` passes after it."""
    first = pass_seconds(forward, batches)
    times = sorted(pass_seconds(forward, batches) for _ in range(steady))
    return {"first_pass_s": first, "steady_pass_s": times[len(times) // 2]}


def workload_key(args) -> str:
    return f"{args.model} {args.texts} texts {args.low}..{args.high} batch {args.batch} seed {args.seed}"


def bench_peers(args, batches: list[Batch], save) -> dict:
    import transformers

    entry = zoo.registry.get_entry(args.model)
    config = transformers.BertConfig(**entry.config)
    with torch.device("cuda"):
        model = transformers.BertModel(config).to(torch.bfloat16).eval()
    compiled = torch.compile(model, dynamic=True)
    row = {}
    result = {"transformers": transformers.__version__, "rows": {workload_key(args): row}}
    with torch.inference_mode():
        for provider, module in (("hf_eager", model), ("hf_compile_dynamic", compiled)):

            def forward(ids, mask, types, module=module):
                return module(
                    input_ids=ids, attention_mask=mask, token_type_ids=types
                ).last_hidden_state

            timing = attempt(
                provider, lambda forward=forward: passes(forward, batches, args.steady)
            )
            if timing is not None:
                row.update({f"{provider}_{k}": v for k, v in timing.items()})
            save(result)
            print(f"  {provider}: {json.dumps(timing)}", flush=True)
    return result


def token_counts(batches: list[Batch]) -> dict:
    """The workload's real and padded tokens, and what our calls run: how many batches go packed
    (zoo.layers.packed_tokens, the plain call's own decision) and their tokens then."""
    real = padded = run = packed_batches = 0
    for ids, mask, _ in batches:
        batch, seq = ids.shape
        tokens = packed_tokens(batch, seq, int(mask.sum()))
        real, padded = real + int(mask.sum()), padded + batch * seq
        run += batch * seq if tokens is None else tokens
        packed_batches += tokens is not None
    return dict(real=real, padded=padded, ours_run=run, packed_batches=packed_batches)


def pass_floor(roofline: Roofline, model, batches: list[Batch]) -> dict:
    """The roofline floor of one pass over the batches (module docstring): seconds, and the
    seconds each limit alone would take."""
    memory_s = compute_s = floor_s = 0.0
    for _, mask, _ in batches:
        lengths = mask.sum(1).tolist()
        bytes_moved = weight_bytes(model, sum(lengths))
        work = sum(flops(model.config, 1, length) for length in lengths)
        memory_s += bytes_moved / roofline.copy_Bps
        compute_s += work / roofline.matmul_flops
        floor_s += roofline.floor_s(bytes_moved, work)
    return {"floor_pass_s": floor_s, "memory_s": memory_s, "compute_s": compute_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bert-base-uncased")
    parser.add_argument("--texts", type=int, default=2048)
    parser.add_argument("--low", type=int, default=8, help="shortest text, tokens")
    parser.add_argument("--high", type=int, default=256, help="longest text, tokens")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steady", type=int, default=3, help="passes after the first (median)")
    parser.add_argument("--peers", action="store_true", help="measure HF peers (minutes)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    device = torch.cuda.get_device_name()
    model = zoo.load(args.model, pretrained=False, device="cuda", dtype=torch.bfloat16)
    batches = mixed_batches(
        args.texts,
        args.low,
        args.high,
        args.batch,
        model.config.vocab_size,
        pad_id=model.config.pad_token_id or 0,
        seed=args.seed,
    )
    widths = sorted({ids.shape[1] for ids, _, _ in batches})
    tokens = token_counts(batches)
    print(
        f"{device}: {args.model}, {args.texts} texts of {args.low}..{args.high} tokens, "
        f"{len(batches)} batches of {args.batch}, {len(widths)} padded widths "
        f"{widths[0]}..{widths[-1]}; {json.dumps(tokens)}"
    )

    def measure_peers(save):
        result = bench_peers(args, batches, save)
        gc.collect()  # the HF model is gone with bench_peers' frame
        torch.cuda.empty_cache()
        return result

    peers_path = RESULTS / f"{gpu_tag()}_embed_hf_peers.json"
    peers = load_peers(peers_path, measure_peers if args.peers else None)
    peer_row = peers.get("rows", {}).get(workload_key(args), {})

    def forward(ids, mask, types):
        return model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state

    with torch.inference_mode():
        ids, mask, types = (t.to("cuda") for t in batches[0])
        torch.cuda.synchronize()
        start = time.perf_counter()
        forward(ids[:1, :8], mask[:1, :8], types[:1, :8])  # compiles the kernels
        torch.cuda.synchronize()
        warmup_s = time.perf_counter() - start
        ours = passes(forward, batches, args.steady)

    def texts_per_s(seconds: float | None) -> float | None:
        return args.texts / seconds if seconds else None

    roofline = Roofline.measure()
    floor = pass_floor(roofline, model, batches)

    providers = {
        "ours": ours,
        "hf_eager": {
            k[len("hf_eager_") :]: v for k, v in peer_row.items() if k.startswith("hf_eager_")
        },
        "hf_compile_dynamic": {
            k[len("hf_compile_dynamic_") :]: v
            for k, v in peer_row.items()
            if k.startswith("hf_compile_dynamic_")
        },
    }
    rows = []
    for name, timing in providers.items():
        rows.append(
            {
                "provider": name,
                **timing,
                "steady_texts_per_s": texts_per_s(timing.get("steady_pass_s")),
                "first_pass_texts_per_s": texts_per_s(timing.get("first_pass_s")),
                "roofline_pct": 100 * floor["floor_pass_s"] / timing["steady_pass_s"]
                if timing.get("steady_pass_s")
                else None,
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    steady = {r["provider"]: r["steady_texts_per_s"] for r in rows}
    print(f"\n{workload_key(args)} on {device}, bf16 (higher texts/s is better)")
    print(roofline.header())
    print(
        "| provider | steady texts/s | steady pass s | first pass s | ours vs this (steady) "
        "| % of roofline (steady) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        pct = r["roofline_pct"]
        print(
            f"| {r['provider']} | {fmt(r['steady_texts_per_s'], 0)} | {fmt(r.get('steady_pass_s'), 3)} "
            f"| {fmt(r.get('first_pass_s'), 2)} | {ratio(steady['ours'], r['steady_texts_per_s'])} "
            f"| {f'{pct:.0f}%' if pct is not None else 'n/a'} |"
        )
    bound = "compute" if floor["compute_s"] >= floor["memory_s"] else "memory"
    print(
        f"| roofline floor | {args.texts / floor['floor_pass_s']:.0f} | "
        f"{floor['floor_pass_s']:.3f} ({bound}: FLOPs of the real tokens "
        f"{floor['compute_s']:.3f} s, bytes {floor['memory_s']:.3f} s) | | | 100% |"
    )
    print(f"\nours: first call (kernel compilation) {warmup_s:.1f} s before the first pass")
    if args.out:
        write_result(
            args.out,
            device,
            model=args.model,
            workload=workload_key(args),
            padded_widths=widths,
            tokens=tokens,
            **roofline.limits(),
            roofline_floor=floor,
            ours_warmup_s=warmup_s,
            rows=rows,
        )


if __name__ == "__main__":
    main()
