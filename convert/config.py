"""config.json values, read with their types and ranges checked before anything is allocated.

Every family's `from_hf` reads its keys through these readers, so a wrong value (a negative or
string size, a bool where a count belongs, a head count that does not divide the width) fails
with a message naming the key and the value, instead of a torch or allocator error later:

    hidden = read_int(hf, "hidden_size", min=1)
    eps = read_float(hf, "rms_norm_eps", 1e-6, min=0.0)
    theta, scaling = rope_settings(hf)

A missing required key raises KeyError(key) (zoo.load turns it into a CheckpointError naming the
checkpoint and model_type); a bad value raises ValueError naming the key.
"""

from __future__ import annotations

import math

REQUIRED = object()  # default of a key that config.json must have

# Upper bounds far above any published checkpoint: a value beyond them is a typo or a corrupt file,
# and refusing it here beats an allocator error (or minutes of work) later.
MAX_SIZE = 1 << 24  # vocab, hidden, intermediate sizes; positions
MAX_COUNT = 1 << 12  # layers, heads

# The rope types transformers knows (modeling_rope_utils.ROPE_INIT_FUNCTIONS, plus "default"), and
# the ones the rotary kernels implement. Either spelling of the type key is read, as transformers
# reads it: "rope_type", else the older "type".
KNOWN_ROPE_TYPES = (
    "default",
    "linear",
    "dynamic",
    "yarn",
    "longrope",
    "llama3",
    "proportional",
)
SUPPORTED_ROPE_TYPES = ("default", "llama3")
# rope types whose original_max_position_embeddings transformers fills from the config when absent
ROPE_TYPES_WITH_ORIGINAL_LENGTH = ("llama3", "yarn", "longrope")
DEFAULT_ROPE_THETA = 10_000.0


def _value(hf: dict, key: str, default):
    value = hf.get(key)
    if value is None:  # absent, or written as null (transformers treats both as its default)
        if default is REQUIRED:
            raise KeyError(key)
        return default
    return value


def read_int(
    hf: dict, key: str, default=REQUIRED, *, min: int | None = None, max: int | None = None
) -> int:
    """config.json's integer `key` (bools refused), within [min, max]; `default` when absent."""
    value = _value(hf, key, default)
    if value is default and default is not REQUIRED:
        return value
    if isinstance(value, float) and value.is_integer():  # 4096.0 written by some exporters
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"config.json {key}: expected an integer, got {value!r}")
    _check_range(key, value, min, max)
    return value


def read_float(
    hf: dict,
    key: str,
    default=REQUIRED,
    *,
    min: float | None = None,
    max: float | None = None,
    positive: bool = False,
) -> float:
    """config.json's number `key` (finite; > 0 with positive=True), within [min, max]."""
    value = _value(hf, key, default)
    if value is default and default is not REQUIRED:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"config.json {key}: expected a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"config.json {key}: expected a positive number, got {value!r}")
    _check_range(key, value, min, max)
    return float(value)


def read_bool(hf: dict, key: str, default=REQUIRED) -> bool:
    value = _value(hf, key, default)
    if not isinstance(value, bool):
        raise ValueError(f"config.json {key}: expected true or false, got {value!r}")
    return value


def read_str(hf: dict, key: str, default=REQUIRED) -> str:
    value = _value(hf, key, default)
    if not isinstance(value, str):
        raise ValueError(f"config.json {key}: expected a string, got {value!r}")
    return value


def read_size(hf: dict, key: str, default=REQUIRED) -> int:
    """A width, vocabulary or length: an integer in [1, MAX_SIZE]."""
    return read_int(hf, key, default, min=1, max=MAX_SIZE)


def read_count(hf: dict, key: str, default=REQUIRED) -> int:
    """A number of layers or heads: an integer in [1, MAX_COUNT]."""
    return read_int(hf, key, default, min=1, max=MAX_COUNT)


def read_token_ids(hf: dict, key: str, default=None):
    """A token id or a list of them (eos_token_id may be either); None when absent."""
    value = hf.get(key, default)
    if value is None:
        return None
    ids = value if isinstance(value, list) else [value]
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(
                f"config.json {key}: expected a token id (integer >= 0) or a list of them, "
                f"got {value!r}"
            )
    return value


def check_divisible(key: str, value: int, by_key: str, by: int) -> None:
    if value % by:
        raise ValueError(f"config.json {key} {value} is not a multiple of {by_key} {by}")


def _check_range(key: str, value, low, high) -> None:
    if low is not None and value < low:
        raise ValueError(f"config.json {key}: expected a value >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"config.json {key}: expected a value <= {high}, got {value!r}")


def rope_settings(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, the rope scaling dict or None for plain rope), read as transformers 5.x reads
    them (RotaryEmbeddingConfigMixin.convert_rope_params_to_dict):
    - the scaling dict is `rope_scaling` (transformers 4 spelling) when it is set and non-empty,
      else `rope_parameters` (transformers 5): rope_scaling wins when a config has both;
    - rope_theta is the dict's own rope_theta, else the top-level rope_theta, else 10000;
    - the type is the dict's rope_type, else its older `type`, else "default";
    - llama3 / yarn / longrope take original_max_position_embeddings from the top level when the
      config has it there, else from the dict, else max_position_embeddings.
    A type the rotary kernels do not implement (linear, dynamic, yarn, ...), a nested per-layer
    dict and a partial_rotary_factor other than 1 are refused naming the key they came from."""
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = hf.get(key) or {}
    if not isinstance(rope, dict):
        raise ValueError(f"config.json {key}: expected an object, got {rope!r}")
    if any(isinstance(v, dict) for v in rope.values()):
        raise ValueError(
            f"config.json {key}: rope parameters per layer type ({', '.join(rope)}) are unsupported"
        )
    rope = dict(rope)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        known = "" if rope_type in KNOWN_ROPE_TYPES else " (not a rope type transformers knows)"
        raise ValueError(
            f"unsupported rope_type {rope_type!r}{known} (config.json {key}); "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    theta_source = rope if rope.get("rope_theta") is not None else hf
    theta = read_float(theta_source, "rope_theta", DEFAULT_ROPE_THETA, positive=True)
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial is not None and partial != 1:
        raise ValueError(
            f"config.json partial_rotary_factor {partial!r}: rope on part of each head is "
            "unsupported"
        )
    if rope_type == "default":
        return theta, None
    rope["rope_type"] = rope_type
    rope.pop("type", None)
    if rope_type in ROPE_TYPES_WITH_ORIGINAL_LENGTH:
        original = hf.get("original_max_position_embeddings")
        if original is None:
            original = rope.get("original_max_position_embeddings")
        if original is None:
            original = hf.get("max_position_embeddings")
        if original is not None:
            rope["original_max_position_embeddings"] = original
    for name in ("factor", "low_freq_factor", "high_freq_factor"):
        if name in rope:
            read_float(rope, name, positive=True)
    if "original_max_position_embeddings" in rope:
        read_size(rope, "original_max_position_embeddings")
    return theta, rope


def check_object(config, path) -> dict:
    """A parsed config.json must be a JSON object (not a list, string or number)."""
    if not isinstance(config, dict):
        raise ValueError(
            f"{path}: expected a JSON object ({{...}}), got a JSON {type(config).__name__}"
        )
    return config
