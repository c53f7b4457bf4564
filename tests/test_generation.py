"""The generation engine and its options: GenerationConfig (from generation_config.json, keyword
overrides, every bad value refused before any kernel runs), min_p through generate, the model
contract, the tokenizer's out-of-vocabulary ids, memory bounds and threads."""

import json
import re
import threading

import pytest
import torch
from helpers import DEVICE
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import zoo
from zoo.generation import GenerationConfig, GenerationEngine, check_input_ids
from zoo.generation import engine as engine_module
from zoo.models.contract import DecoderOnlyLM, GenerativeLM

transformers = pytest.importorskip("transformers")


@pytest.fixture
def no_kernel_launches(monkeypatch):
    """Any Triton kernel launch fails the test (GPU: JITFunction; interpreter: its own class)."""

    def launched(kernel, *args, **kwargs):
        raise AssertionError(f"Triton kernel {kernel.fn.__name__} was launched before the check")

    for cls in (JITFunction, InterpretedFunction):
        monkeypatch.setattr(cls, "run", launched)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama (with a generation_config.json that samples) and a tiny T5."""
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=71,
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
            eos_token_id=2,
        )
    )
    with torch.no_grad():
        for param in llama.parameters():
            param.normal_(0.0, 0.3)
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            vocab_size=47,
            d_model=32,
            d_kv=8,
            d_ff=40,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=20,
            decoder_start_token_id=0,
            eos_token_id=1,
            pad_token_id=0,
        )
    )
    made = {}
    for name, model in (("llama", llama), ("t5", t5)):
        made[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(made[name])
    sampling = dict(do_sample=True, temperature=0.7, top_p=0.9, min_p=0.05, eos_token_id=[2, 5])
    transformers.GenerationConfig(**sampling).save_pretrained(made["llama"])
    return made


@pytest.fixture(scope="module")
def models(folders):
    return {name: zoo.load(folder, device=DEVICE) for name, folder in folders.items()}


def ids(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, device=DEVICE)


# ---------------------------------------------------------------------------- GenerationConfig


def test_generation_config_read_from_the_checkpoint(models):
    config = models["llama"].generation_config
    assert isinstance(config, GenerationConfig)
    assert (config.do_sample, config.temperature, config.top_p, config.min_p) == (
        True,
        0.7,
        0.9,
        0.05,
    )
    assert config.eos_token_id == (2, 5)
    assert models["t5"].generation_config.decoder_start_token_id == 0


def test_generation_config_from_dict_and_overrides():
    config = GenerationConfig.from_dict(
        {"top_k": 5, "max_length": 20, "transformers_version": "5.0", "stop": "x"}
    )
    assert (config.top_k, config.stop) == (5, ("x",))  # unknown file keys ignored
    over = config.updated(top_k=3, seed=4)
    assert (over.top_k, over.seed, over.stop, config.top_k) == (3, 4, ("x",), 5)
    with pytest.raises(TypeError, match="unexpected generation argument.*: top_q"):
        config.updated(top_q=0.5)


BAD_OPTIONS = [
    (dict(do_sample="no"), "do_sample: expected True or False, got 'no'"),
    (dict(do_sample=True, temperature=0), "temperature: expected a number > 0 with do_sample"),
    (dict(do_sample=True, temperature=0.0), "temperature: expected a number > 0 with do_sample"),
    (dict(temperature=float("nan")), "temperature: expected a finite number, got nan"),
    (dict(temperature=float("inf")), "temperature: expected a finite number, got inf"),
    (dict(temperature="1"), "temperature: expected a finite number, got '1'"),
    (dict(max_new_tokens=True), "max_new_tokens: expected an int >= 0, got True"),
    (dict(max_new_tokens=-1), "max_new_tokens: expected an int >= 0, got -1"),
    (dict(top_k=2.0), "top_k: expected an int >= 0"),
    (dict(top_p=float("nan")), "top_p: expected a number in (0, 1], got nan"),
    (dict(min_p=-0.1), "min_p: expected a number in [0, 1] or None, got -0.1"),
    (dict(min_p=True), "min_p: expected a number in [0, 1] or None, got True"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty: expected a finite number > 0"),
    (dict(seed="7"), "seed: expected an int, got '7'"),
    (dict(seed=1.5), "seed: expected an int, got 1.5"),
    (dict(pad_token_id=2**63), f"pad_token_id: expected an int token id (int64), got {2**63}"),
    (dict(pad_token_id=1.0), "pad_token_id: expected an int token id (int64), got 1.0"),
    (dict(eos_token_id=[1, "a"]), "eos_token_id: expected an int token id (int64), got 'a'"),
    (dict(eos_token_id=-(2**64)), "eos_token_id: expected an int token id (int64)"),
    (dict(decoder_start_token_id="0"), "decoder_start_token_id: expected an int token id"),
    (dict(stop=5), "stop: expected a non-empty str or a list of them, got 5"),
    (dict(stop=["a", ""]), "stop: expected a non-empty str or a list of them"),
]


@pytest.mark.parametrize("kwargs, culprit", BAD_OPTIONS, ids=[m[:24] for _, m in BAD_OPTIONS])
def test_bad_options_refused_naming_them(kwargs, culprit):
    with pytest.raises(ValueError, match=re.escape(culprit)):
        GenerationConfig(**kwargs)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_generate_checks_every_option_before_any_kernel(models, family, no_kernel_launches):
    model = models[family]
    prompt = ids([[3, 4, 5]])
    for kwargs, culprit in BAD_OPTIONS:
        with pytest.raises(ValueError, match=re.escape(culprit)):
            model.generate(prompt, **{"max_new_tokens": 2, **kwargs})
        base = GenerationConfig(max_new_tokens=2)
        with pytest.raises(ValueError, match=re.escape(culprit)):  # over a generation_config
            model.generate(prompt, generation_config=base, **kwargs)
    with pytest.raises(TypeError, match="unexpected generation argument.*: beams, top_q"):
        model.generate(prompt, top_q=0.5, beams=2)
    with pytest.raises(TypeError, match="generation_config: expected a zoo GenerationConfig"):
        model.generate(prompt, generation_config={"top_k": 1})


def test_kwargs_override_the_generation_config(models):
    model = models["llama"]
    prompt = ids([[3, 4, 5, 6], [7, 8, 9, 10]])
    greedy = GenerationConfig(eos_token_id=[], max_new_tokens=6)
    expected = model.generate(prompt, generation_config=greedy)
    assert expected.shape == (2, 10)
    # the model's own config samples (generation_config.json); a greedy config or keyword wins
    assert torch.equal(model.generate(prompt, None, 6, do_sample=False, eos_token_id=[]), expected)
    sampled = GenerationConfig(do_sample=True, top_k=1, seed=3, eos_token_id=[])
    assert torch.equal(
        model.generate(prompt, max_new_tokens=6, generation_config=sampled), expected
    )
    other = model.generate(prompt, generation_config=greedy, max_new_tokens=3)
    assert torch.equal(other, expected[:, :7])


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_min_p_one_is_greedy_and_seeded_min_p_reproduces(models, family):
    # min_p=1 keeps only the most likely token: sampling then equals greedy
    model = models[family]
    prompt = ids([[3, 4, 5, 6], [9, 8, 7, 6]])
    common = dict(max_new_tokens=5, eos_token_id=[])
    greedy = model.generate(prompt, do_sample=False, **common)
    min_p_1 = model.generate(prompt, do_sample=True, temperature=3.0, min_p=1.0, seed=1, **common)
    assert torch.equal(min_p_1, greedy)
    kwargs = dict(do_sample=True, temperature=2.0, min_p=0.02, **common)
    first = model.generate(prompt, seed=5, **kwargs)
    assert torch.equal(first, model.generate(prompt, seed=5, **kwargs))


# ---------------------------------------------------------------------------- the contract


def test_models_keep_the_contract(models):
    llama, t5 = models["llama"], models["t5"]
    assert isinstance(llama, DecoderOnlyLM) and llama.padding_side == "left"
    assert isinstance(t5, GenerativeLM) and not isinstance(t5, DecoderOnlyLM)
    assert t5.padding_side == "right"
    for model in (llama, t5):
        assert isinstance(model.engine, GenerationEngine) and model.engine.model is model
        assert not any(key.startswith("_decode") for key in vars(model))


def test_a_copied_model_has_its_own_engine(models):
    import copy

    model = models["t5"]
    twin = copy.deepcopy(model)
    assert twin.engine is not model.engine and twin.engine.model is twin
    assert model.engine.model is model


def test_engine_reset_frees_the_runner_and_ends_the_stream(models):
    model = models["llama"]
    model.generate(ids([[3, 4]]), max_new_tokens=2, eos_token_id=[])
    assert model.engine.kept_runner is not None
    model.engine.reset()
    assert model.engine.kept_runner is None


# ---------------------------------------------------------------------------- tokenizer ids


class WideTokenizer:
    """A tokenizer of another checkpoint: its ids go beyond the model's vocabulary."""

    class Encoding:
        def __init__(self, ids):
            self.ids = ids

    def encode(self, text):
        return self.Encoding([3, 4, 1000 + len(text)])

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_tokenizer_ids_outside_the_vocabulary_blame_the_tokenizer(
    models, family, no_kernel_launches
):
    model = models[family]
    model.tokenizer = WideTokenizer()
    try:
        vocab = model.config.vocab_size
        with pytest.raises(
            ValueError,
            match=rf"prompt 'hi': the tokenizer produced token id 1002, outside the model's "
            rf"vocabulary \[0, {vocab}\)",
        ):
            model.generate(["hi", "hello"], max_new_tokens=2)
    finally:
        model.tokenizer = None


# ---------------------------------------------------------------------------- bounded work


def test_t5_refuses_a_generation_beyond_memory_fast(models, no_kernel_launches):
    model = models["t5"]
    with pytest.raises(ValueError, match=r"max_new_tokens=10000000000: .* GiB .* available on"):
        model.generate(ids([[3, 4, 5]]), max_new_tokens=10**10)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_generation_refused_when_the_device_lacks_memory(
    models, family, monkeypatch, no_kernel_launches
):
    model = models[family]
    model.engine.reset()  # nothing kept that a new runner would free
    monkeypatch.setattr(engine_module, "memory_budget", lambda device: 2**16)
    max_new_tokens = 10**7 if family == "t5" else 40
    with pytest.raises(ValueError, match=rf"max_new_tokens={max_new_tokens}: a batch of 64 rows"):
        model.generate(ids([[3, 4, 5]] * 64), max_new_tokens=max_new_tokens)
    assert model.engine.kept_runner is None  # nothing allocated


# ---------------------------------------------------------------------------- threads


def test_two_threads_generate_one_after_the_other(models):
    model = models["llama"]
    prompts = [ids([[3, 4, 5, 6]]), ids([[9, 10, 11, 12, 13]])]
    kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=[])
    expected = [model.generate(p, **kwargs) for p in prompts]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            for _ in range(2):
                out = model.generate(prompts[index], **kwargs)
                assert torch.equal(out, expected[index])
            results[index] = out
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(torch.equal(results[i], expected[i]) for i in range(2))


# ---------------------------------------------------------------------------- torch.compile


def test_value_checks_are_skipped_while_tracing(monkeypatch):
    bad = torch.tensor([[1, 99]])
    with pytest.raises(ValueError, match="token id 99"):
        check_input_ids(bad, 50, bad.device)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    check_input_ids(bad, 50, bad.device)  # no .item() while tracing
    with pytest.raises(ValueError, match="expected int64 or int32"):
        check_input_ids(bad.float(), 50, bad.device)  # dtype checks stay


def test_generation_config_json_values_are_checked_at_load(folders, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((folders["llama"] / name).read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 2.0}))
    with pytest.raises(ValueError, match=re.escape("top_p: expected a number in (0, 1], got 2.0")):
        zoo.load(tmp_path, device=DEVICE)
