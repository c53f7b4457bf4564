"""Named presets: the real architecture (the checkpoint's own config.json) and its HF repo id.

Each family has one base config; a preset is the base plus the few keys its checkpoint changes
(sizes, rope scaling, vocabulary), and its variants (base / instruct, ...) differ only in repo
id, eos ids and the like.
"""

from dataclasses import dataclass, field

# Each `config` holds the keys of the published config.json that shape the network (plus
# `architectures`, `model_type`, the special-token ids and `torch_dtype` where published), with
# HF's own key names and values.  Training-only keys (dropout rates, initializer ranges,
# `use_cache`, `transformers_version`, `task_specific_params`, ...) are left out.
#
# A key marked `# default` is NOT in the published config.json: it is the value the HF config
# class falls back to, written out because the architecture depends on it.


@dataclass(frozen=True)
class ModelEntry:
    name: str
    repo_id: str
    config: dict  # config.json as published (HF key names)
    # generation_config.json (eos/bos/pad ids)
    generation_config: dict = field(default_factory=dict)


_ENTRIES: list[ModelEntry] = []


def _add(name: str, repo_id: str, config: dict, generation_config: dict | None = None) -> None:
    _ENTRIES.append(ModelEntry(name, repo_id, config, generation_config or {}))


def _ids(config: dict, *keys: str) -> dict:
    """The token ids of `config` that generation_config.json repeats."""
    return {key: config[key] for key in keys}


# ------------------------------------------------------------------------------------- Llama 3
_LLAMA3 = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "mlp_bias": False,  # default (LlamaConfig) in Llama 3's config.json, published from 3.1 on
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
_LLAMA_70B = {"hidden_size": 8192, "intermediate_size": 28672}
_LLAMA_70B |= {"num_attention_heads": 64, "num_hidden_layers": 80}


def _llama3_rope(factor: float) -> dict:
    """Llama 3.1+'s 128k context: llama3 rope scaling of the 8k-trained rope."""
    rope_scaling = {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    rope_scaling |= {"original_max_position_embeddings": 8192, "rope_type": "llama3"}
    return {"max_position_embeddings": 131072, "rope_scaling": rope_scaling}


# Llama 3's instruct config.json names <|eot_id|> alone, its generation_config.json adds
# <|end_of_text|>; from 3.1 on both list all three end tokens (+ <|eom_id|>)
_LLAMA3_CHAT = ({"eos_token_id": 128009}, [128001, 128009])
_EOS_LLAMA31 = [128001, 128008, 128009]
_LLAMA31_CHAT = ({"eos_token_id": _EOS_LLAMA31}, _EOS_LLAMA31)
_LLAMA_3_2_1B = {"head_dim": 64, "hidden_size": 2048, "intermediate_size": 8192}
_LLAMA_3_2_1B |= {"num_hidden_layers": 16, "tie_word_embeddings": True}
_LLAMA_3_2_3B = {"head_dim": 128, "hidden_size": 3072, "intermediate_size": 8192}
_LLAMA_3_2_3B |= {"num_attention_heads": 24, "num_hidden_layers": 28, "tie_word_embeddings": True}
_ROPE_3_1, _ROPE_3_2 = _llama3_rope(8.0), _llama3_rope(32.0)
_LLAMA_SIZES = [
    # name, repo id, the preset's delta, instruct (config delta, generation eos), base published
    ("llama3-8b", "meta-llama/Meta-Llama-3-8B", {}, _LLAMA3_CHAT, True),
    ("llama3-70b", "meta-llama/Meta-Llama-3-70B", _LLAMA_70B, _LLAMA3_CHAT, True),
    ("llama3.1-8b", "meta-llama/Llama-3.1-8B", _ROPE_3_1, _LLAMA31_CHAT, True),
    ("llama3.1-70b", "meta-llama/Llama-3.1-70B", _LLAMA_70B | _ROPE_3_1, _LLAMA31_CHAT, True),
    ("llama3.2-1b", "meta-llama/Llama-3.2-1B", _LLAMA_3_2_1B | _ROPE_3_2, _LLAMA31_CHAT, True),
    ("llama3.2-3b", "meta-llama/Llama-3.2-3B", _LLAMA_3_2_3B | _ROPE_3_2, _LLAMA31_CHAT, True),
    # Llama 3.3 was published as an instruct checkpoint only
    ("llama3.3-70b", "meta-llama/Llama-3.3-70B", _LLAMA_70B | _ROPE_3_1, _LLAMA31_CHAT, False),
]
for _name, _repo, _delta, (_chat_delta, _chat_eos), _has_base in _LLAMA_SIZES:
    _config = _LLAMA3 | _delta
    if _has_base:
        _add(_name, _repo, _config, _ids(_config, "bos_token_id", "eos_token_id"))
    _add(
        f"{_name}-instruct",
        f"{_repo}-Instruct",
        _config | _chat_delta,
        {"bos_token_id": 128000, "eos_token_id": _chat_eos},
    )

# ---------------------------------------------------------------- Granite Code (Llama layout)
# The plain ids "ibm-granite/granite-8b-code-base" / "-instruct" are the old names; the repos now
# live under the "-4k" suffix (the plain names only redirect there).
_GRANITE_CODE = _LLAMA3 | {
    "attention_bias": True,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "max_position_embeddings": 4096,
    "mlp_bias": True,
    "num_hidden_layers": 36,
    "rope_theta": 10000000.0,
    "tie_word_embeddings": True,
    "vocab_size": 49152,
}
for _variant in ("base", "instruct"):
    _add(
        f"granite-8b-code-{_variant}",
        f"ibm-granite/granite-8b-code-{_variant}-4k",
        _GRANITE_CODE,
        _ids(_GRANITE_CODE, "bos_token_id", "eos_token_id"),
    )

# ------------------------------------------------------------------------------- Granite 3.3
_GRANITE = {
    "architectures": ["GraniteForCausalLM"],
    "attention_bias": False,
    "attention_multiplier": 0.015625,
    "bos_token_id": 0,
    "embedding_multiplier": 12.0,
    "eos_token_id": 0,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "logits_scaling": 8.0,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "granite",
    "num_attention_heads": 32,
    "num_hidden_layers": 40,
    "num_key_value_heads": 8,
    "pad_token_id": 0,
    "residual_multiplier": 0.22,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "vocab_size": 49159,
}
_GRANITE_8B = {"attention_multiplier": 0.0078125, "hidden_size": 4096}
_GRANITE_8B |= {"intermediate_size": 12800, "logits_scaling": 16.0}
for _size, _delta in (("2b", {}), ("8b", _GRANITE_8B)):
    _config = _GRANITE | _delta
    _add(
        f"granite-3.3-{_size}-instruct",
        f"ibm-granite/granite-3.3-{_size}-instruct",
        _config,
        _ids(_config, "bos_token_id", "eos_token_id", "pad_token_id"),
    )

# ----------------------------------------------------------------------------------- Mistral
_MISTRAL = {
    "architectures": ["MistralForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 32000,
}
# v0.3: a larger vocabulary (control tokens), rope theta 1e6, full attention over 32k
_MISTRAL_V03 = {"rope_theta": 1000000.0, "sliding_window": None, "vocab_size": 32768}
for _version, _delta in (("v0.1", {}), ("v0.3", _MISTRAL_V03)):
    _config = _MISTRAL | _delta
    for _name, _repo in (("", ""), ("-instruct", "-Instruct")):
        _add(
            f"mistral-7b{_name}-{_version}",
            f"mistralai/Mistral-7B{_repo}-{_version}",
            _config,
            _ids(_config, "bos_token_id", "eos_token_id"),
        )

# ----------------------------------------------------------------------------------- Qwen2.5
# Qwen2's config.json names a sliding window, but `use_sliding_window: false` turns it off.
_QWEN25 = {
    "architectures": ["Qwen2ForCausalLM"],
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "model_type": "qwen2",
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
    "vocab_size": 151936,
}
_QWEN_CHAT = {"eos_token_id": 151645}  # <|im_end|>
# generation stops at <|im_end|> or <|endoftext|>, and pads with <|endoftext|>
_QWEN_CHAT_GENERATION = {"bos_token_id": 151643, "eos_token_id": [151645, 151643]}
_QWEN_CHAT_GENERATION |= {"pad_token_id": 151643}
_QWEN25_SIZES = [
    # size, architecture, then base and instruct context: (max_position_embeddings,
    # max_window_layers, sliding_window)
    (
        "0.5b",
        {"hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14}
        | {"num_hidden_layers": 24, "num_key_value_heads": 2, "tie_word_embeddings": True},
        (32768, 24, 32768),
        (32768, 21, 32768),
    ),
    (
        "1.5b",
        {"hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12}
        | {"num_hidden_layers": 28, "num_key_value_heads": 2, "tie_word_embeddings": True},
        (131072, 28, 131072),
        (32768, 21, 32768),
    ),
    (
        "7b",
        {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28}
        | {"num_hidden_layers": 28, "num_key_value_heads": 4, "tie_word_embeddings": False}
        | {"vocab_size": 152064},
        (131072, 28, 131072),
        (32768, 28, 131072),
    ),
]
_CONTEXT_KEYS = ("max_position_embeddings", "max_window_layers", "sliding_window")
for _size, _delta, _base_context, _chat_context in _QWEN25_SIZES:
    _config = _QWEN25 | _delta | dict(zip(_CONTEXT_KEYS, _base_context, strict=True))
    _repo = f"Qwen/Qwen2.5-{_size.upper()}"
    _add(f"qwen2.5-{_size}", _repo, _config, _ids(_config, "bos_token_id", "eos_token_id"))
    _chat_config = _config | _QWEN_CHAT | dict(zip(_CONTEXT_KEYS, _chat_context, strict=True))
    _add(f"qwen2.5-{_size}-instruct", f"{_repo}-Instruct", _chat_config, _QWEN_CHAT_GENERATION)

# ------------------------------------------------------------------------------------- Qwen3
# The Qwen/Qwen3-* repos are the post-trained (thinking / non-thinking) chat checkpoints.
_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 40960,
    "model_type": "qwen3",
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
    "vocab_size": 151936,
}
for _size, _hidden, _intermediate, _heads, _layers in (
    ("0.6b", 1024, 3072, 16, 28),
    ("1.7b", 2048, 6144, 16, 28),
    ("4b", 2560, 9728, 32, 36),
    ("8b", 4096, 12288, 32, 36),
):
    _add(
        f"qwen3-{_size}",
        f"Qwen/Qwen3-{_size.upper()}",
        _QWEN3
        | {"hidden_size": _hidden, "intermediate_size": _intermediate}
        | {"num_attention_heads": _heads, "num_hidden_layers": _layers}
        | {"max_window_layers": _layers, "tie_word_embeddings": _size != "8b"},
        _QWEN_CHAT_GENERATION,
    )

# ------------------------------------------------------------------------------------- GPT-2
_GPT2 = {
    "activation_function": "gelu_new",
    "architectures": ["GPT2LMHeadModel"],
    "bos_token_id": 50256,
    "eos_token_id": 50256,
    "layer_norm_epsilon": 1e-05,
    "model_type": "gpt2",
    "n_ctx": 1024,
    "n_inner": None,  # default (GPT2Config): 4 * n_embd
    "n_positions": 1024,
    "tie_word_embeddings": True,  # default (GPT2Config)
    "vocab_size": 50257,
}
for _name, _width, _heads, _layers in (
    ("gpt2", 768, 12, 12),
    ("gpt2-medium", 1024, 16, 24),
    ("gpt2-large", 1280, 20, 36),
    ("gpt2-xl", 1600, 25, 48),
):
    _config = _GPT2 | {"n_embd": _width, "n_head": _heads, "n_layer": _layers}
    _add(
        _name,
        f"openai-community/{_name}",
        _config,
        _ids(_config, "bos_token_id", "eos_token_id"),
    )

# -------------------------------------------------------------------------------------- BERT
_BERT = {
    "architectures": ["BertForMaskedLM"],
    "hidden_act": "gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "type_vocab_size": 2,
    "vocab_size": 30522,
}
_add("bert-base-uncased", "google-bert/bert-base-uncased", _BERT)
_add(
    "bert-large-uncased",
    "google-bert/bert-large-uncased",
    _BERT
    | {"hidden_size": 1024, "intermediate_size": 4096}
    | {"num_attention_heads": 16, "num_hidden_layers": 24},
)
_add(
    "all-minilm-l6-v2",
    "sentence-transformers/all-MiniLM-L6-v2",
    _BERT
    | {"architectures": ["BertModel"], "hidden_size": 384, "intermediate_size": 1536}
    | {"num_hidden_layers": 6},
)

# ----------------------------------------------------------------------- T5 (v1.0), Flan-T5
_T5 = {
    "architectures": ["T5ForConditionalGeneration"],
    "d_kv": 64,
    "decoder_start_token_id": 0,
    "eos_token_id": 1,
    "feed_forward_proj": "relu",  # default (T5Config)
    "is_encoder_decoder": True,
    "layer_norm_epsilon": 1e-06,
    "model_type": "t5",
    "n_positions": 512,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,  # default (T5Config)
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": True,  # default (T5Config)
    "vocab_size": 32128,
}
# Flan-T5 is T5 v1.1: gated-GELU feed-forward, an lm_head of its own; every key is published
_FLAN_T5 = _T5 | {"dense_act_fn": "gelu_new", "feed_forward_proj": "gated-gelu"}
_FLAN_T5 |= {"is_gated_act": True, "tie_word_embeddings": False, "torch_dtype": "float32"}
_T5_GENERATION = _ids(_T5, "decoder_start_token_id", "eos_token_id", "pad_token_id")
for _name, _repo, _base, _d_model, _d_ff, _heads, _layers in (
    ("t5-small", "google-t5/t5-small", _T5, 512, 2048, 8, 6),
    ("t5-base", "google-t5/t5-base", _T5, 768, 3072, 12, 12),
    ("t5-large", "google-t5/t5-large", _T5, 1024, 4096, 16, 24),
    ("flan-t5-small", "google/flan-t5-small", _FLAN_T5, 512, 1024, 6, 8),
    ("flan-t5-base", "google/flan-t5-base", _FLAN_T5, 768, 2048, 12, 12),
    ("flan-t5-large", "google/flan-t5-large", _FLAN_T5, 1024, 2816, 16, 24),
):
    _config = _base | {"d_model": _d_model, "d_ff": _d_ff, "num_heads": _heads}
    # num_decoder_layers: published for Flan-T5, the T5Config default (num_layers) for T5 v1.0
    _config |= {"num_layers": _layers, "num_decoder_layers": _layers}
    _add(_name, _repo, _config, _T5_GENERATION)

REGISTRY: dict[str, ModelEntry] = {e.name: e for e in _ENTRIES}


def list_models() -> list[str]:
    """Every preset name, sorted."""
    return sorted(REGISTRY)


def get_entry(name: str) -> ModelEntry:
    """The preset called `name`; KeyError naming the known presets if there is none."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown model {name!r}; known models: {', '.join(list_models())}"
        ) from None
