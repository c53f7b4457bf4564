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


@pytest.mark.parametrize("is_rms", [True, False])
def test_inputs_that_are_not_row_views(is_rms):
    """x and residual whose rows no [rows, N] view can address (transposed batch and time) are
    normed like their contiguous copies; the outputs are contiguous."""
    x = torch.randn(5, 3, 40, device=DEVICE).transpose(0, 1)  # [3, 5, 40], strides (40, 120, 1)
    residual = torch.randn(5, 3, 40, device=DEVICE).transpose(0, 1)
    weight = torch.randn(40, device=DEVICE)
    bias = torch.randn(40, device=DEVICE)
    for _ in range(2):  # the plan's first call, then a call of the cached plan
        if is_rms:
            y, summed = rms_norm(x, weight, 1e-6, residual=residual)
            expected = rms_norm(x.contiguous(), weight, 1e-6, residual=residual.contiguous())
        else:
            y, summed = layer_norm(x, weight, bias, 1e-6, residual=residual)
            expected = layer_norm(
                x.contiguous(), weight, bias, 1e-6, residual=residual.contiguous()
            )
        assert y.is_contiguous() and summed.is_contiguous()
        assert torch.equal(y, expected[0]) and torch.equal(summed, expected[1])


def test_bad_shapes():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(7, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(8, device=DEVICE), 1e-6, residual=torch.randn(2, 7, device=DEVICE))
