"""Architectures by config.json `model_type`: (config class, model class, key map)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    config_from_hf: Callable[[dict], object]
    model_class: type
    key_map: Callable[[object], dict]
    # checkpoint key -> the key map's spelling (e.g. without a `transformer.` prefix)
    normalize_key: Callable[[str], str] = lambda key: key
    # (config, the checkpoint's tensor names) -> the config of what the checkpoint holds (e.g. Bert
    # with or without a pooler); None: config.json alone decides
    config_from_checkpoint: Callable[[object, set[str]], object] | None = None
    # model_class(config, tp=...) and key_map(config, shard) build and load one rank's share
    tensor_parallel: bool = False


def _llama() -> Family:
    from convert.llama import key_map
    from zoo.models.llama import Llama, LlamaConfig

    return Family(LlamaConfig.from_hf, Llama, key_map, tensor_parallel=True)


def _t5() -> Family:
    from convert.t5 import key_map
    from zoo.models.t5 import T5, T5Config

    return Family(T5Config.from_hf, T5, key_map)


def _gpt2() -> Family:
    from convert.gpt2 import key_map, normalize_key
    from zoo.models.gpt2 import GPT2, GPT2Config

    return Family(GPT2Config.from_hf, GPT2, key_map, normalize_key, tensor_parallel=True)


def _bert() -> Family:
    from convert.bert import config_from_checkpoint, key_map, normalize_key
    from zoo.models.bert import Bert, BertConfig

    return Family(
        BertConfig.from_hf,
        Bert,
        key_map,
        normalize_key=normalize_key,
        config_from_checkpoint=config_from_checkpoint,
    )


# model_type -> the architectures config.json may name for it, and the family's loader
FAMILIES: dict[str, tuple[tuple[str, ...], Callable[[], Family]]] = {
    "llama": (("LlamaForCausalLM",), _llama),
    "granite": (("GraniteForCausalLM",), _llama),
    "mistral": (("MistralForCausalLM",), _llama),
    "qwen2": (("Qwen2ForCausalLM",), _llama),
    "qwen3": (("Qwen3ForCausalLM",), _llama),
    "t5": (("T5ForConditionalGeneration",), _t5),
    "gpt2": (("GPT2LMHeadModel", "GPT2Model"), _gpt2),
    "bert": (("BertModel", "BertForMaskedLM", "BertForPreTraining"), _bert),
}


def family_for(hf_config: dict, source: str) -> Family:
    """The family of a checkpoint, chosen from its own config.json."""
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"{source}: unsupported model_type {model_type!r}; supported: {', '.join(FAMILIES)}"
        )
    architectures, make = FAMILIES[model_type]
    named = hf_config.get("architectures") or []
    unknown = [a for a in named if a not in architectures]
    if unknown:
        raise ValueError(
            f"{source}: unsupported architectures {unknown} for model_type {model_type!r}; "
            f"supported: {', '.join(architectures)}"
        )
    return make()
