"""Architectures by config.json `model_type`: (config class, model class, key map)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    config_from_hf: Callable[[dict], object]
    model_class: type
    key_map: Callable[[object], dict]


def _llama() -> Family:
    from convert.llama import key_map
    from zoo.models.llama import Llama, LlamaConfig

    return Family(LlamaConfig.from_hf, Llama, key_map)


# model_type -> the architectures config.json may name for it, and the family's loader
FAMILIES: dict[str, tuple[tuple[str, ...], Callable[[], Family]]] = {
    "llama": (("LlamaForCausalLM",), _llama),
    "granite": (("GraniteForCausalLM",), _llama),
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
