"""bf16 accuracy at real sizes: ours and HF transformers in bf16 against HF in fp32, same weights.

For each model: HF builds the real architecture with random weights in fp32 on the GPU (the
reference), a bf16 copy of it is HF's bf16 model and is saved with save_pretrained, and
`zoo.load` reads that checkpoint in bf16 (so ours and HF bf16 hold the same bf16 weights). All
three run the same random inputs; the outputs' relative error against the fp32 reference is
given in two norms (Frobenius: ||x - ref|| / ||ref||; max: max|x - ref| / max|ref|), with the
top-1 agreement of the logits. The target: ours no larger than 1.25x HF bf16's error.

    PYTHONPATH=. python benchmarks/accuracy.py --models llama3-8b,gpt2 [--out accuracy.json]

`--fp8` adds ours with FP8 weights (`quantize="fp8"` on the same bf16 checkpoint): its error
against HF fp32 and top-1 beside bf16's, and its error against a torch reference that holds the
same FP8 weights dequantized to fp32 (HF fp32 with each quantized Linear's weight replaced), which
the target wants within HF bf16's error. Above 64 tokens per call our FP8 path also rounds the
activations to FP8 (per token), which the dequantized reference does not: rows "FP8 weights only"
run a 1 x 48 input (below that), "FP8 weights and inputs" the large one.
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


def measure(name: str, batch: int, seq: int, folder: Path, device: str, fp8: bool) -> list[dict]:
    hf_fp32, kind = build_hf(name, device)
    hf_bf16 = copy.deepcopy(hf_fp32).to(torch.bfloat16)
    hf_bf16.save_pretrained(folder, max_shard_size="5GB")
    ours = zoo.load(folder, device=device, dtype=torch.bfloat16)
    inputs = make_inputs(kind, hf_fp32.config.vocab_size, batch, seq, device)
    fp8_rows = []
    with torch.inference_mode():
        reference = outputs(kind, hf_fp32, inputs, ours=False)
        reference = {k: v.double() for k, v in reference.items()}
        theirs = outputs(kind, hf_bf16, inputs, ours=False)
        if fp8:
            fp8_rows = measure_fp8(
                name, kind, hf_fp32, hf_bf16, folder, inputs, reference, theirs, device
            )
        del hf_fp32
        gc.collect()
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
    return rows + fp8_rows


def quantized_linears(model) -> dict[str, torch.nn.Module]:
    """The HF modules our quantize="fp8" turns into FP8 Linears: every Linear (GPT-2: Conv1D)
    but the LM head."""
    import transformers

    kinds = (torch.nn.Linear, transformers.pytorch_utils.Conv1D)
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, kinds) and not name.endswith("lm_head")
    }


def dequantize_linears_(model) -> None:
    """Each quantized Linear's weight replaced by its FP8 weight (quantized per output row from
    the bf16 checkpoint's values, as zoo.load does) dequantized to fp32."""
    import transformers

    from convert.fp8 import dequantize_rows, quantize_rows

    for module in quantized_linears(model).values():
        transposed = isinstance(module, transformers.pytorch_utils.Conv1D)  # stored (in, out)
        weight = module.weight.data.to(torch.bfloat16)
        weight = weight.T if transposed else weight
        dequantized = dequantize_rows(*quantize_rows(weight))
        module.weight.data.copy_(dequantized.T if transposed else dequantized)


def measure_fp8(
    name, kind, hf_fp32, hf_bf16, folder, inputs, reference, theirs, device
) -> list[dict]:
    """Rows of ours with FP8 weights: the large input (FP8 activations too) and a 1 x 48 one
    (FP8 weights only), against HF fp32 beside HF bf16, and against the dequantized reference.
    Modifies hf_fp32's weights (the caller is done with it)."""
    fp8_model = zoo.load(folder, device=device, dtype=torch.bfloat16, quantize="fp8")
    small = make_inputs(kind, hf_fp32.config.vocab_size, 1, 48, device)
    cases = {"FP8 weights and inputs": (inputs, reference, theirs)}
    small_reference = {k: v.double() for k, v in outputs(kind, hf_fp32, small, False).items()}
    small_theirs = outputs(kind, hf_bf16, small, False)
    cases["FP8 weights only"] = (small, small_reference, small_theirs)
    dequantize_linears_(hf_fp32)
    rows = []
    for case, (case_inputs, ref, hf_bf16_out) in cases.items():
        mine = outputs(kind, fp8_model, case_inputs, ours=True)
        dequantized = outputs(kind, hf_fp32, case_inputs, ours=False)
        shape = "x".join(str(d) for d in case_inputs["input_ids"].shape)
        for what, result in mine.items():
            row = {"model": name, "output": f"{what} ({case})", "shape": shape}
            for norm, value in relative_errors(result, ref[what]).items():
                row[f"fp8_{norm}"] = value
            for norm, value in relative_errors(hf_bf16_out[what], ref[what]).items():
                row[f"hf_bf16_{norm}"] = value
            deq = dequantized[what].double()
            for norm, value in relative_errors(result, deq).items():
                row[f"fp8_vs_dequantized_{norm}"] = value
            if what == "logits":
                row["fp8_top1"] = (result.argmax(-1) == ref[what].argmax(-1)).float().mean().item()
                row["hf_bf16_top1"] = (
                    (hf_bf16_out[what].argmax(-1) == ref[what].argmax(-1)).float().mean().item()
                )
            row["ratio_dequantized_frobenius"] = (
                row["fp8_vs_dequantized_frobenius"] / row["hf_bf16_frobenius"]
            )
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
    parser.add_argument("--fp8", action="store_true", help="also ours with FP8 weights")
    args = parser.parse_args()
    on_gpu = args.device == "cuda"

    rows = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix=f"zoo-accuracy-{name}-") as folder:
            rows += measure(name, args.batch, args.seq, Path(folder), args.device, args.fp8)
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
    fp8_rows = [r for r in rows if "fp8_frobenius" in r]
    rows = [r for r in rows if "fp8_frobenius" not in r]
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
    if fp8_rows:
        print_fp8(fp8_rows, device)
    if args.out:
        write_result(args.out, device, rows=rows + fp8_rows)


def print_fp8(rows: list[dict], device: str) -> None:
    print(f"\nFP8 weights (ours) on {device}: relative error, Frobenius norm (lower is better)")
    print(
        "| model | output | shape | FP8 vs HF fp32 | HF bf16 vs HF fp32 | top-1 FP8 / HF bf16 "
        "| FP8 vs dequantized fp32 | ratio to HF bf16 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        top1 = f"{r['fp8_top1']:.3f} / {r['hf_bf16_top1']:.3f}" if "fp8_top1" in r else "n/a"
        print(
            f"| {r['model']} | {r['output']} | {r['shape']} | {r['fp8_frobenius']:.2e} "
            f"| {r['hf_bf16_frobenius']:.2e} | {top1} | {r['fp8_vs_dequantized_frobenius']:.2e} "
            f"| {r['ratio_dequantized_frobenius']:.2f} |"
        )


if __name__ == "__main__":
    main()
