"""Generation for every family: input checks, GenerationConfig, logits processing, the engine
(cache, runners, CUDA graphs, open stream) and text (stop strings, streaming)."""

from zoo.generation.config import GenerationConfig, resolve_config
from zoo.generation.engine import STOP_CHECK_INTERVAL, GenerationEngine
from zoo.generation.inputs import (
    check_attention_mask,
    check_input_ids,
    encode_prompts,
    left_padding,
    pad_prompts,
    require_tokenizer,
    right_padding_lengths,
)
from zoo.generation.text import TextStream, new_text, new_tokens

__all__ = [
    "STOP_CHECK_INTERVAL",
    "GenerationConfig",
    "GenerationEngine",
    "TextStream",
    "check_attention_mask",
    "check_input_ids",
    "encode_prompts",
    "left_padding",
    "new_text",
    "new_tokens",
    "pad_prompts",
    "require_tokenizer",
    "resolve_config",
    "right_padding_lengths",
]
