"""Generate text with a zoo decoder (Llama 3, Granite, GPT-2).

    python examples/generate.py --model llama3.2-1b-instruct --prompt "The capital of France is"
    python examples/generate.py --model /path/to/hf/checkpoint --prompt "..." --max-new-tokens 64
"""

import argparse
import time

import torch

import zoo


def main() -> None:
    parser = argparse.ArgumentParser(description="Greedy text generation with a zoo model")
    parser.add_argument("--model", default="llama3.2-1b-instruct", help="registry name or folder")
    parser.add_argument("--prompt", action="append", help="prompt (repeat for a batch)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    model = zoo.load(args.model, device=args.device)
    prompts = args.prompt or ["The three laws of thermodynamics are"]
    start = time.perf_counter()
    texts = model.generate(prompts, max_new_tokens=args.max_new_tokens)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    for prompt, text in zip(prompts, texts, strict=True):
        print(f"{prompt}{text}\n")
    print(f"[{args.max_new_tokens} new tokens x {len(prompts)} prompts in {seconds:.2f} s]")


if __name__ == "__main__":
    main()
