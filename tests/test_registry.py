"""The registry: every preset is a real checkpoint's config.json, with its real parameter count.

Counts are built on the meta device (shapes only, nothing allocated), so every preset runs.
"""

import re

import pytest
import torch

import zoo
from zoo.models import FAMILIES
from zoo.registry import _ENTRIES, REGISTRY, get_entry, list_models

transformers = pytest.importorskip("transformers")

# Unique parameters of each real checkpoint (a tied head counted once), as transformers counts
# them for the preset's config; the note above each group says what else confirms the number:
# "total_size" is model.safetensors.index.json's metadata.total_size in bytes (bf16: 2 per
# parameter); "card" is the model card's parameter count (Qwen's also states the non-embedding
# count, which pins whether the head is tied); "hub" is the size the model's Hub page shows.
PARAMETER_COUNTS = {
    # total_size 16,060,522,496
    "llama3-8b": 8_030_261_248,
    "llama3-8b-instruct": 8_030_261_248,
    "llama3.1-8b": 8_030_261_248,
    "llama3.1-8b-instruct": 8_030_261_248,
    # total_size 141,107,412,992
    "llama3-70b": 70_553_706_496,
    "llama3-70b-instruct": 70_553_706_496,
    "llama3.1-70b": 70_553_706_496,
    "llama3.1-70b-instruct": 70_553_706_496,
    "llama3.3-70b-instruct": 70_553_706_496,
    # tied head; card: 1.23B / 3.21B
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-1b-instruct": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
    "llama3.2-3b-instruct": 3_212_749_824,
    # q/k/v/o and MLP biases, tied head; hub: 8.05B
    "granite-8b-code-base": 8_054_910_976,
    "granite-8b-code-instruct": 8_054_910_976,
    # tied head; hub: 2.53B / 8.17B
    "granite-3.3-2b-instruct": 2_533_539_840,
    "granite-3.3-8b-instruct": 8_170_864_640,
    # total_size 14,483,464,192 (v0.1) / 14,496,047,104 (v0.3: 768 more rows of vocabulary)
    "mistral-7b-v0.1": 7_241_732_096,
    "mistral-7b-instruct-v0.1": 7_241_732_096,
    "mistral-7b-v0.3": 7_248_023_552,
    "mistral-7b-instruct-v0.3": 7_248_023_552,
    # q/k/v biases; card: 0.49B (0.36B non-embedding, tied), 1.54B (1.31B, tied),
    # 7.61B (6.53B, own head)
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-0.5b-instruct": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-1.5b-instruct": 1_543_714_304,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-7b-instruct": 7_615_616_512,
    # q/k norms; card: 0.6B (0.44B non-embedding, tied), 1.7B (1.4B, tied), 4.0B (3.6B, tied),
    # 8.2B (6.95B, own head). The Hub shows 752M and 2.03B for 0.6B and 1.7B: their safetensors
    # also hold lm_head.weight, a copy of the tied embedding, counted once here
    "qwen3-0.6b": 596_049_920,
    "qwen3-1.7b": 1_720_574_976,
    "qwen3-4b": 4_022_468_096,
    "qwen3-8b": 8_190_735_360,
    # GPT2LMHeadModel, tied head; the checkpoints also store each layer's causal mask
    # (attn.bias), a buffer, not a parameter (so the Hub shows 137M for gpt2)
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    # BertModel with its pooler (what the zoo loads); bert-*-uncased also hold the pre-training
    # heads (cls.*), which the zoo does not load
    "bert-base-uncased": 109_482_240,
    "bert-large-uncased": 335_141_888,
    "all-minilm-l6-v2": 22_713_216,
    # T5 v1.0: head tied to `shared`
    "t5-small": 60_506_624,
    "t5-base": 222_903_552,
    "t5-large": 737_668_096,
    # Flan-T5 (T5 v1.1): an lm_head of its own
    "flan-t5-small": 76_961_152,
    "flan-t5-base": 247_577_856,
    "flan-t5-large": 783_150_080,
}


def hf_parameter_count(config: dict) -> int:
    """Unique parameters of the transformers model of `config`, built on the meta device."""
    hf_config = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        if hf_config.model_type == "bert":
            model = transformers.BertModel(hf_config)
        elif hf_config.model_type == "t5":
            model = transformers.T5ForConditionalGeneration(hf_config)
        else:
            model = transformers.AutoModelForCausalLM.from_config(hf_config)
    count = sum(p.numel() for p in model.parameters())
    if hf_config.model_type == "t5" and config["tie_word_embeddings"] is False:
        # transformers 5.x ties T5's lm_head to `shared` whatever the flag says; the checkpoint
        # holds a head of its own
        count += config["vocab_size"] * config["d_model"]
    return count


def test_every_preset_has_a_pinned_count():
    assert sorted(PARAMETER_COUNTS) == list_models()


@pytest.mark.parametrize("name", list_models())
def test_zoo_meta_build_has_the_checkpoint_parameter_count(name):
    model_type = get_entry(name).config["model_type"]
    if model_type not in FAMILIES:
        pytest.skip(f"model_type {model_type!r} has no zoo model yet")
    model = zoo.load(name, pretrained=False, device="meta")
    assert sum(p.numel() for p in model.parameters()) == PARAMETER_COUNTS[name]


@pytest.mark.parametrize("name", list_models())
def test_transformers_builds_the_pinned_parameter_count(name):
    assert hf_parameter_count(get_entry(name).config) == PARAMETER_COUNTS[name]


@pytest.mark.parametrize("name", list_models())
def test_config_loads_through_autoconfig(name):
    config = get_entry(name).config
    hf_config = transformers.AutoConfig.for_model(**config)
    assert hf_config.model_type == config["model_type"]
    # every architecture the preset names is one transformers knows for that model_type
    for architecture in config.get("architectures", []):
        assert hasattr(transformers, architecture), architecture


def test_names_and_repo_ids_are_unique_and_well_formed():
    names = [entry.name for entry in _ENTRIES]
    repo_ids = [entry.repo_id for entry in _ENTRIES]
    assert len(set(names)) == len(names)
    assert len(set(repo_ids)) == len(repo_ids)
    assert len(REGISTRY) == len(_ENTRIES)
    for entry in _ENTRIES:
        assert re.fullmatch(r"[a-z0-9][a-z0-9.-]*", entry.name), entry.name
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", entry.repo_id), entry.repo_id


@pytest.mark.parametrize(
    "name", [name for name in list_models() if get_entry(name).generation_config]
)
def test_generation_stops_at_the_config_eos(name):
    """generation_config.json's eos ids include config.json's (instruct checkpoints add their
    end-of-turn token there)."""
    entry = get_entry(name)

    def ids(value):
        return set(value) if isinstance(value, list) else {value}

    config_eos = ids(entry.config["eos_token_id"])
    assert config_eos <= ids(entry.generation_config["eos_token_id"])
    for key in ("bos_token_id", "pad_token_id", "decoder_start_token_id"):
        if key in entry.generation_config and key in entry.config:
            assert entry.generation_config[key] == entry.config[key], key


def test_instruct_variants_differ_from_their_base_only_in_end_tokens():
    for name in list_models():
        base_name = name.replace("-instruct", "")
        if base_name == name or base_name not in REGISTRY:
            continue
        base, chat = get_entry(base_name).config, get_entry(name).config
        # Qwen2.5's instruct checkpoints were published for a 32k context
        context = {"eos_token_id", "max_position_embeddings", "max_window_layers"}
        context |= {"sliding_window"}
        differing = {key for key in base.keys() | chat.keys() if base.get(key) != chat.get(key)}
        assert differing <= context, (name, differing)
