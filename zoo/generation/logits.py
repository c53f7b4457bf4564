"""Logits processing and the token choice, with transformers' semantics: one function per
processor, applied in transformers' order (repetition penalty; then, when sampling, temperature,
top-k, top-p, min-p), then argmax or a sample."""

from __future__ import annotations

from collections.abc import Callable

import torch

from zoo.generation.config import GenerationConfig


def apply_repetition_penalty(
    scores: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """HF RepetitionPenaltyLogitsProcessor: seen tokens' scores are divided by the penalty when
    positive and multiplied by it when negative."""
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """HF TemperatureLogitsWarper."""
    return scores / temperature


def top_k_filter(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """HF TopKLogitsWarper: keep the scores >= the k-th largest (ties at the boundary kept)."""
    top_k = min(top_k, scores.shape[-1])
    kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """HF TopPLogitsWarper: drop the least likely tokens whose total probability is <= 1 - top_p,
    always keeping the most likely one."""
    sorted_scores, sorted_index = torch.sort(scores, descending=False, dim=-1)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, sorted_index, remove_sorted)
    return scores.masked_fill(remove, float("-inf"))


def min_p_filter(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    """HF MinPLogitsWarper: drop the tokens less likely than min_p times the most likely one's
    probability, always keeping the most likely one."""
    probs = scores.softmax(dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return scores.masked_fill(remove, float("-inf"))


# The warpers of sampling, in transformers' order (its _get_logits_processor): the
# GenerationConfig field, when it is active, and the function applying it.
WARPERS: tuple[tuple[str, Callable[[object], bool], Callable], ...] = (
    ("temperature", lambda value: value != 1.0, apply_temperature),
    ("top_k", lambda value: value > 0, top_k_filter),
    ("top_p", lambda value: value < 1.0, top_p_filter),
    ("min_p", lambda value: value is not None, min_p_filter),
)
# The fields the token choice reads: a captured decode step bakes them in
CHOICE_FIELDS = ("do_sample", "repetition_penalty", *(name for name, _, _ in WARPERS))


def choice_key(config: GenerationConfig) -> tuple:
    """The values of config that decide the token choice (hashable)."""
    return tuple(getattr(config, name) for name in CHOICE_FIELDS)


def choose_tokens(
    logits: torch.Tensor,
    config: GenerationConfig,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next tokens [B] from logits [B, V]: greedy, or a sample from the processed distribution.
    seen [B, V] bool: the tokens the repetition penalty counts (needed when it is not 1)."""
    scores = logits.float()
    if config.repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, seen, config.repetition_penalty)
    if not config.do_sample:
        return scores.argmax(dim=-1)
    for name, active, warp in WARPERS:
        value = getattr(config, name)
        if active(value):
            scores = warp(scores, value)
    probs = scores.softmax(dim=-1)
    # argmax(p / E) with E ~ Exp(1) draws from p exactly, without multinomial's host sync
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1)
