import pytest
import torch
from helpers import DEVICE, DTYPES, KERNEL_RTOL, assert_close

from kernels.rope import rope_cache_write
from zoo.layers import rope_inv_freq

RTOL = KERNEL_RTOL


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_rope(x, positions, inv_freq):
    """HF apply_rotary_pos_emb on [B, T, H, D]: cos/sin in fp32, rounded to the input dtype."""
    freqs = positions.double()[..., None] * inv_freq.double()  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None]  # (B, T, 1, D)
    cos, sin = emb.cos().to(x.dtype).double(), emb.sin().to(x.dtype).double()
    return x.double() * cos + rotate_half(x.double()) * sin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch,seq,heads,kv_heads,head_dim",
    [(2, 5, 4, 2, 16), (1, 1, 3, 1, 24), (3, 7, 8, 8, 64)],
)
def test_rope_and_cache_write(dtype, batch, seq, heads, kv_heads, head_dim):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    inv_freq = rope_inv_freq(head_dim, 500000.0, scaling).to(DEVICE)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(batch, seq, width, device=DEVICE, dtype=dtype)
    original = qkv.clone()
    positions = torch.randint(0, 300, (batch, seq), device=DEVICE)
    max_len = seq + 6
    k_cache = torch.zeros(batch, kv_heads, max_len, head_dim, device=DEVICE, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    lengths = torch.randint(0, 7, (batch,), device=DEVICE, dtype=torch.int32)
    q = rope_cache_write(
        qkv,
        k_cache,
        v_cache,
        lengths,
        num_q_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        positions=positions,
        inv_freq=inv_freq,
    )
    parts = original.view(batch, seq, heads + 2 * kv_heads, head_dim)
    q_ref = reference_rope(parts[:, :, :heads], positions, inv_freq)
    k_ref = reference_rope(parts[:, :, heads : heads + kv_heads], positions, inv_freq)
    assert_close(q, q_ref, RTOL[dtype], "q")
    for b in range(batch):
        slots = slice(int(lengths[b]), int(lengths[b]) + seq)
        assert_close(k_cache[b, :, slots].transpose(0, 1), k_ref[b], RTOL[dtype], "k cache")
        assert torch.equal(v_cache[b, :, slots].transpose(0, 1), parts[b, :, heads + kv_heads :])
        untouched = torch.ones(max_len, dtype=torch.bool, device=DEVICE)
        untouched[slots] = False
        assert (k_cache[b, :, untouched] == 0).all() and (v_cache[b, :, untouched] == 0).all()


def test_cache_write_without_rope():
    qkv = torch.randn(2, 3, 5 * 3 * 16, device=DEVICE)
    k_cache = torch.zeros(2, 5, 4, 16, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    lengths = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
    original = qkv.clone()
    q = rope_cache_write(qkv, k_cache, v_cache, lengths, num_q_heads=5, num_kv_heads=5, head_dim=16)
    parts = original.view(2, 3, 15, 16)
    assert torch.equal(q, parts[:, :, :5])
    assert torch.equal(k_cache[1, :, 1:4].transpose(0, 1), parts[1, :, 5:10])
    assert torch.equal(v_cache[0, :, 0:3].transpose(0, 1), parts[0, :, 10:])


def test_llama3_inv_freq_matches_hf():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(
        hidden_size=128,
        num_attention_heads=2,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        rope_theta=500000.0,
    )
    expected, scaling = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = rope_inv_freq(64, 500000.0, config.rope_parameters)
    assert scaling == 1.0
    assert torch.equal(ours, expected)


def test_unsupported_rope_type():
    with pytest.raises(ValueError, match="yarn.*supported: default, llama3"):
        rope_inv_freq(64, 10000.0, {"rope_type": "yarn", "factor": 4.0})


def reference_head_rms_norm(x, weight, eps):
    """HF Qwen3RMSNorm over the head dim: fp32 statistics, cast back, times the weight."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,seq,heads,kv_heads,head_dim", [(2, 5, 4, 2, 16), (1, 3, 3, 1, 24)])
def test_qk_norm_then_rope(dtype, batch, seq, heads, kv_heads, head_dim):
    """Qwen3: per-head RMSNorm of q and k (own weights) before the rotation; v untouched."""
    eps = 1e-6
    inv_freq = rope_inv_freq(head_dim, 1000000.0, None).to(DEVICE)
    qkv = 3.0 * torch.randn(batch, seq, (heads + 2 * kv_heads) * head_dim, device=DEVICE).to(dtype)
    original = qkv.clone()
    q_weight = (1.0 + 0.3 * torch.randn(head_dim, device=DEVICE)).to(dtype)
    k_weight = (1.0 + 0.3 * torch.randn(head_dim, device=DEVICE)).to(dtype)
    positions = torch.randint(0, 100, (batch, seq), device=DEVICE)
    k_cache = torch.zeros(batch, kv_heads, seq + 2, head_dim, device=DEVICE, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    lengths = torch.tensor([1] * batch, dtype=torch.int32, device=DEVICE)
    q = rope_cache_write(
        qkv,
        k_cache,
        v_cache,
        lengths,
        num_q_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        positions=positions,
        inv_freq=inv_freq,
        q_norm_weight=q_weight,
        k_norm_weight=k_weight,
        norm_eps=eps,
    )
    parts = original.view(batch, seq, heads + 2 * kv_heads, head_dim)
    q_ref = reference_rope(
        reference_head_rms_norm(parts[:, :, :heads], q_weight, eps), positions, inv_freq
    )
    k_normed = reference_head_rms_norm(parts[:, :, heads : heads + kv_heads], k_weight, eps)
    k_ref = reference_rope(k_normed, positions, inv_freq)
    assert_close(q, q_ref, RTOL[dtype], "q")
    assert_close(k_cache[:, :, 1 : 1 + seq].transpose(1, 2), k_ref, RTOL[dtype], "k cache")
    assert torch.equal(v_cache[:, :, 1 : 1 + seq].transpose(1, 2), parts[:, :, heads + kv_heads :])


def test_qk_norm_needs_both_weights():
    qkv = torch.randn(1, 2, 3 * 16, device=DEVICE)
    cache = torch.zeros(1, 1, 4, 16, device=DEVICE)
    lengths = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="k_norm_weight"):
        rope_cache_write(
            qkv,
            cache,
            cache.clone(),
            lengths,
            num_q_heads=1,
            num_kv_heads=1,
            head_dim=16,
            positions=torch.zeros(1, 2, dtype=torch.long, device=DEVICE),
            inv_freq=rope_inv_freq(16, 10000.0, None).to(DEVICE),
            q_norm_weight=torch.ones(16, device=DEVICE),
        )
