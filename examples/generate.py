"""Generate text with a zoo decoder (Llama 3, Granite, GPT-2).

    python examples/generate.py --model granite-3.3-2b-instruct --prompt "The capital of France is"
    python examples/generate.py --model /path/to/hf/checkpoint --prompt "..." --max-new-tokens 64
    python examples/generate.py --prompt "Once upon a time" --stream --do-sample --temperature 0.8 --top-p 0.95 --seed 0
    python examples/generate.py --prompt "A" --prompt "B" --stop "."          # a batch, each row cut at "."

Greedy unless --do-sample. One prompt with --stream prints the text as it is produced; several
prompts run as one left-padded batch (each row stops at its own EOS or stop string).

Tensor parallel over several GPUs (Llama, Granite, Mistral, Qwen, GPT-2; the first rank prints):
    torchrun --nproc-per-node 2 examples/generate.py --model llama3-70b-instruct --stream
"""

import argparse
import sys
import time

import torch

import zoo
from zoo.cli import (
    add_sampling_arguments,
    int_at_least,
    launched_ranks,
    run_reporting_errors,
    sampling_options,
)


def main() -> None:
    parser = argparse.ArgumentParser(description="Text generation with a zoo model")
    parser.add_argument(
        "--model",
        default="granite-3.3-2b-instruct",
        help="registry name, HF repo id (org/name) or checkpoint folder",
    )
    parser.add_argument("--prompt", action="append", help="prompt (repeat for a batch)")
    parser.add_argument("--max-new-tokens", type=int_at_least(1), default=64)
    parser.add_argument("--stream", action="store_true", help="print text as it is produced")
    add_sampling_arguments(parser)
    parser.add_argument("--stop", action="append", help="stop string (repeat for more)")
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--quantize", choices=["fp8"], default=None, help="fp8: FP8 weights for the Linears"
    )
    args = parser.parse_args()

    rank, world = launched_ranks()  # under torchrun: tensor parallel over its processes
    model = zoo.load(args.model, device=args.device, tp=world, quantize=args.quantize)
    show = print if rank == 0 else lambda *a, **k: None
    prompts = args.prompt or ["The three laws of thermodynamics are"]
    if args.stream and len(prompts) > 1:
        parser.error("--stream takes one --prompt")
    options = dict(max_new_tokens=args.max_new_tokens, stop=args.stop, **sampling_options(args))
    start = time.perf_counter()
    if args.stream:
        show(prompts[0], end="", flush=True)
        stream = model.generate(prompts[0], stream=True, **options)
        for piece in stream:
            show(piece, end="", flush=True)
        show("\n")
        texts = None
    else:
        texts = model.generate(prompts, **options)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if texts is not None:
        for prompt, text in zip(prompts, texts, strict=True):
            show(f"{prompt}{text}\n")
        show(
            f"[up to {args.max_new_tokens} new tokens x {len(prompts)} prompts in {seconds:.2f} s]"
        )
    else:
        count = len(stream.tokens)
        show(f"[{count} new tokens in {seconds:.2f} s: {count / seconds:.1f} tokens/s]")
    if world > 1:  # graphs and symmetric memory released, then the process group zoo.load started
        from zoo.parallel import end_started_group

        end_started_group()


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main, "generate.py"))
