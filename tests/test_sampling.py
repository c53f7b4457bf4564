"""Token choice: HF's logits processors' semantics, seeds, and sampling through generate."""

import pytest
import torch
from helpers import DEVICE

import zoo
from zoo.generation import GenerationConfig
from zoo.generation.logits import (
    apply_repetition_penalty,
    choose_tokens,
    min_p_filter,
    top_k_filter,
    top_p_filter,
)

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@pytest.mark.parametrize("top_k", [1, 3, 50, 500])
def test_top_k_keeps_hf_token_set(top_k):
    scores = torch.randn(4, 257)
    scores[0, :10] = 2.5  # ties at the boundary
    expected = TopKLogitsWarper(top_k)(None, scores.clone())
    assert torch.equal(torch.isinf(top_k_filter(scores, top_k)), torch.isinf(expected))


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999, 1.0])
def test_top_p_keeps_hf_token_set(top_p):
    scores = torch.randn(4, 257) * 3
    expected = TopPLogitsWarper(top_p)(None, scores.clone())
    assert torch.equal(torch.isinf(top_p_filter(scores, top_p)), torch.isinf(expected))


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 0.9, 1.0])
def test_min_p_keeps_hf_token_set(min_p):
    scores = torch.randn(4, 257) * 3
    scores[1, :5] = 4.0  # tied most likely tokens: all kept
    expected = MinPLogitsWarper(min_p)(None, scores.clone())
    assert torch.equal(min_p_filter(scores, min_p), expected)


@pytest.mark.parametrize("penalty", [0.7, 1.3])
def test_repetition_penalty_equals_hf(penalty):
    scores = torch.randn(3, 50)
    input_ids = torch.randint(0, 50, (3, 9))
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, input_ids, True)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, scores.clone())
    assert torch.equal(apply_repetition_penalty(scores, seen, penalty), expected)


def test_invalid_sampling_arguments_are_named():
    for kwargs, name in [
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(min_p=1.5), "min_p"),
    ]:
        with pytest.raises(ValueError, match=name):
            GenerationConfig(do_sample=True, **kwargs)


def test_sampling_draws_from_the_filtered_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(20000, 1)
    generator = torch.Generator().manual_seed(0)
    tokens = choose_tokens(logits, GenerationConfig(do_sample=True, top_k=3), None, generator)
    counts = torch.bincount(tokens, minlength=4).double() / tokens.numel()
    expected = torch.tensor([0.0, 1.0, 2.0]).softmax(0).double()
    assert counts[3] == 0
    assert (counts[:3] - expected).abs().max() < 0.015


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    config = transformers.LlamaConfig(
        vocab_size=67,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(3)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in hf_model.parameters():
            param.normal_(0.0, 0.3)
    path = tmp_path_factory.mktemp("tiny")
    hf_model.save_pretrained(path)
    return hf_model.to(DEVICE), zoo.load(path, device=DEVICE, dtype=torch.float32)


def test_top_k_1_sampling_equals_greedy(tiny_model):
    _, model = tiny_model
    ids = torch.randint(3, 67, (2, 5), device=DEVICE)
    greedy = model.generate(ids, max_new_tokens=10, eos_token_id=[])
    sampled = model.generate(
        ids, max_new_tokens=10, eos_token_id=[], do_sample=True, top_k=1, seed=7
    )
    assert torch.equal(sampled, greedy)


def test_seed_reproduces_and_other_seeds_differ(tiny_model):
    _, model = tiny_model
    ids = torch.randint(3, 67, (2, 5), device=DEVICE)
    kwargs = dict(max_new_tokens=12, eos_token_id=[], do_sample=True, temperature=1.5)
    first = model.generate(ids, seed=11, **kwargs)
    assert torch.equal(first, model.generate(ids, seed=11, **kwargs))
    others = [model.generate(ids, seed=s, **kwargs) for s in (12, 13)]
    assert not all(torch.equal(first, other) for other in others)


def test_greedy_repetition_penalty_matches_hf(tiny_model):
    hf_model, model = tiny_model
    ids = torch.randint(3, 67, (2, 6), device=DEVICE)
    with torch.no_grad():
        expected = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            do_sample=False,
            repetition_penalty=1.8,
            pad_token_id=0,
        )
    ours = model.generate(ids, max_new_tokens=12, repetition_penalty=1.8)
    assert torch.equal(ours, expected)
