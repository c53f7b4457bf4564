"""The `zoo` console command.

    zoo list
    zoo generate llama3.2-1b-instruct --prompt "The capital of France is"
    zoo generate /path/to/hf/checkpoint --prompt "Once upon a time" --do-sample --temperature 0.8 --top-p 0.95 --seed 0
    zoo generate llama3.2-1b-instruct --chat --prompt "Name three prime numbers."

`generate` loads the checkpoint (a progress bar on stderr while the weights load), streams the new
text to stdout as it is produced, and ends with a tokens/s line on stderr. Also `python -m zoo.cli`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

DTYPES = ("float32", "float16", "bfloat16")


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:  # e.g. `zoo list | head`
        sys.stdout = open(os.devnull, "w")  # no second error when Python flushes at exit
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zoo", description="Llama 3, Granite, GPT-2, Bert and T5 on our Triton kernels"
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    listing = commands.add_parser("list", help="the registry's model names and their HF repos")
    listing.set_defaults(run=_list)

    gen = commands.add_parser("generate", help="stream a continuation (or a chat reply)")
    gen.set_defaults(run=_generate)
    gen.add_argument("model", metavar="NAME_OR_PATH", help="registry name or checkpoint folder")
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument(
        "--chat", action="store_true", help="send the prompt as a user message (chat template)"
    )
    gen.add_argument("--system", help="with --chat: a system message first")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    add_sampling_arguments(gen)
    gen.add_argument("--stop", action="append", help="stop string (repeat for more)")
    gen.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    gen.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on GPU")
    return parser


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The sampling flags of `generate` (shared with the examples)."""
    parser.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)


def sampling_options(args: argparse.Namespace) -> dict:
    """The keywords of model.generate / model.chat that add_sampling_arguments' flags set."""
    return dict(
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def _list(args: argparse.Namespace) -> int:
    from zoo.registry import get_entry, list_models

    names = list_models()
    width = max(len(name) for name in names)
    for name in names:
        print(f"{name:<{width}}  {get_entry(name).repo_id}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not device.startswith("cuda") and "TRITON_INTERPRET" not in os.environ:
        # no GPU: the kernels run through Triton's interpreter (set before triton is imported)
        os.environ["TRITON_INTERPRET"] = "1"
        print("zoo: running on the CPU through Triton's interpreter (slow)", file=sys.stderr)

    import zoo

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = zoo.load(args.model, device=device, dtype=dtype, progress=progress_bar())
    if model.tokenizer is None:
        print(f"zoo: {args.model}: no tokenizer.json beside the checkpoint", file=sys.stderr)
        return 2
    from zoo.models.contract import DecoderOnlyLM

    if not isinstance(model, DecoderOnlyLM):
        print(f"zoo: {args.model}: not a decoder-only language model", file=sys.stderr)
        return 2
    sampling = dict(
        max_new_tokens=args.max_new_tokens, stop=args.stop, stream=True, **sampling_options(args)
    )
    start = time.perf_counter()
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": args.prompt})
        stream = model.chat(messages, **sampling)
    else:
        print(args.prompt, end="", flush=True)
        stream = model.generate(args.prompt, **sampling)
    for piece in stream:
        print(piece, end="", flush=True)
    print()
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    count = len(stream.tokens)
    print(
        f"[{count} tokens in {seconds:.2f} s: {count / seconds:.1f} tokens/s, prefill included]",
        file=sys.stderr,
    )
    return 0


def progress_bar(
    label: str = "loading weights", out: TextIO | None = None, width: int = 30
) -> Callable[[int, int], None]:
    """A progress(done, total) callback drawing a one-line bar on stderr (redrawn in place on a
    terminal; elsewhere only the last state is written)."""
    out = out or sys.stderr
    live = out.isatty()
    drawn = -1

    def update(done: int, total: int) -> None:
        nonlocal drawn
        filled = width * done // max(total, 1)
        if done < total and (not live or filled == drawn):
            return
        drawn = filled
        bar = "#" * filled + "." * (width - filled)
        start = "\r" if live else ""
        end = "\n" if done >= total else ""
        out.write(f"{start}{label} [{bar}] {done}/{total} tensors{end}")
        out.flush()

    return update


if __name__ == "__main__":
    sys.exit(main())
