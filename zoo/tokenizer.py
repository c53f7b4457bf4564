"""A checkpoint's tokenizer: `tokenizers` for the text <-> ids mapping, plus what transformers
reads from the checkpoint folder beside tokenizer.json: the special tokens (tokenizer_config.json,
special_tokens_map.json) and the chat template (chat_template.jinja or tokenizer_config.json's
`chat_template`), rendered the way transformers renders it.

    tok = Tokenizer.from_folder(folder)          # None without tokenizer.json
    tok.encode("héllo").ids                     # a tokenizers.Encoding, special tokens added
    tok.decode(ids)                             # special tokens skipped
    prompt = tok.apply_chat_template(messages)  # str; tokenize=True gives the ids

encode, decode, encode_batch, decode_batch and every other method of `tokenizers.Tokenizer` keep
their `tokenizers` meaning (the wrapper forwards what it does not define), so code written for a
raw `tokenizers.Tokenizer` works unchanged.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class Tokenizer:
    """A `tokenizers.Tokenizer` with the checkpoint's special tokens and chat template.

    `backend` is the raw `tokenizers.Tokenizer`; attributes this class does not define are read
    from it. Special tokens: `bos_token`, `eos_token`, `pad_token`, ... (str or None) and their
    `*_id`s (int or None); `special_tokens_map` is what transformers passes to a chat template.
    """

    def __init__(
        self,
        backend,
        special_tokens: dict[str, str] | None = None,
        chat_template: str | dict[str, str] | None = None,
    ) -> None:
        self.backend = backend
        self.special_tokens_map = {
            name: token for name, token in (special_tokens or {}).items() if token is not None
        }
        self.chat_template = chat_template

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer | None:
        """Read tokenizer.json and, where present, tokenizer_config.json, special_tokens_map.json
        and chat_template.jinja from a checkpoint folder; None when there is no tokenizer.json.

        As in transformers, tokenizer_config.json's special tokens win over
        special_tokens_map.json's, and chat_template.jinja wins over tokenizer_config.json's
        `chat_template` (a str, or a list of named templates)."""
        from tokenizers import Tokenizer as Backend

        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            return None
        path = folder / "tokenizer.json"
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a bad file
            raise _file_error(path, f"not a readable tokenizers file ({e})") from None
        config = _read_json(folder / "tokenizer_config.json")
        token_map = _read_json(folder / "special_tokens_map.json")
        special = {}
        for name in SPECIAL_TOKEN_NAMES:
            token = _token_content(config.get(name))
            special[name] = token if token is not None else _token_content(token_map.get(name))
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            try:
                template = {t["name"]: t["template"] for t in template}
            except (KeyError, TypeError):
                raise _file_error(
                    folder / "tokenizer_config.json",
                    "chat_template: expected a string or a list of {name, template} objects",
                ) from None
        elif template is not None and not isinstance(template, str):
            raise _file_error(
                folder / "tokenizer_config.json",
                f"chat_template: expected a string, got {type(template).__name__}",
            )
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            try:
                template = jinja_file.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise _file_error(jinja_file, f"not UTF-8 text ({e})") from None
        return cls(backend, special, template)

    def __getattr__(self, name: str) -> Any:
        # only called for names not found on the wrapper: forward to tokenizers.Tokenizer
        if name == "backend":  # not set yet (during unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.backend, name)

    def __repr__(self) -> str:
        size = self.backend.get_vocab_size()
        return f"Tokenizer(vocab_size={size}, special_tokens={self.special_tokens_map})"

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True):
        """The `tokenizers.Encoding` of text (`.ids`, `.tokens`, `.offsets`); add_special_tokens
        runs the tokenizer's post-processor (e.g. Llama 3 puts <|begin_of_text|> first)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids; special tokens (BOS, EOS, <|eot_id|>, ...) are left out by default.
        An incomplete UTF-8 character at the end decodes to U+FFFD."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens_map.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens_map.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens_map.get("pad_token")

    @property
    def unk_token(self) -> str | None:
        return self.special_tokens_map.get("unk_token")

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_id(self.pad_token)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        chat_template: str | None = None,
        **extra: Any,
    ) -> str | list[int]:
        """Render a conversation ([{"role": ..., "content": ...}, ...]) with the checkpoint's chat
        template, as transformers' `apply_chat_template` does: a sandboxed Jinja environment
        (trim_blocks, lstrip_blocks, loop controls, its `tojson`, `raise_exception`,
        `strftime_now`), the special tokens (`bos_token`, `eos_token`, ...) and
        `add_generation_prompt` as variables, plus `extra` (e.g. tools=..., enable_thinking=...).
        Keys whose value is None are dropped from the messages, as transformers does.

        tokenize=True returns the ids of the rendered text encoded WITHOUT the tokenizer's own
        special tokens: the template writes the BOS itself, so there is exactly one.
        chat_template: a template string, or the name of one of the checkpoint's templates."""
        template = self._select_template(chat_template, extra.get("tools"))
        if not isinstance(messages, list | tuple) or not messages:
            raise ValueError("messages: expected a non-empty list of {'role': ..., 'content': ...}")
        for message in messages:
            if not isinstance(message, dict):
                raise TypeError(f"messages: each message must be a dict, got {message!r}")
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {**self.special_tokens_map, **extra}  # extra overrides, as in transformers
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        text = compile_chat_template(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )
        if not tokenize:
            return text
        return self.encode(text, add_special_tokens=False).ids

    def _select_template(self, chat_template: str | None, tools) -> str:
        templates = self.chat_template
        if isinstance(templates, dict):
            if chat_template is not None:
                return templates.get(chat_template, chat_template)
            if tools is not None and "tool_use" in templates:
                return templates["tool_use"]
            if "default" in templates:
                return templates["default"]
            raise ValueError(
                f"the checkpoint has several chat templates ({sorted(templates)}) and none is "
                "'default': pass chat_template=NAME"
            )
        if chat_template is not None:
            return chat_template
        if templates is None:
            raise ValueError(
                "the checkpoint has no chat template (chat_template.jinja, or `chat_template` in "
                "tokenizer_config.json)"
            )
        return templates


@lru_cache(maxsize=16)
def compile_chat_template(template: str):
    """A Jinja template compiled like transformers' `_compile_jinja_template`: an immutable
    sandbox (chat templates from the Hub are untrusted code), trim_blocks and lstrip_blocks, loop
    controls, a `tojson` that does not escape HTML, `raise_exception`, `strftime_now`, and the
    `{% generation %}` tag (rendered as its body; transformers uses it for assistant masks)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_render_body")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _render_body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' override: Jinja's own tojson escapes HTML characters
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


def _read_json(path: Path) -> dict:
    """A tokenizer side file's JSON object; {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _file_error(path, f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise _file_error(path, f"expected a JSON object, got a JSON {type(data).__name__}")
    return data


def _file_error(path: Path, problem: str) -> ValueError:
    """A CheckpointError (a ValueError) naming the tokenizer file at fault."""
    from convert.hf import CheckpointError

    return CheckpointError(f"{path}: {problem}")


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a str, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
