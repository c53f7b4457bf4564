"""Chat with an instruct model in the terminal, the reply streamed as it is produced.

    python examples/chat.py                                   # granite-3.3-2b-instruct
    python examples/chat.py --model granite-3.3-2b-instruct --system "You are terse."
    python examples/chat.py --model /path/to/hf/checkpoint --do-sample --temperature 0.7 --top-p 0.9

The conversation is rendered with the checkpoint's own chat template (as transformers'
apply_chat_template renders it) and each reply ends at the model's end-of-turn token. Commands:
/reset starts over, /quit (or Ctrl-D) leaves.

Tensor parallel over several GPUs (a decoder; the first rank reads and prints):
    torchrun --nproc-per-node 2 examples/chat.py --model llama3-70b-instruct
"""

import argparse
import sys

import zoo
from zoo.cli import (
    add_sampling_arguments,
    int_at_least,
    launched_ranks,
    run_reporting_errors,
    sampling_options,
)


def main() -> None:
    parser = argparse.ArgumentParser(description="Interactive streaming chat with a zoo model")
    parser.add_argument(
        "--model",
        default="granite-3.3-2b-instruct",
        help="registry name, HF repo id (org/name) or checkpoint folder",
    )
    parser.add_argument("--system", help="a system message")
    parser.add_argument("--max-new-tokens", type=int_at_least(1), default=512)
    add_sampling_arguments(parser)
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--quantize", choices=["fp8"], default=None, help="fp8: FP8 weights for the Linears"
    )
    args = parser.parse_args()

    rank, world = launched_ranks()  # under torchrun: tensor parallel over its processes
    model = zoo.load(args.model, device=args.device, tp=world, quantize=args.quantize)
    show = print if rank == 0 else lambda *a, **k: None
    if model.tokenizer is None or model.tokenizer.chat_template is None:
        parser.error(f"{args.model}: no tokenizer with a chat template beside the checkpoint")
    sampling = sampling_options(args)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    show("/reset starts over, /quit leaves")
    while True:
        user = read_line(rank, world)
        if user is None:
            show()
            break
        if user == "/quit":
            break
        if user == "/reset":
            messages = list(start)
            continue
        if not user:
            continue
        messages.append({"role": "user", "content": user})
        room = model.max_length - len(model.tokenizer.apply_chat_template(messages, tokenize=True))
        if room < 1:
            show("[the conversation fills the model's context: /reset]")
            messages.pop()
            continue
        show("bot> ", end="", flush=True)
        reply = ""
        try:
            for piece in model.chat(
                messages, max_new_tokens=min(args.max_new_tokens, room), stream=True, **sampling
            ):
                show(piece, end="", flush=True)
                reply += piece
        except KeyboardInterrupt:  # Ctrl-C ends the reply, not the chat
            show(" [interrupted]", end="")
        show()
        messages.append({"role": "assistant", "content": reply})
    if world > 1:  # graphs and symmetric memory released, then the process group zoo.load started
        from zoo.parallel import end_started_group

        end_started_group()


def read_line(rank: int, world: int) -> str | None:
    """The user's next line (None: end of input), read on the first rank and shared with the
    others (tensor parallel)."""
    line = None
    if rank == 0:
        try:
            line = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            line = None
    if world > 1:
        from zoo.parallel import from_first_rank

        line = from_first_rank(line)
    return line


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main, "chat.py"))
