"""Mistral, Qwen2 / Qwen2.5 and Qwen3 parity with HF transformers through save_pretrained ->
zoo.load: sliding windows (Mistral on every layer, Qwen2 from max_window_layers on) shorter than
the prompt, so that prefill and decode both cross them; Qwen2's q/k/v biases; Qwen3's q/k norm."""

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
from zoo.models.llama import LlamaConfig

transformers = pytest.importorskip("transformers")

FP32_RTOL = 1e-4

COMMON = dict(
    hidden_size=64,
    intermediate_size=72,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

CASES = {
    # Mistral v0.1: a window of 8 keys on every layer, untied head, sharded checkpoint
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(COMMON, vocab_size=97, sliding_window=8, rope_theta=10000.0),
    ),
    # Qwen2.5: q/k/v biases (no o_proj bias), tied head; layer 0 full, layer 1 a window of 6
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(
            COMMON,
            vocab_size=101,
            use_sliding_window=True,
            sliding_window=6,
            max_window_layers=1,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
        ),
    ),
    # Qwen3: per-head q/k RMSNorm, explicit head_dim (24 != 64 / 4), tied head
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(
            COMMON,
            vocab_size=103,
            head_dim=24,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
        ),
    ),
}


def build_hf_model(config_class: str, architecture: str, config_kwargs: dict):
    config = getattr(transformers, config_class)(**config_kwargs)
    torch.manual_seed(1)
    model = getattr(transformers, architecture)(config).eval()
    return spread_weights_(model, lambda name: "norm" in name)


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    hf_model = build_hf_model(*CASES[request.param])
    path = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    model = zoo.load(path, device=DEVICE, dtype=torch.float32)
    return request.param, hf_model.to(DEVICE), model


# per case: the window of each layer, q/k/v biases, o_proj bias, q/k norm
EXPECTED_CONFIG = {
    "mistral": ([8, 8], False, False, False),
    "qwen2": ([None, 6], True, False, False),
    "qwen3": ([None, None], False, False, True),
}


def test_config_read_as_hf_does(checkpoint):
    case, _, model = checkpoint
    c = model.config
    windows = [c.layer_window(i) for i in range(c.num_layers)]
    assert (windows, c.qkv_bias, c.attention_bias, c.qk_norm) == EXPECTED_CONFIG[case]


def test_logits_match_hf(checkpoint):
    _, hf_model, model = checkpoint
    ids = torch.randint(0, model.config.vocab_size, (2, 13), device=DEVICE)
    with torch.no_grad():
        expected = hf_model(ids).logits
    assert_close(model(ids), expected, FP32_RTOL, "logits")


def test_left_padded_logits_match_hf(checkpoint):
    _, hf_model, model = checkpoint
    ids, mask = left_padded_batch(model.config.vocab_size, 13, pads=3)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf_model(ids, attention_mask=mask, position_ids=positions).logits
    ours = model(ids, attention_mask=mask)
    real = mask.bool()
    assert_close(ours[real], expected[real], FP32_RTOL, "logits at real positions")


def test_greedy_generation_matches_hf(checkpoint):
    """Prompt 13 (row 0 left-padded by 3) + 12 new tokens: decode steps run past the window."""
    _, hf_model, model = checkpoint
    ids, mask = left_padded_batch(model.config.vocab_size, 13, pads=3)
    with torch.no_grad():
        expected = hf_model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=model.config.pad_token_id,
        )
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    assert ours.shape == expected.shape, f"{tuple(ours.shape)} != {tuple(expected.shape)}"
    assert torch.equal(ours, expected), f"ours:\n{ours}\nHF:\n{expected}"


@pytest.mark.skipif(
    DEVICE != "cuda", reason="bf16 is only right on the GPU (the interpreter gets it wrong)"
)
def test_bf16_logits_track_fp32_as_closely_as_hf_bf16(checkpoint, tmp_path):
    """64 tokens: past every window."""
    name, hf_model, model = checkpoint
    assert_bf16_logits_track_hf(hf_model, model.config.vocab_size, tmp_path / "ckpt", 64, name)


def _hf_config(model_type: str, **overrides) -> dict:
    config = dict(
        model_type=model_type,
        vocab_size=97,
        hidden_size=64,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return {**config, **overrides}


def test_qwen2_window_layers_as_hf():
    """use_sliding_window false: no window anywhere, whatever sliding_window says (Qwen2.5
    checkpoints ship sliding_window 32768 with use_sliding_window false)."""
    off = LlamaConfig.from_hf(_hf_config("qwen2", sliding_window=32768, max_window_layers=1))
    assert [off.layer_window(i) for i in range(2)] == [None, None]
    on = _hf_config("qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=1)
    config = LlamaConfig.from_hf(on)
    assert [config.layer_window(i) for i in range(2)] == [None, 5]
    hf = transformers.Qwen2Config(**{k: v for k, v in on.items() if k != "model_type"})
    assert list(config.layer_types) == hf.layer_types
    listed = LlamaConfig.from_hf({**on, "layer_types": ["sliding_attention", "full_attention"]})
    assert [listed.layer_window(i) for i in range(2)] == [5, None]


@pytest.mark.parametrize(
    "model_type, overrides, match",
    [
        ("mistral", dict(layer_types=["full_attention"] * 2), "'layer_types'.*'mistral'"),
        (
            "qwen2",
            dict(use_sliding_window=True, layer_types=["full_attention", "chunked_attention"]),
            "layer_types \\['chunked_attention'\\]",
        ),
        ("qwen2", dict(layer_types=["sliding_attention"] * 2), "no sliding_window"),
        ("qwen3", dict(layer_types=["full_attention"]), "1 entries for num_hidden_layers 2"),
        (
            "qwen2",
            dict(rope_scaling={"type": "yarn", "factor": 4.0}),
            "unsupported rope_type 'yarn'",
        ),
        ("mistral", dict(sliding_window=0), "sliding_window: expected a positive int"),
    ],
)
def test_unsupported_configs_are_refused(model_type, overrides, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_hf(_hf_config(model_type, **overrides))


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_equals_eager(checkpoint):
    """Windowed decode steps replayed from a CUDA graph: 20 steps cross every window."""
    _, _, model = checkpoint
    ids, mask = left_padded_batch(model.config.vocab_size, 10, pads=3)
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=20, cuda_graph=False)
    graphed = model.generate(ids, attention_mask=mask, max_new_tokens=20, cuda_graph=True)
    assert torch.equal(eager, graphed)
