"""bf16 accuracy at real sizes: ours and HF transformers in bf16 against HF in fp32, same weights.

For each model: HF builds the real architecture with random weights in fp32 on the GPU (the
reference), a bf16 copy of it is HF's bf16 model and is saved with save_pretrained, and
`zoo.load` reads that checkpoint in bf16 (so ours and HF bf16 hold the same bf16 weights). All
three run the same random inputs; the outputs' relative error against the fp32 reference is
given in two norms (Frobenius: ||x - ref|| / ||ref||; max: max|x - ref| / max|ref|), with the
top-1 agreement of the logits. The target: ours no larger than 1.25x HF bf16's error.

    PYTHONPATH=. python benchmarks/accuracy.py --models llama3-8b,gpt2 [--out accuracy.json]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import tempfile
from pathlib import Path

import torch
from common import write_result

import zoo

MODELS = "llama3-8b,granite-3.3-2b-instruct,gpt2,bert-base-uncased,t5-base,flan-t5-base"
TARGET_RATIO = 1.25


def build_hf(name: str, device: str):
    import transformers

    entry = zoo.registry.get_entry(name)
    config = transformers.AutoConfig.for_model(**entry.config)
    kind = config.model_type
    if kind == "bert":
        auto = transformers.AutoModel
    elif kind == "t5":
        auto = transformers.AutoModelForSeq2SeqLM
    else:
        auto = transformers.AutoModelForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = auto.from_config(config, dtype=torch.float32)
    return model.eval(), kind


def outputs(kind: str, model, inputs: dict, ours: bool) -> dict[str, torch.Tensor]:
    """name -> output tensor, for HF and ours alike."""
    if kind == "bert":
        out = model(**inputs)
        return {"last hidden state": out.last_hidden_state, "pooler": out.pooler_output}
    if kind == "t5":
        if ours:
            logits = model(
                inputs["input_ids"], inputs["decoder_input_ids"], inputs["attention_mask"]
            )
        else:
            logits = model(**inputs).logits
        return {"logits": logits}
    logits = model(inputs["input_ids"]) if ours else model(**inputs).logits
    return {"logits": logits}


def make_inputs(kind: str, vocab: int, batch: int, seq: int, device: str) -> dict:
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    if kind == "bert":
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=ids % 2)
    if kind == "t5":
        decoder = torch.randint(0, vocab, (batch, seq // 4), device=device)
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=decoder)
    return dict(input_ids=ids)


def relative_errors(x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    diff = x.double() - ref
    return {
        "frobenius": (diff.norm() / ref.norm()).item(),
        "max": (diff.abs().max() / ref.abs().max()).item(),
    }


def measure(name: str, batch: int, seq: int, folder: Path, device: str) -> list[dict]:
    hf_fp32, kind = build_hf(name, device)
    hf_bf16 = copy.deepcopy(hf_fp32).to(torch.bfloat16)
    hf_bf16.save_pretrained(folder, max_shard_size="5GB")
    ours = zoo.load(folder, device=device, dtype=torch.bfloat16)
    inputs = make_inputs(kind, hf_fp32.config.vocab_size, batch, seq, device)
    with torch.inference_mode():
        reference = outputs(kind, hf_fp32, inputs, ours=False)
        reference = {k: v.double() for k, v in reference.items()}
        del hf_fp32
        gc.collect()
        theirs = outputs(kind, hf_bf16, inputs, ours=False)
        mine = outputs(kind, ours, inputs, ours=True)
    rows = []
    for what, ref in reference.items():
        row = {"model": name, "output": what, "shape": f"{batch}x{seq}"}
        for who, result in (("ours", mine[what]), ("hf_bf16", theirs[what])):
            for norm, value in relative_errors(result, ref).items():
                row[f"{who}_{norm}"] = value
            if what == "logits":
                agree = (result.argmax(-1) == ref.argmax(-1)).float().mean().item()
                row[f"{who}_top1"] = agree
        row["ratio_frobenius"] = row["ours_frobenius"] / row["hf_bf16_frobenius"]
        row["ratio_max"] = row["ours_max"] / row["hf_bf16_max"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument(
        "--device", default="cuda", help="cpu (with TRITON_INTERPRET=1) only checks the script"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    on_gpu = args.device == "cuda"

    rows = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix=f"zoo-accuracy-{name}-") as folder:
            rows += measure(name, args.batch, args.seq, Path(folder), args.device)
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()

    device = torch.cuda.get_device_name() if on_gpu else args.device
    print(f"\nbf16 relative error against HF fp32 on {device} (lower is better)")
    print(
        "| model | output | ours (Frobenius) | HF bf16 (Frobenius) | ratio | ours (max) "
        "| HF bf16 (max) | ratio | top-1 ours / HF |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        top1 = f"{r['ours_top1']:.3f} / {r['hf_bf16_top1']:.3f}" if "ours_top1" in r else "n/a"
        print(
            f"| {r['model']} | {r['output']} | {r['ours_frobenius']:.2e} "
            f"| {r['hf_bf16_frobenius']:.2e} | {r['ratio_frobenius']:.2f} | {r['ours_max']:.2e} "
            f"| {r['hf_bf16_max']:.2e} | {r['ratio_max']:.2f} | {top1} |"
        )
    over = [r for r in rows if r["ratio_frobenius"] > TARGET_RATIO]
    print(
        f"\n{len(rows) - len(over)} of {len(rows)} outputs within {TARGET_RATIO}x HF bf16's "
        "error (Frobenius norm)"
    )
    if args.out:
        write_result(args.out, device, rows=rows)


if __name__ == "__main__":
    main()
