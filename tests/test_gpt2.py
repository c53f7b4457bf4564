"""GPT-2 parity with HF transformers through save_pretrained -> zoo.load."""

import pytest
import torch
from helpers import DEVICE, assert_bf16_logits_track_hf, assert_close
from safetensors import safe_open

import zoo

transformers = pytest.importorskip("transformers")

FP32_RTOL = 1e-4
# odd on purpose: 3 heads of 24 (n_embd 72 is not a power of 2), vocab not a multiple of a block
CONFIG = dict(
    vocab_size=97,
    n_positions=64,
    n_embd=72,
    n_layer=2,
    n_head=3,
    layer_norm_epsilon=1e-5,
    bos_token_id=96,
    eos_token_id=96,
    pad_token_id=96,
)


def build_hf_model(cls):
    torch.manual_seed(2)
    model = cls(transformers.GPT2Config(**CONFIG)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ln_" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf_model = build_hf_model(transformers.GPT2LMHeadModel)
    path = tmp_path_factory.mktemp("gpt2")
    hf_model.save_pretrained(path)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert any(k.startswith("transformer.") for k in f.keys())
    return hf_model.to(DEVICE), zoo.load(path, device=DEVICE, dtype=torch.float32)


def left_padded_batch(seq: int, pads: int):
    ids = torch.randint(0, 96, (2, seq), device=DEVICE)
    mask = torch.ones(2, seq, dtype=torch.long, device=DEVICE)
    mask[1, :pads] = 0
    ids[1, :pads] = 96
    return ids, mask


def test_logits_match_hf(checkpoint):
    hf_model, model = checkpoint
    ids = torch.randint(0, 97, (2, 17), device=DEVICE)
    with torch.no_grad():
        expected = hf_model(ids).logits
    assert_close(model(ids), expected, FP32_RTOL, "logits")


def test_left_padded_logits_match_hf(checkpoint):
    hf_model, model = checkpoint
    ids, mask = left_padded_batch(12, pads=5)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf_model(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert_close(model(ids, attention_mask=mask)[real], expected[real], FP32_RTOL, "logits")


def test_greedy_generation_matches_hf(checkpoint):
    hf_model, model = checkpoint
    ids, mask = left_padded_batch(9, pads=4)
    with torch.no_grad():
        expected = hf_model.generate(
            ids, attention_mask=mask, max_new_tokens=14, do_sample=False, pad_token_id=96
        )
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=14)
    assert torch.equal(ours, expected), f"ours:\n{ours}\nHF:\n{expected}"


def test_cached_decoding_equals_uncached_argmax(checkpoint):
    _, model = checkpoint
    ids, mask = left_padded_batch(6, pads=2)
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    full_mask = torch.cat([mask, torch.ones(2, 12, dtype=mask.dtype, device=DEVICE)], dim=1)
    logits = model(generated, attention_mask=full_mask)
    assert torch.equal(logits[:, 5:-1].argmax(-1), generated[:, 6:])


def test_bare_gpt2model_checkpoint_loads(tmp_path):
    """GPT2Model saves bare keys (no `transformer.` prefix) and no head: the head is tied."""
    lm = build_hf_model(transformers.GPT2LMHeadModel)
    bare = transformers.GPT2Model(lm.config)
    bare.load_state_dict(lm.transformer.state_dict())
    bare.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("transformer.") for k in f.keys())
    model = zoo.load(tmp_path, device=DEVICE, dtype=torch.float32)
    ids = torch.randint(0, 97, (1, 10), device=DEVICE)
    with torch.no_grad():
        expected = lm.to(DEVICE)(ids).logits
    assert_close(model(ids), expected, FP32_RTOL, "logits from a GPT2Model checkpoint")


def test_meta_build_has_hf_parameter_count():
    entry = zoo.registry.get_entry("gpt2")
    model = zoo.load("gpt2", pretrained=False, device="meta")
    with torch.device("meta"):
        hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**entry.config))
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in hf_model.parameters()
    )


@pytest.mark.skipif(
    DEVICE != "cuda", reason="bf16 is only right on the GPU (the interpreter gets it wrong)"
)
def test_bf16_logits_track_fp32_as_closely_as_hf_bf16(checkpoint, tmp_path):
    hf_model, _ = checkpoint
    assert_bf16_logits_track_hf(hf_model, 97, tmp_path, 48, "gpt2")
