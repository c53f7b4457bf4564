"""Llama 3 and Granite parity with HF transformers through save_pretrained -> zoo.load."""

import pytest
import torch
from helpers import (
    DEVICE,
    assert_bf16_logits_track_hf,
    assert_close,
    left_padded_batch,
    spread_weights_,
)

import zoo

transformers = pytest.importorskip("transformers")

FP32_RTOL = 1e-4

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # small, so that the tiny model's positions reach all three frequency bands
    "original_max_position_embeddings": 16,
}

CASES = {
    # Llama 3: GQA 4:2 (ratio 2) with llama3 rope scaling, untied head, sharded checkpoint
    "llama3": (
        "LlamaForCausalLM",
        dict(
            vocab_size=101,
            hidden_size=64,
            intermediate_size=72,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=500000.0,
            rope_scaling=LLAMA3_SCALING,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        True,
    ),
    # Granite Code: a Llama with attention and MLP biases, tied embeddings, one KV head (MQA)
    "granite-code": (
        "LlamaForCausalLM",
        dict(
            vocab_size=97,
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=3,
            num_key_value_heads=1,
            rope_theta=10000000.0,
            max_position_embeddings=128,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        ),
        False,
    ),
    # Granite 3: the four multipliers, GQA 8:2 (ratio 4), tied embeddings
    "granite3": (
        "GraniteForCausalLM",
        dict(
            vocab_size=103,
            hidden_size=64,
            intermediate_size=88,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            rope_theta=10000000.0,
            max_position_embeddings=128,
            embedding_multiplier=6.0,
            attention_multiplier=0.11,
            residual_multiplier=0.35,
            logits_scaling=2.5,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        ),
        False,
    ),
}


def build_hf_model(architecture: str, config_kwargs: dict):
    config_class = (
        transformers.GraniteConfig
        if architecture.startswith("Granite")
        else transformers.LlamaConfig
    )
    config = config_class(**config_kwargs)
    torch.manual_seed(1)
    model = getattr(transformers, architecture)(config).eval()
    return spread_weights_(model, lambda name: "norm" in name)


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    architecture, config_kwargs, sharded = CASES[request.param]
    hf_model = build_hf_model(architecture, config_kwargs)
    path = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(path, max_shard_size="20KB" if sharded else "1GB")
    if sharded:
        assert (path / "model.safetensors.index.json").is_file()
    model = zoo.load(path, device=DEVICE, dtype=torch.float32)
    return hf_model.to(DEVICE), model


def test_logits_match_hf(checkpoint):
    hf_model, model = checkpoint
    ids = torch.randint(0, model.config.vocab_size, (2, 13), device=DEVICE)
    with torch.no_grad():
        expected = hf_model(ids).logits
    assert_close(model(ids), expected, FP32_RTOL, "logits")


def test_left_padded_logits_match_hf(checkpoint):
    hf_model, model = checkpoint
    ids, mask = left_padded_batch(model.config.vocab_size, 11, pads=4)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf_model(ids, attention_mask=mask, position_ids=positions).logits
    ours = model(ids, attention_mask=mask)
    real = mask.bool()
    assert_close(ours[real], expected[real], FP32_RTOL, "logits at real positions")


def test_greedy_generation_matches_hf(checkpoint):
    hf_model, model = checkpoint
    ids, mask = left_padded_batch(model.config.vocab_size, 9, pads=3)
    with torch.no_grad():
        expected = hf_model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=14,
            do_sample=False,
            pad_token_id=model.config.pad_token_id,
        )
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=14)
    assert ours.shape == expected.shape, f"{tuple(ours.shape)} != {tuple(expected.shape)}"
    assert torch.equal(ours, expected), f"ours:\n{ours}\nHF:\n{expected}"


def test_cached_decoding_equals_uncached_argmax(checkpoint):
    _, model = checkpoint
    ids, mask = left_padded_batch(model.config.vocab_size, 7, pads=2)
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    assert generated.shape == (2, 19)
    full_mask = torch.cat([mask, torch.ones(2, 12, dtype=mask.dtype, device=DEVICE)], dim=1)
    logits = model(generated, attention_mask=full_mask)
    # the token generated at step i is the argmax of the full-sequence logits one position before
    assert torch.equal(logits[:, 6:-1].argmax(-1), generated[:, 7:])


def test_generation_stops_each_row_at_its_own_eos(checkpoint):
    hf_model, model = checkpoint
    ids, mask = left_padded_batch(model.config.vocab_size, 8, pads=2)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[])
    # EOS ids taken from what each row generates, so each row stops at a different step
    eos = [int(free[1, 8 + 2]), int(free[0, 8 + 6])]
    ours = model.generate(
        ids, attention_mask=mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=5
    )
    with torch.no_grad():
        expected = hf_model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=5,
        )
    assert torch.equal(ours, expected), f"ours:\n{ours}\nHF:\n{expected}"
    assert ours.shape[1] < free.shape[1]  # stopped early once both rows were done


@pytest.mark.skipif(
    DEVICE != "cuda", reason="bf16 is only right on the GPU (the interpreter gets it wrong)"
)
def test_bf16_logits_track_fp32_as_closely_as_hf_bf16(checkpoint, tmp_path):
    hf_model, model = checkpoint
    assert_bf16_logits_track_hf(hf_model, model.config.vocab_size, tmp_path / "ckpt", 64, "llama")


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_equals_eager(checkpoint):
    _, model = checkpoint
    ids, mask = left_padded_batch(model.config.vocab_size, 10, pads=3)
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=20, cuda_graph=False)
    graphed = model.generate(ids, attention_mask=mask, max_new_tokens=20, cuda_graph=True)
    again = model.generate(ids, attention_mask=mask, max_new_tokens=20, cuda_graph=True)
    assert torch.equal(eager, graphed) and torch.equal(graphed, again)
