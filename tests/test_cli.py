"""The zoo command: flags checked before anything loads, user errors as one line with exit status
2, Ctrl-C as status 130, --help with defaults, --version, and --max-new-tokens fitted to the
context."""

import re
from pathlib import Path

import pytest
import torch
from helpers import DEVICE

import zoo
from convert.hf import CheckpointError, HubError
from zoo.cli import DEFAULT_MAX_NEW_TOKENS, main

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_load(monkeypatch):
    """Flag errors must be found before zoo.load runs."""

    def load(*args, **kwargs):
        raise AssertionError("zoo.load ran before the flags were checked")

    monkeypatch.setattr(zoo, "load", load)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Llama (context 128) with a byte-level tokenizer and a chat template."""
    from test_text import build_checkpoint

    path = tmp_path_factory.mktemp("cli-llama")
    build_checkpoint(path)
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        status = main(list(argv))
    except SystemExit as e:  # argparse's own exits (--help, --version, bad flags)
        status = e.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(status: int, err: str, pattern: str) -> None:
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (["--top-p", "2"], r"--top-p: expected a number in \(0, 1\], got 2"),
        (["--top-p", "0"], r"--top-p: expected a number in \(0, 1\], got 0"),
        (["--top-p", "nan"], r"--top-p: expected a number in \(0, 1\], got nan"),
        (["--max-new-tokens", "-1"], r"--max-new-tokens: expected an integer >= 1, got -1"),
        (["--max-new-tokens", "0"], r"--max-new-tokens: expected an integer >= 1, got 0"),
        (["--max-new-tokens", "ten"], r"--max-new-tokens: expected an integer, got 'ten'"),
        (["--temperature", "-0.5"], r"--temperature: expected a number >= 0, got -0.5"),
        (["--top-k", "-3"], r"--top-k: expected an integer >= 0, got -3"),
        (["--repetition-penalty", "0"], r"--repetition-penalty: expected a number > 0, got 0"),
        (["--seed", "-1"], r"--seed: expected an integer >= 0, got -1"),
        (["--stop", ""], r"--stop: expected a non-empty string"),
        (["--dtype", "int8"], r"--dtype: invalid choice: 'int8'"),
        (["--system", "be brief"], r"--system needs --chat"),
        (["--no-such-flag"], r"unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_flags_are_one_line_before_loading(capsys, no_load, flags, pattern):
    status, out, err = run(capsys, "generate", "gpt2", "--prompt", "hi", *flags)
    assert_one_line_error(status, err, pattern)
    assert out == ""


def test_missing_prompt(capsys, no_load):
    status, _, err = run(capsys, "generate", "gpt2")
    assert_one_line_error(status, err, r"required: --prompt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_bfloat16_on_the_cpu_is_refused_before_loading(capsys, no_load):
    status, _, err = run(capsys, "generate", "gpt2", "--prompt", "hi", "--dtype", "bfloat16")
    assert_one_line_error(status, err, r"--dtype bfloat16 on the CPU: .*use --dtype float32")


@pytest.mark.parametrize(
    "error, pattern",
    [
        (KeyError("unknown model 'gtp2'; did you mean 'gpt2'?"), r"^zoo: error: unknown model"),
        (FileNotFoundError("./x: no such folder"), r"^zoo: error: \./x: no such folder$"),
        (CheckpointError("model.safetensors: tensor 'a'\nhas shape"), r"tensor 'a' has shape$"),
        (HubError("meta-llama/x is gated: accept its licence"), r"meta-llama/x is gated"),
        (ValueError("dtype: expected float32"), r"^zoo: error: dtype: expected float32$"),
    ],
)
def test_load_errors_are_one_line(capsys, monkeypatch, error, pattern):
    def load(*args, **kwargs):
        raise error

    monkeypatch.setattr(zoo, "load", load)
    status, _, err = run(capsys, "generate", "x", "--prompt", "hi")
    assert_one_line_error(status, err, pattern)


def test_ctrl_c_exits_quietly_with_130(capsys, monkeypatch):
    def load(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo, "load", load)
    status, out, err = run(capsys, "generate", "x", "--prompt", "hi")
    assert status == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and err.strip() == ""


def test_ctrl_c_while_streaming(capsys, monkeypatch, folder):
    model = zoo.load(folder, device=DEVICE, dtype=torch.float32)

    def generate(*args, **kwargs):
        yield "hi"
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo, "load", lambda *args, **kwargs: model)
    monkeypatch.setattr(model, "generate", generate)
    status, out, err = run(capsys, "generate", "x", "--prompt", "hello\n")
    assert status == 130 and out == "hello\nhi" and "Traceback" not in err


def test_help_shows_defaults_and_meanings(capsys):
    status, out, _ = run(capsys, "generate", "--help")
    assert status == 0
    text = " ".join(out.split())
    for flag, default in [
        ("--temperature", "1.0"),
        ("--top-k", "0"),
        ("--top-p", "1.0"),
        ("--repetition-penalty", "1.0"),
    ]:
        assert re.search(rf"{flag} \S+ .*?\(default: {re.escape(default)}\)", text), flag
    assert f"default: {DEFAULT_MAX_NEW_TOKENS}, or what the model's context leaves" in text
    assert "HF repo id" in text and "--revision" in text


def test_version(capsys):
    status, out, _ = run(capsys, "--version")
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "(.+)"$', pyproject, re.MULTILINE).group(1)
    assert status == 0 and out.strip() == f"zoo {version}"


@pytest.mark.parametrize("chat", [False, True])
def test_default_max_new_tokens_fits_the_context(capsys, monkeypatch, folder, chat):
    """The default shrinks to what the context (128 here) leaves after the prompt."""
    model = zoo.load(folder, device=DEVICE, dtype=torch.float32)
    asked = []
    method = "chat" if chat else "generate"
    original = getattr(model, method)

    def spy(*args, **kwargs):
        asked.append(kwargs["max_new_tokens"])
        return original(*args, **{**kwargs, "max_new_tokens": 2})

    monkeypatch.setattr(zoo, "load", lambda *args, **kwargs: model)
    monkeypatch.setattr(model, method, spy)
    prompt = "hello world, " * 30
    flags = ["--chat"] if chat else []
    status, _, err = run(capsys, "generate", "x", "--prompt", prompt, *flags)
    assert status == 0, err
    if chat:
        used = len(
            model.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
        )
    else:
        used = len(model.tokenizer.encode(prompt).ids)
    assert 0 < model.max_length - used < DEFAULT_MAX_NEW_TOKENS
    assert asked == [model.max_length - used]

    status, _, err = run(
        capsys,
        "generate",
        "x",
        "--prompt",
        prompt,
        *flags,
        "--max-new-tokens",
        str(model.max_length - used + 1),
    )
    assert_one_line_error(
        status,
        err,
        rf"--max-new-tokens {model.max_length - used + 1}: the prompt takes {used} of the model's context of 128 tokens, leaving {model.max_length - used}",
    )
    status, _, err = run(capsys, "generate", "x", "--prompt", prompt * 3, *flags)
    assert_one_line_error(
        status, err, r"--prompt: \d+ tokens leave no room in the model's context of 128"
    )


def test_generate_a_real_checkpoint(capsys, folder):
    status, out, err = run(
        capsys,
        "generate",
        str(folder),
        "--prompt",
        "hello\n",
        "--max-new-tokens",
        "3",
        "--dtype",
        "float32",
        "--device",
        DEVICE,
    )
    assert status == 0, err
    assert out == "hello\nhi \n"
