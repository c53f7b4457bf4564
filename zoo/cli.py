"""The `zoo` console command.

    zoo list
    zoo generate granite-3.3-2b-instruct --prompt "The capital of France is"
    zoo generate /path/to/hf/checkpoint --prompt "Once upon a time" --do-sample --temperature 0.8 --top-p 0.95 --seed 0
    zoo generate granite-3.3-2b-instruct --chat --prompt "Name three prime numbers."
    zoo generate openai-community/gpt2 --prompt "Hello" --revision main
    torchrun --nproc-per-node 2 -m zoo.cli generate llama3-70b-instruct --chat --prompt "Hi"

`generate` checks its flags, loads the checkpoint (a progress bar on stderr while the weights
load), streams the new text to stdout as it is produced, and ends with a tokens/s line on stderr.
A user error (a bad flag, an unknown model, a hub or checkpoint problem) is one line on stderr
and exit status 2; Ctrl-C ends quietly with status 130. Also `python -m zoo.cli`.
Under torchrun the model is tensor parallel over the launched processes (or --tp N of them), and
only the first rank prints.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TextIO

DTYPES = ("float32", "float16", "bfloat16")
# --max-new-tokens when not given: this many, or what the context leaves after the prompt
DEFAULT_MAX_NEW_TOKENS = 128
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class UsageError(Exception):
    """A user error found by the command itself: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (and the usual exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default (not for flags without one, nor for booleans)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); returns the exit status."""

    def run() -> int:
        args = _parser().parse_args(argv)
        return args.run(args)

    return run_reporting_errors(run)


def run_reporting_errors(run: Callable[[], int | None], prog: str = "zoo") -> int:
    """Run a command's body (the CLI's, an example script's main) and return its exit status: a
    user's error is one line on stderr, `prog: error: ...`, not a traceback."""
    try:
        return run() or 0
    except KeyboardInterrupt:
        print(file=sys.stderr)  # end the interrupted line; no traceback
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `zoo list | head`
        sys.stdout = open(os.devnull, "w")  # no second error when Python flushes at exit
        return 1
    except (UsageError, ValueError, OSError) as e:
        # zoo's own errors (ValueError, CheckpointError, HubError, FileNotFoundError) already name
        # the culprit: one line, no traceback
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE


def version() -> str:
    """The installed package's version, else the source tree's pyproject.toml version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("triton-zoo")
    except PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        text = pyproject.read_text(encoding="utf-8") if pyproject.is_file() else ""
        match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
        return match.group(1) if match else "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="zoo",
        description="Llama 3, Granite, GPT-2, Bert and T5 on our Triton kernels",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    listing = commands.add_parser("list", help="the registry's model names and their HF repos")
    listing.set_defaults(run=_list)

    gen = commands.add_parser(
        "generate", help="stream a continuation (or a chat reply)", formatter_class=_Formatter
    )
    gen.set_defaults(run=_generate)
    gen.add_argument(
        "model",
        metavar="NAME_OR_PATH",
        help="registry name (zoo list), HF repo id (org/name) or local checkpoint folder",
    )
    gen.add_argument(
        "--revision", help="with an HF repo id or registry name: branch, tag or commit"
    )
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument(
        "--chat", action="store_true", help="send the prompt as a user message (chat template)"
    )
    gen.add_argument("--system", help="with --chat: a system message first")
    gen.add_argument(
        "--max-new-tokens",
        type=int_at_least(1),
        default=None,
        help=f"most tokens to generate (default: {DEFAULT_MAX_NEW_TOKENS}, or what the model's "
        "context leaves after the prompt when that is less)",
    )
    add_sampling_arguments(gen)
    gen.add_argument(
        "--stop", action="append", type=non_empty, help="stop string (repeat for more)"
    )
    gen.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    gen.add_argument(
        "--tp",
        type=int_at_least(1),
        default=None,
        help="tensor parallel over this many GPUs: launch with torchrun --nproc-per-node N "
        "(default: the number of processes torchrun started)",
    )
    gen.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="default: bfloat16 on a GPU, float32 on the CPU (where bfloat16 is refused)",
    )
    gen.add_argument(
        "--quantize",
        choices=["fp8"],
        default=None,
        help="fp8: FP8 weights for every Linear of the blocks, quantized as the checkpoint loads "
        "(FP8 checkpoints load as FP8 without it)",
    )
    return parser


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


def number_in(
    low: float, high: float = float("inf"), low_open: bool = False
) -> Callable[[str], float]:
    """An argparse type: a number in [low, high] ((low, high] with low_open)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]" if high != float("inf") else ""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        below = value <= low if low_open else value < low
        if below or value > high or value != value:
            wanted = f"in {interval}" if interval else f"{'>' if low_open else '>='} {low:g}"
            raise argparse.ArgumentTypeError(f"expected a number {wanted}, got {text}")
        return value

    return parse


def non_empty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("expected a non-empty string")
    return text


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The sampling flags of `generate` (shared with the examples), checked as they are parsed."""
    parser.add_argument(
        "--do-sample", action="store_true", help="sample the next token (default: greedy)"
    )
    parser.add_argument(
        "--temperature",
        type=number_in(0.0),
        default=1.0,
        help="with --do-sample: divides the logits (lower: more deterministic; 0: greedy)",
    )
    parser.add_argument(
        "--top-k",
        type=int_at_least(0),
        default=0,
        help="with --do-sample: keep the k most likely tokens (0: off)",
    )
    parser.add_argument(
        "--top-p",
        type=number_in(0.0, 1.0, low_open=True),
        default=1.0,
        help="with --do-sample: keep the smallest set of tokens of this total probability (1: off)",
    )
    parser.add_argument(
        "--repetition-penalty",
        type=number_in(0.0, low_open=True),
        default=1.0,
        help="penalize tokens already present (> 1 discourages repeats; 1: off)",
    )
    parser.add_argument(
        "--seed", type=int_at_least(0), default=None, help="random seed of --do-sample"
    )


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


def launched_ranks() -> tuple[int, int]:
    """(this process's rank, the number of processes) as torchrun set them; (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _generate(args: argparse.Namespace) -> int:
    if args.system is not None and not args.chat:
        raise UsageError("--system needs --chat (a system message is part of a chat)")
    rank, world = launched_ranks()
    tp = args.tp or world
    if tp != world:
        raise UsageError(
            f"--tp {tp}: launch {tp} processes with torchrun --nproc-per-node {tp} "
            f"(this run has {world})"
        )
    try:
        return _run_generate(args, tp, lead=rank == 0)
    finally:
        if tp > 1:
            from zoo.parallel import end_started_group

            end_started_group()


def _run_generate(args: argparse.Namespace, tp: int, lead: bool) -> int:
    """generate's work; with tp > 1 every rank runs it, and only the lead rank prints."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cpu = not device.startswith(("cuda", "meta"))
    if on_cpu and args.dtype == "bfloat16":
        raise UsageError(
            "--dtype bfloat16 on the CPU: Triton's interpreter computes bfloat16 matmuls wrongly; "
            "use --dtype float32 (the CPU default) or float16"
        )
    announce_interpreter = on_cpu and "TRITON_INTERPRET" not in os.environ
    if announce_interpreter:
        # no GPU: the kernels run through Triton's interpreter (set before triton is imported);
        # said here in one line rather than by zoo.load's warning
        os.environ["TRITON_INTERPRET"] = "1"

    import zoo

    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        model = zoo.load(
            args.model,
            device=device,
            dtype=dtype,
            progress=progress_bar() if lead else None,
            revision=args.revision,
            tp=tp,
            quantize=args.quantize,
        )
    except KeyError as e:  # an unknown registry name (the message lists the known ones)
        raise UsageError(e.args[0] if e.args else str(e)) from None
    if announce_interpreter and lead:
        print("zoo: running on the CPU through Triton's interpreter (slow)", file=sys.stderr)
    show = print if lead else _silent
    if model.tokenizer is None:
        print(f"zoo: {args.model}: no tokenizer.json beside the checkpoint", file=sys.stderr)
        return 2
    from zoo.models.contract import DecoderOnlyLM

    if not isinstance(model, DecoderOnlyLM):
        print(f"zoo: {args.model}: not a decoder-only language model", file=sys.stderr)
        return 2
    messages = []
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": args.prompt})
        prompt_ids = model.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
    else:
        prompt_ids = model.tokenizer.encode(args.prompt).ids
    max_new_tokens = _max_new_tokens(args.max_new_tokens, len(prompt_ids), model.max_length)
    sampling = dict(
        max_new_tokens=max_new_tokens, stop=args.stop, stream=True, **sampling_options(args)
    )
    start = time.perf_counter()
    if args.chat:
        stream = model.chat(messages, **sampling)
    else:
        show(args.prompt, end="", flush=True)
        stream = model.generate(args.prompt, **sampling)
    for piece in stream:
        show(piece, end="", flush=True)
    show()
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    count = len(stream.tokens)
    show(
        f"[{count} tokens in {seconds:.2f} s: {count / seconds:.1f} tokens/s, prefill included]",
        file=sys.stderr,
    )
    return 0


def _silent(*args, **kwargs) -> None:
    """print's stand-in on the ranks that do not print."""


def _max_new_tokens(requested: int | None, prompt: int, context: int) -> int:
    """--max-new-tokens: the default shrinks to what the context leaves after the prompt; an
    explicit value beyond it is refused."""
    left = context - prompt
    if left < 1:
        raise UsageError(
            f"--prompt: {prompt} tokens leave no room in the model's context of {context} tokens"
        )
    if requested is None:
        return min(DEFAULT_MAX_NEW_TOKENS, left)
    if requested > left:
        raise UsageError(
            f"--max-new-tokens {requested}: the prompt takes {prompt} of the model's context of "
            f"{context} tokens, leaving {left}"
        )
    return requested


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
