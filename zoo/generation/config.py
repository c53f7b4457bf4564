"""GenerationConfig: the options of one generation, with transformers' names and meanings, validated
once when it is made (from generation_config.json, from keywords, or both)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _token_id(name: str, value) -> int:
    if not _is_int(value) or not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{name}: expected an int token id (int64), got {value!r}")
    return value


@dataclass(frozen=True)
class GenerationConfig:
    """How generate chooses and stops, as transformers' GenerationConfig (same field names and
    semantics) plus `stop` and `seed`.

    Token choice is greedy unless do_sample=True; then, in transformers' order, the repetition
    penalty, temperature, top_k, top_p and min_p shape the distribution sampled from (seed makes a
    run reproducible on the same device). Each row stops at any of eos_token_id (None: the
    model's config.json) or at a `stop` string; finished rows are padded with pad_token_id (None:
    config.json's, else the first EOS id). max_new_tokens None means generate's default (32).
    decoder_start_token_id: the first decoder id of encoder-decoder models (None: config.json's,
    else the pad id). Every value is checked here, so a config that exists is valid; fields of
    generation_config.json that generate does not use are ignored.
    """

    max_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    decoder_start_token_id: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        # normalised in place (the dataclass is frozen): lists become tuples, so configs hash
        if isinstance(self.eos_token_id, list | tuple):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.stop is None or isinstance(self.stop, str):
            object.__setattr__(self, "stop", () if self.stop is None else (self.stop,))
        elif isinstance(self.stop, list | tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field with a wrong type or value."""
        n = self.max_new_tokens
        if n is not None and (not _is_int(n) or n < 0):
            raise ValueError(f"max_new_tokens: expected an int >= 0, got {n!r}")
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample: expected True or False, got {self.do_sample!r}")
        t = self.temperature
        if not _is_number(t) or not math.isfinite(t):
            raise ValueError(f"temperature: expected a finite number, got {t!r}")
        if t < 0:
            raise ValueError(f"temperature: expected a number >= 0, got {t!r}")
        if self.do_sample and t == 0:  # as transformers' TemperatureLogitsWarper
            raise ValueError(
                "temperature: expected a number > 0 with do_sample=True, got 0 (for greedy "
                "decoding set do_sample=False)"
            )
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k: expected an int >= 0 (0 disables it), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        if self.min_p is not None and (not _is_number(self.min_p) or not 0 <= self.min_p <= 1):
            raise ValueError(f"min_p: expected a number in [0, 1] or None, got {self.min_p!r}")
        r = self.repetition_penalty
        if not _is_number(r) or not math.isfinite(r) or r <= 0:
            raise ValueError(f"repetition_penalty: expected a finite number > 0, got {r!r}")
        if isinstance(self.eos_token_id, tuple):
            for e in self.eos_token_id:
                _token_id("eos_token_id", e)
        elif self.eos_token_id is not None:
            _token_id("eos_token_id", self.eos_token_id)
        for name in ("pad_token_id", "decoder_start_token_id"):
            if getattr(self, name) is not None:
                _token_id(name, getattr(self, name))
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop: expected a non-empty str or a list of them, got {self.stop!r}")
        s = self.seed
        if s is not None and (not _is_int(s) or not INT64_MIN <= s < 2**64):
            raise ValueError(f"seed: expected an int, got {s!r}")

    @classmethod
    def from_dict(cls, values: dict) -> GenerationConfig:
        """From generation_config.json's dict: the fields named here are read and checked, the
        others (bos_token_id, max_length, transformers_version, ...) ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def updated(self, **options) -> GenerationConfig:
        """This config with the given fields replaced (and checked); an unknown name is a
        TypeError naming it."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(
                f"unexpected generation argument(s): {', '.join(unknown)}; GenerationConfig "
                f"fields: {', '.join(sorted(names))}"
            )
        return dataclasses.replace(self, **options) if options else self

    @property
    def eos_ids(self) -> tuple[int, ...] | None:
        """eos_token_id as a tuple, or None when unset."""
        if self.eos_token_id is None:
            return None
        if isinstance(self.eos_token_id, tuple):
            return self.eos_token_id
        return (self.eos_token_id,)


def resolve_config(
    default: GenerationConfig,
    generation_config: GenerationConfig | None,
    max_new_tokens: int | None,
    options: dict,
) -> GenerationConfig:
    """The config of one generate call: generation_config (else the model's), with
    max_new_tokens and the keyword options put over it."""
    if generation_config is None:
        generation_config = default
    elif not isinstance(generation_config, GenerationConfig):
        raise TypeError(
            "generation_config: expected a zoo GenerationConfig, got "
            f"{type(generation_config).__name__}"
        )
    if max_new_tokens is not None:
        options = {**options, "max_new_tokens": max_new_tokens}
    return generation_config.updated(**options)
