"""Translate or summarize with T5 / Flan-T5 on our kernels (greedy, the checkpoint's tokenizer).

    python examples/translate.py --model t5-small --text "translate English to German: The house is wonderful."
    python examples/translate.py --model flan-t5-base --text "summarize: ..." --max-new-tokens 64
    python examples/translate.py --model /path/to/hf/t5/checkpoint --text "..." --text "..."

T5 v1.0 checkpoints were trained on task prefixes ("translate English to German: ",
"summarize: "); Flan-T5 also follows plain instructions ("Translate to German: ...").
"""

import argparse
import sys
import time

import torch

import zoo
from zoo.cli import int_at_least, run_reporting_errors


def main() -> None:
    parser = argparse.ArgumentParser(description="Greedy translation / summarization with T5")
    parser.add_argument(
        "--model",
        default="t5-small",
        help="registry name, HF repo id (org/name) or checkpoint folder",
    )
    parser.add_argument("--text", action="append", help="input text (repeat for a batch)")
    parser.add_argument("--max-new-tokens", type=int_at_least(1), default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--quantize", choices=["fp8"], default=None, help="fp8: FP8 weights for the Linears"
    )
    args = parser.parse_args()

    model = zoo.load(args.model, device=args.device, quantize=args.quantize)
    if model.tokenizer is None:
        parser.error(f"{args.model}: no tokenizer.json beside the checkpoint")
    texts = args.text or [
        "translate English to German: The house is wonderful.",
        "translate English to French: The weather is nice today.",
    ]
    start = time.perf_counter()
    outputs = model.generate(texts, max_new_tokens=args.max_new_tokens)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    for text, output in zip(texts, outputs, strict=True):
        print(f"{text}\n  -> {output}\n")
    print(f"[{len(texts)} inputs, up to {args.max_new_tokens} new tokens each, in {seconds:.2f} s]")


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main, "translate.py"))
