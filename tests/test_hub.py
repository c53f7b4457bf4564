"""zoo.load's names: registry names, Hugging Face repo ids (with revision=) and folders, and one
short error per hub failure. No network here: huggingface_hub's snapshot_download is replaced by
a stand-in that returns a tiny local checkpoint or raises the exception the real one raises."""

import importlib
import json
import shutil

import huggingface_hub
import pytest
import torch
from huggingface_hub import errors

import zoo
from convert.hf import CHECKPOINT_PATTERNS, CheckpointError, HubError
from zoo.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

try:  # the HTTP library of this huggingface_hub: httpx2 in the newest releases, else httpx
    import httpx2 as http
except ImportError:
    import httpx as http


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny GPT-2 checkpoint folder (what a snapshot download leaves in the HF cache)."""
    folder = tmp_path_factory.mktemp("gpt2-snapshot")
    config = transformers.GPT2Config(vocab_size=61, n_positions=40, n_embd=32, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture
def hub(monkeypatch, checkpoint):
    """Records each snapshot_download call; `hub.error` set: the call raises it instead."""

    class Hub:
        calls: list[dict] = []
        error: Exception | None = None

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        Hub.calls.append(dict(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns))
        if Hub.error is not None:
            raise Hub.error
        return str(checkpoint)

    Hub.calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return Hub


def http_error(cls, status: int, message: str):
    request = http.Request("GET", "https://huggingface.co/api/models/org/name")
    return cls(message, response=http.Response(status, request=request))


def connection_errors() -> list[Exception]:
    """The connection failures of whichever HTTP libraries are installed, and Python's own."""
    made = [ConnectionError("[Errno 111] Connection refused"), TimeoutError("timed out")]
    for module_name in ("httpx2", "httpx", "requests"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        made.append(
            module.ConnectError("[Errno -3] name resolution failed")
            if hasattr(module, "ConnectError")
            else module.ConnectionError("refused")
        )
    return made


# ---------------------------------------------------------------------------- names that load


def test_repo_id_loads_through_the_hf_cache(hub):
    model = zoo.load("openai-community/gpt2", device="meta")
    assert model.config.n_embd == 32
    assert hub.calls == [
        dict(repo_id="openai-community/gpt2", revision=None, allow_patterns=CHECKPOINT_PATTERNS)
    ]


def test_repo_id_with_a_revision(hub):
    zoo.load("some-org/Some.Model_v2", revision="refs/pr/1", device="meta")
    assert hub.calls[0]["repo_id"] == "some-org/Some.Model_v2"
    assert hub.calls[0]["revision"] == "refs/pr/1"


def test_registry_name_fetches_its_repo(hub):
    zoo.load("gpt2", revision="main", device="meta")
    entry = zoo.registry.get_entry("gpt2")
    assert hub.calls == [
        dict(repo_id=entry.repo_id, revision="main", allow_patterns=CHECKPOINT_PATTERNS)
    ]


def test_repo_id_with_random_weights_fetches_only_the_config(hub):
    model = zoo.load("openai-community/gpt2", pretrained=False, device="meta")
    assert model.config.n_embd == 32
    assert hub.calls[0]["allow_patterns"] == ["config.json", "generation_config.json"]


def test_revision_of_a_folder_is_refused(checkpoint):
    with pytest.raises(ValueError, match="revision='main' applies to hub checkpoints"):
        zoo.load(checkpoint, revision="main", device="meta")


# ---------------------------------------------------------------------------- hub failures

GATED = "meta-llama/Llama-3.2-1B"


@pytest.mark.parametrize(
    "error, expected",
    [
        (
            http_error(errors.GatedRepoError, 403, "Access to model is restricted"),
            rf"{GATED} is gated: accept its licence at https://huggingface\.co/{GATED}, "
            r"then log in with `hf auth login` \(or `huggingface-cli login`\)",
        ),
        (
            http_error(errors.RepositoryNotFoundError, 404, "Repository Not Found"),
            rf"{GATED}: no such model repo on the Hugging Face Hub",
        ),
        (
            http_error(errors.RevisionNotFoundError, 404, "Revision Not Found"),
            rf"{GATED} has no revision 'v9'",
        ),
        (
            errors.LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder"),
            r"cannot be reached and the HF cache has no copy.*local checkpoint folder.*"
            r"HF_HUB_OFFLINE=1",
        ),
        (
            errors.OfflineModeIsEnabled("Cannot reach the Hub: offline mode is enabled"),
            r"cannot be reached.*HF_HUB_OFFLINE=1",
        ),
        *[(e, r"cannot be reached.*HF cache.*HF_HUB_OFFLINE=1") for e in connection_errors()],
        (
            http_error(errors.HfHubHTTPError, 500, "500 Server Error\nInternal Server Error"),
            r"answered with an error: 500 Server Error$",
        ),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else "",
)
def test_hub_failure_is_one_short_error(hub, error, expected):
    hub.error = error
    revision = "v9" if isinstance(error, errors.RevisionNotFoundError) else None
    with pytest.raises(HubError, match=expected) as raised:
        zoo.load(GATED, revision=revision, device="meta")
    message = str(raised.value)
    assert "\n" not in message and len(message) < 400
    # no chain of httpx / huggingface_hub tracebacks after it
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_hub_failure_of_a_registry_name_names_its_repo(hub):
    hub.error = http_error(errors.GatedRepoError, 403, "restricted")
    repo = zoo.registry.get_entry("llama3.2-1b-instruct").repo_id
    with pytest.raises(HubError, match=rf"https://huggingface\.co/{repo}"):
        zoo.load("llama3.2-1b-instruct", device="meta")


# ---------------------------------------------------------------------------- names that do not


@pytest.mark.parametrize(
    "typo, suggestion",
    [
        ("llama3.2-1b-instrct", "llama3.2-1b-instruct"),
        ("granit-3.3-2b-instruct", "granite-3.3-2b-instruct"),
        ("gtp2", "gpt2"),
    ],
)
def test_registry_typo_gets_a_suggestion(hub, typo, suggestion):
    with pytest.raises(KeyError, match=rf"unknown model '{typo}'; did you mean '{suggestion}'"):
        zoo.load(typo, device="meta")
    assert hub.calls == []


def test_unknown_name_without_a_close_match_lists_the_models(hub):
    with pytest.raises(KeyError, match=r"unknown model 'zzzzzz'; known models: .*gpt2.*org/name"):
        zoo.load("zzzzzz", device="meta")


@pytest.mark.parametrize(
    "name", ["./no-such-folder", "/no/such/folder", "~/no-such-folder", "no/such/folder"]
)
def test_missing_folder_is_not_an_unknown_model(hub, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"{name}: no such folder \(.* does not exist\)"):
        zoo.load(name, device="meta")
    assert hub.calls == []


def test_a_file_is_not_a_checkpoint_folder(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        zoo.load(file, device="meta")


# ---------------------------------------------------------------------------- tokenizer files


@pytest.fixture
def tokenizer_folder(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    Backend(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(
        str(tmp_path / "tokenizer.json")
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "a"}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"unk_token": "<unk>"}))
    assert Tokenizer.from_folder(tmp_path).eos_token == "a"
    return tmp_path


@pytest.mark.parametrize(
    "file, content, problem",
    [
        ("tokenizer.json", "{ not json", "not a readable tokenizers file"),
        ("tokenizer.json", '{"model": 3}', "not a readable tokenizers file"),
        ("tokenizer_config.json", "{ not json", "not valid JSON"),
        ("tokenizer_config.json", "[1, 2]", "expected a JSON object, got a JSON list"),
        ("tokenizer_config.json", '{"chat_template": 7}', "chat_template: expected a string"),
        ("tokenizer_config.json", '{"chat_template": [{"x": 1}]}', "chat_template: expected"),
        ("special_tokens_map.json", "\xff\xfe", "not valid JSON"),
        ("special_tokens_map.json", '"eos"', "expected a JSON object, got a JSON str"),
    ],
)
def test_corrupt_tokenizer_file_is_named(tokenizer_folder, file, content, problem):
    (tokenizer_folder / file).write_text(content, encoding="latin-1")
    with pytest.raises(CheckpointError, match=rf"{file}: {problem}"):
        Tokenizer.from_folder(tokenizer_folder)


def test_corrupt_tokenizer_beside_a_checkpoint_fails_the_load(checkpoint, tmp_path):
    folder = shutil.copytree(checkpoint, tmp_path / "copy")
    (folder / "tokenizer.json").write_text("<html>502 Bad Gateway</html>")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: not a readable tokenizers"):
        zoo.load(folder, device="meta", dtype=torch.float32)
