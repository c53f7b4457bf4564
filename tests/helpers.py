"""Shared test helpers: the device, the dtypes kernels are tested in, and error reports."""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# bf16 runs on the GPU only: the Triton interpreter computes it wrongly
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="bf16 is wrong in the Triton interpreter"
        ),
    ),
]


# Max-norm relative error of a kernel against a float64 reference, per dtype: elementwise and
# reduction kernels (matmul, norms, rotary), and attention (softmax in exp2, two reductions).
KERNEL_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ATTENTION_RTOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    """Relative error in the max norm: max|a - e| / max|e|; reports both errors on failure."""
    a = actual.double()
    e = expected.double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values in the result"
    abs_err = (a - e).abs().max().item()
    scale = e.abs().max().item()
    rel = abs_err / max(scale, 1e-12)
    assert rel <= rtol, f"{what}: max abs error {abs_err:.3e}, relative {rel:.3e} > {rtol:.1e}"


def left_padded_batch(vocab_size: int, seq: int, pads: int):
    """Two rows of random ids (>= 3, clear of special ids); row 0 left-padded by `pads` zeros."""
    ids = torch.randint(3, vocab_size, (2, seq), device=DEVICE)
    mask = torch.ones(2, seq, dtype=torch.long, device=DEVICE)
    mask[0, :pads] = 0
    ids[0, :pads] = 0
    return ids, mask


def assert_bf16_logits_track_hf(hf_model, vocab_size: int, path, seq: int, what: str) -> None:
    """A decoder loaded by zoo in bf16 against HF's fp32 logits on the same weights: our max-norm
    relative error is at most 1.5x HF bf16's own, and the top-1 token agrees at >= 95% of the
    positions (GPU only: the interpreter computes bf16 wrongly)."""
    import copy

    import zoo

    hf_model.save_pretrained(path)
    ours_bf16 = zoo.load(path, device=DEVICE, dtype=torch.bfloat16)
    hf_bf16 = copy.deepcopy(hf_model).to(torch.bfloat16)
    ids = torch.randint(0, vocab_size, (2, seq), device=DEVICE)
    with torch.no_grad():
        reference = hf_model(ids).logits.double()
        hf_err = (hf_bf16(ids).logits.double() - reference).abs().max() / reference.abs().max()
    ours = ours_bf16(ids).double()
    ours_err = (ours - reference).abs().max() / reference.abs().max()
    agreement = (ours.argmax(-1) == reference.argmax(-1)).float().mean().item()
    print(
        f"{what} bf16 relative error: ours {ours_err:.3e}, HF {hf_err:.3e}; top-1 {agreement:.3f}"
    )
    assert ours_err <= 1.5 * hf_err, f"{what}: ours {ours_err:.3e} vs HF bf16 {hf_err:.3e}"
    assert agreement >= 0.95, f"{what}: top-1 agreement {agreement:.3f}"


def spread_weights_(model: torch.nn.Module, is_norm_weight) -> torch.nn.Module:
    """Weights and biases far from HF's init, so every term of the forward matters: norm weights
    (is_norm_weight(name)) around 1, everything else N(0, 0.08)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_norm_weight(name):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.08)
    return model


def matvec_config_params(configs: list, weight_dtype: torch.dtype) -> list:
    """pytest params (config, activation) of the matrix-vector configs the autotuner keeps for
    weights of weight_dtype, without and with the fused gate."""
    import kernels.matmul

    elem_bytes = torch.empty(0, dtype=weight_dtype).element_size()
    return [
        pytest.param(
            config,
            activation,
            id=f"{config.kwargs['BLOCK_N']}x{config.kwargs['BLOCK_K']}-w{config.num_warps}-{activation}",
        )
        for config in configs
        for activation in (None, "silu_mul")
        if kernels.matmul._matvec_bytes_per_thread(config, activation is not None, elem_bytes)
        <= kernels.matmul._MATVEC_MAX_BYTES_PER_THREAD
    ]
