"""Text in, text out: the checkpoint's tokenizer, stop strings, per-row EOS, streaming, chat
templates (against transformers' apply_chat_template) and the `zoo` command.

The checkpoint is a tiny random Llama saved with save_pretrained beside a tiny byte-level BPE
tokenizer trained with `tokenizers`. Its embeddings and head are set so that the next token is a
function of the current one (the layers' small random contributions do not change the argmax):
after a newline it writes, one byte-level token per UTF-8 byte, "hi 你🙂é!" and then <|eot_id|>,
and after ":" it starts at "🙂". So its text is known, and multi-byte characters arrive split
over several tokens: exactly what streaming must never cut.
"""

import json

import pytest
import torch
from helpers import DEVICE

import zoo
from zoo.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer as Backend  # noqa: E402
from tokenizers import decoders, models, processors, trainers  # noqa: E402
from tokenizers.pre_tokenizers import ByteLevel  # noqa: E402

SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
# Llama 3's template, shortened: the template writes the BOS
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SCRIPT = "hi 你🙂é!"
CORPUS = ["héllo wörld 你好 🙂", "the quick brown fox", "hello world, hello you"]


def byte_token_ids(tokenizer: Backend, text: str) -> list[int]:
    """One id per UTF-8 byte of text: the byte-level alphabet's single-byte tokens."""
    ((mapped, _),) = ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    return [tokenizer.token_to_id(char) for char in mapped]


def build_checkpoint(folder) -> None:
    tokenizer = Backend(models.BPE())
    tokenizer.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL,
        initial_alphabet=ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>", "special": True},
        "chat_template": TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")

    eot = tokenizer.token_to_id("<|eot_id|>")
    end = tokenizer.token_to_id("<|end_of_text|>")
    cycle = byte_token_ids(tokenizer, SCRIPT) + [eot]
    assert len(set(cycle)) == len(cycle), "the script's tokens must be distinct"
    hf_config = transformers.LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=end,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        embed = torch.randn(hf_config.vocab_size, hf_config.hidden_size)
        unit = embed / embed.norm(dim=1, keepdim=True)
        head = model.lm_head.weight.mul_(0.1)  # small random scores for every token
        # token a is followed by token b: b's head row points along a's embedding
        after_newline = byte_token_ids(tokenizer, "\n")[0], cycle[0]
        after_colon = byte_token_ids(tokenizer, ":")[0], cycle[SCRIPT.encode().index("🙂".encode())]
        for a, b in [*zip(cycle, cycle[1:] + cycle[:1], strict=True), after_newline, after_colon]:
            head[b] += unit[a]
        model.model.embed_tokens.weight.copy_(embed)
    model.save_pretrained(folder)
    model.generation_config.eos_token_id = [end, eot]  # Llama 3 instruct lists both
    model.generation_config.save_pretrained(folder)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-with-tokenizer")
    build_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def model(folder):
    return zoo.load(folder, device=DEVICE, dtype=torch.float32)


def left_padded(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and attention mask [B, T] of a left-padded batch of prompts."""
    rows = [tokenizer.encode(p).ids for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=DEVICE)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=DEVICE)
    return ids, mask


def naive_pieces_split_a_character(tokenizer, ids: list[int]) -> bool:
    """Whether decoding token by token would have cut a UTF-8 character somewhere."""
    return any(tokenizer.decode(ids[:k]).endswith("\ufffd") for k in range(1, len(ids)))


def test_tokenizer_reads_the_checkpoint_folder(model, folder):
    tokenizer = model.tokenizer
    assert isinstance(tokenizer, Tokenizer)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    ids = tokenizer.encode("héllo 🙂").ids
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.encode("héllo 🙂", add_special_tokens=False).ids == ids[1:]
    assert tokenizer.decode(ids + [tokenizer.eos_token_id]) == "héllo 🙂"  # specials skipped
    assert tokenizer.get_vocab_size() == model.config.vocab_size  # forwarded to tokenizers
    assert Tokenizer.from_folder(folder / "nowhere") is None


@pytest.mark.parametrize("source", ["tokenizer_config.json", "chat_template.jinja"])
def test_chat_ids_equal_transformers(folder, tmp_path, source):
    # the same tokenizer, with the template in tokenizer_config.json or in chat_template.jinja
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    if source == "chat_template.jinja":
        config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
        config["chat_template"] = "{{ raise_exception('the .jinja file wins') }}"
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        (tmp_path / "chat_template.jinja").write_text(
            TEMPLATE.replace("| trim }}", "| trim }} ({{ loop.index }})"), encoding="utf-8"
        )
    ours = Tokenizer.from_folder(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    conversations = [
        [{"role": "user", "content": "héllo 🙂"}],
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "你好"},
            {"role": "assistant", "content": " hi there "},
            {"role": "user", "content": "again?"},
        ],
    ]
    for messages in conversations:
        for prompt in (True, False):
            expected = theirs.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=prompt
            )
            if hasattr(expected, "keys"):  # transformers 5 returns a BatchEncoding
                expected = expected["input_ids"]
            ids = ours.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True)
            assert ids == list(expected)
            assert ids[0] == ours.bos_token_id and ids.count(ours.bos_token_id) == 1


def test_stop_string_ends_each_row_exactly_before_it(model):
    prompts = ["hello\n", "smile:"]
    free = model.generate(prompts, max_new_tokens=14, eos_token_id=[])
    # a stop string taken from the generated text, at a different place in each row
    stop = free[0][5:7]
    assert stop == "é!" and 0 < free[1].find(stop) < free[0].find(stop)
    texts = model.generate(prompts, max_new_tokens=14, eos_token_id=[], stop=["zzz", stop])
    assert texts == [text[: text.find(stop)] for text in free]

    # with token ids: each row keeps the tokens up to the one completing the stop string
    # (its last byte), then pads; generation ends once both rows have stopped
    tokenizer = model.tokenizer
    ids, mask = left_padded(tokenizer, prompts)
    out = model.generate(ids, mask, max_new_tokens=14, eos_token_id=[], stop=stop)
    new = out[:, ids.shape[1] :].tolist()
    pad = model.generation_config.eos_token_id[0]
    for row, text in zip(new, free, strict=True):
        kept = [t for t in row if t != pad]
        assert tokenizer.decode(kept) == text[: text.find(stop) + len(stop)]
        assert row[len(kept) :] == [pad] * (len(row) - len(kept))
    assert len(new[0]) == len(byte_token_ids(tokenizer, free[0][: free[0].find(stop) + 2]))


def test_eos_list_stops_each_row_at_its_own_eos(model):
    tokenizer = model.tokenizer
    prompts = ["hello\n", "smile:"]
    ids, mask = left_padded(tokenizer, prompts)
    free = model.generate(ids, mask, 10, eos_token_id=[])[:, ids.shape[1] :].tolist()
    # row 0 meets the space first, row 1 the "!" (and neither meets the other's first)
    eos = [byte_token_ids(tokenizer, " ")[0], byte_token_ids(tokenizer, "!")[0]]
    ends = [min(row.index(e) for e in eos if e in row) for row in free]
    assert free[0][ends[0]] == eos[0] and free[1][ends[1]] == eos[1] and ends[0] != ends[1]

    out = model.generate(ids, mask, 10, eos_token_id=eos)[:, ids.shape[1] :].tolist()
    assert len(out[0]) == max(ends) + 1  # stops when the last row has finished
    for row, free_row, end in zip(out, free, ends, strict=True):
        assert row == free_row[: end + 1] + [eos[0]] * (len(row) - end - 1)  # pad: first EOS

    texts = model.generate(prompts, max_new_tokens=10, eos_token_id=eos)
    assert texts == [tokenizer.decode(row[:end]) for row, end in zip(free, ends, strict=True)]


@pytest.mark.parametrize(
    "max_new_tokens, stop",
    [(16, None), (4, None), (16, ["é!"])],
    ids=["multi-byte", "ends-inside-a-character", "stop-string"],
)
def test_streamed_pieces_join_to_the_text(model, max_new_tokens, stop):
    kwargs = dict(max_new_tokens=max_new_tokens, stop=stop, eos_token_id=[])
    text = model.generate("hello\n", **kwargs)
    stream = model.generate("hello\n", stream=True, **kwargs)
    pieces = list(stream)
    assert "".join(pieces) == text and stream.text == text
    if max_new_tokens == 4:  # h, i, space, the first byte of 你
        assert text == "hi \ufffd"
    else:
        assert naive_pieces_split_a_character(model.tokenizer, stream.tokens)
        assert not any("\ufffd" in piece for piece in pieces)
        assert pieces[:5] == ["h", "i", " ", "你", "🙂"]
    if stop:
        assert text == "hi 你🙂"  # "é" showed before "!": held back until the stop was decided


def test_chat_replies_until_the_end_of_turn(model):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert model.chat(messages, max_new_tokens=20) == SCRIPT  # stops at <|eot_id|>
    stream = model.chat(messages, max_new_tokens=20, stream=True)
    assert "".join(stream) == SCRIPT
    assert len(stream.tokens) == len(SCRIPT.encode())  # byte tokens, EOS not counted


def test_text_arguments_are_checked(model):
    with pytest.raises(ValueError, match="stream=True takes one prompt"):
        model.generate(["a\n", "b\n"], stream=True)
    with pytest.raises(ValueError, match="stream=True streams text"):
        model.generate(torch.tensor([[1, 2]], device=DEVICE), stream=True)
    with pytest.raises(ValueError, match="stop"):
        model.generate("a", stop=[""])
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate("a", attention_mask=torch.ones(1, 1))
    stream = model.generate("hello\n", stream=True, max_new_tokens=8)
    assert next(stream) == "h"
    # a new generation ends a stream still open (they share the decode buffers)
    assert model.generate("smile:", max_new_tokens=4, eos_token_id=[]) == "🙂"
    assert list(stream) == []


def test_zoo_command(folder, capsys):
    from zoo.cli import main

    assert main(["list"]) == 0
    assert "llama3-8b-instruct" in capsys.readouterr().out
    argv = [
        "generate",
        str(folder),
        "--prompt",
        "hello\n",
        "--max-new-tokens",
        "10",
        "--dtype",
        "float32",
    ]
    assert main([*argv, "--device", DEVICE]) == 0
    captured = capsys.readouterr()
    assert captured.out == "hello\nhi 你🙂\n"
    assert "loading weights [" in captured.err and "tensors" in captured.err
    assert "10 tokens in" in captured.err and "tokens/s" in captured.err
    assert main([*argv, "--chat", "--stop", "🙂", "--device", DEVICE]) == 0
    assert capsys.readouterr().out == "hi 你\n"
