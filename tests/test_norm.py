import pytest
import torch
from helpers import DEVICE, DTYPES, KERNEL_RTOL, assert_close

from kernels.norm import layer_norm, rms_norm

RTOL = KERNEL_RTOL


def reference_rms_norm(x, weight, eps):
    """HF LlamaRMSNorm in float64, with its cast back to the input dtype before the weight."""
    x64 = x.double()
    normed = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    return weight.double() * normed.to(x.dtype).double()


def reference_layer_norm(x, weight, bias, eps):
    return torch.nn.functional.layer_norm(
        x.double(), x.shape[-1:], weight.double(), bias.double(), eps
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 5, 72), (3, 130)])
def test_rms_norm(dtype, shape):
    x = torch.randn(shape, device=DEVICE, dtype=dtype) * 3
    weight = torch.randn(shape[-1], device=DEVICE, dtype=dtype)
    assert_close(rms_norm(x, weight, 1e-6), reference_rms_norm(x, weight, 1e-6), RTOL[dtype], "rms")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 72), (3, 130)])
def test_layer_norm(dtype, shape):
    x = torch.randn(shape, device=DEVICE, dtype=dtype) * 3 + 1
    weight = torch.randn(shape[-1], device=DEVICE, dtype=dtype)
    bias = torch.randn(shape[-1], device=DEVICE, dtype=dtype)
    expected = reference_layer_norm(x, weight, bias, 1e-5)
    assert_close(layer_norm(x, weight, bias, 1e-5), expected, RTOL[dtype], "layer_norm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_rms", [True, False])
def test_fused_residual_add(dtype, is_rms):
    x = torch.randn(2, 7, 96, device=DEVICE, dtype=dtype)
    residual = torch.randn(2, 7, 96, device=DEVICE, dtype=dtype)
    weight = torch.randn(96, device=DEVICE, dtype=dtype)
    bias = torch.randn(96, device=DEVICE, dtype=dtype)
    summed = x + residual  # rounded in the dtype, as HF adds
    if is_rms:
        y, new_residual = rms_norm(x, weight, 1e-5, residual=residual)
        expected = reference_rms_norm(summed, weight, 1e-5)
    else:
        y, new_residual = layer_norm(x, weight, bias, 1e-5, residual=residual)
        expected = reference_layer_norm(summed, weight, bias, 1e-5)
    assert torch.equal(new_residual, summed)
    assert_close(y, expected, RTOL[dtype], "normed sum")


def test_strided_rows():
    big = torch.randn(3, 9, 40, device=DEVICE)
    weight = torch.randn(40, device=DEVICE)
    last = big[:, -1]  # (3, 40), row stride 9 * 40
    assert_close(
        rms_norm(last, weight, 1e-6), reference_rms_norm(last, weight, 1e-6), 1e-5, "strided"
    )


def test_bad_shapes():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(7, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(8, device=DEVICE), 1e-6, residual=torch.randn(2, 7, device=DEVICE))
