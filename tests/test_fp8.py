"""FP8 weights: quantization and scale layout, the FP8 kernels, FP8 checkpoints in the
compressed-tensors and quant_method "fp8" layouts written here, and quantize="fp8" on ordinary
checkpoints, each against a torch reference built from the same FP8 weights dequantized to fp32.

Triton's interpreter loads, converts and multiplies float8_e4m3fn correctly (its own fp32 -> fp8
cast rounds wrongly where the rounding carries into the exponent, which is why kernels/quantize.py
rounds in fp32 first), so the kernel tests run on the CPU too.
"""

import copy
import inspect
import json
import re

import pytest
import torch
from helpers import (
    DEVICE,
    DTYPES,
    KERNEL_RTOL,
    assert_close,
    left_padded_batch,
    matvec_config_params,
    spread_weights_,
)
from safetensors.torch import load_file, save_file

import kernels.matmul as matmul_module
import zoo
from convert.fp8 import E4M3_MAX, dequantize_rows, quantize_rows, row_scales
from kernels.matmul import matmul
from kernels.norm import rms_norm
from kernels.quantize import quantize_fp8, rms_norm_scaled, scale_to_fp16
from zoo.layers import Linear
from zoo.quant import FP8Linear

transformers = pytest.importorskip("transformers")

FP32_RTOL = 1e-4
# FP8 x FP8 dots (large M) on the GPU: the products are exact, but Hopper's tensor cores add them
# with about 14 mantissa bits within each K slice (kernels/matmul.py adds the slices in fp32), so
# an fp32 output is good to about 1e-4 of its largest value instead of fp32's 1e-6.
FP8_DOT_RTOL = {**KERNEL_RTOL, torch.float32: 1e-3}
LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")


# ---------------------------------------------------------------------------- quantization


def test_quantize_rows_round_trip_and_scale_layout():
    w = torch.randn(37, 72) * torch.logspace(-4, 2, 37)[:, None]  # rows of very different sizes
    w[5] = 0.0
    q, scale = quantize_rows(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (37, 72)
    assert scale.dtype == torch.float32 and scale.shape == (37,)
    # each row's largest magnitude lands on 448 exactly, and a zero row stays zero
    nonzero = torch.arange(37) != 5
    assert torch.equal(q.float().abs().amax(1)[nonzero], torch.full((36,), E4M3_MAX))
    assert torch.equal(q[5].float(), torch.zeros(72))
    # round to nearest: the error of each value is at most half an e4m3 step (3 mantissa bits:
    # 2^-4 relative for normal values, 2^-10 of the scale for subnormal ones)
    back = dequantize_rows(q, scale)
    step = torch.maximum(back.abs() * 2.0**-3, scale[:, None] * 2.0**-9)
    assert ((back - w).abs() <= step / 2 * (1 + 1e-6)).all()
    # and it is the nearest: quantizing what came back gives the same bits
    assert torch.equal(quantize_rows(back)[0].view(torch.uint8), q.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("k", [300, 16500])  # a row held whole in registers; one read in steps
def test_quantize_kernel_matches_torch_bit_for_bit(dtype, static, k):
    x = torch.randn(23, k, dtype=torch.float32) * torch.logspace(-3, 3, 23)[:, None]
    x[0] = 0.0
    # values at the edges: saturation, rounding that carries into the exponent, subnormals
    x[1, :6] = torch.tensor([1e4, -1e4, 31.9, 2**-7, -(2**-10), 0.0156])
    x = x.to(dtype).to(DEVICE)
    rows = torch.empty(23, k + 33, dtype=dtype, device=DEVICE)[:, 7 : 7 + k]  # a strided view
    rows.copy_(x)
    input_scale = torch.tensor([0.05], device=DEVICE) if static else None
    q, scales = quantize_fp8(rows, input_scale)
    x32 = x.float()
    expected_scales = torch.full((23,), 0.05, device=DEVICE) if static else row_scales(x32)
    expected = (x32 * (1 / expected_scales[:, None])).clamp(-E4M3_MAX, E4M3_MAX)
    expected = expected.to(torch.float8_e4m3fn)
    assert torch.equal(scales, expected_scales)
    assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scale_to_fp16(dtype):
    """Each row times a power of two, its largest magnitude in [2^14, 2^15): bf16 and fp16 rows
    come back exactly (values within 2^-28 of the row's largest), fp32 ones within fp16's
    rounding; a zero row stays zero and an inf stays inf. (bf16 only loads and converts here,
    which the interpreter does right.)"""
    big = 3e4 if dtype == torch.float16 else 1e30
    x = torch.randn(9, 200) * torch.logspace(-6 if dtype == torch.float16 else -30, 0, 9)[:, None]
    x[-1] *= big / x[-1].abs().max()
    x[3] = 0.0
    x[4, 7] = float("inf")
    x = x.to(dtype).to(DEVICE)
    q, scales = scale_to_fp16(x)
    assert q.dtype == torch.float16 and q.shape == x.shape and scales.shape == (9,)
    assert torch.equal(torch.exp2(torch.log2(scales).round()), scales)  # powers of two
    finite = torch.ones(9, dtype=torch.bool, device=DEVICE)
    finite[[3, 4]] = False
    amax = q[finite].float().abs().amax(1)
    assert ((amax >= 2**14) & (amax < 2**15)).all()
    assert torch.equal(q[3], torch.zeros_like(q[3])) and q[4, 7] == float("inf")
    back = q[finite].double() * scales[finite, None].double()
    x64 = x[finite].double()
    if dtype == torch.float32:  # fp16 keeps 11 significant bits
        tiny = x64.abs().amax(1, keepdim=True) * 2.0**-28
        assert ((back - x64).abs() <= torch.maximum(x64.abs() * 2.0**-11, tiny)).all()
    else:
        representable = x64.abs() >= x64.abs().amax(1, keepdim=True) * 2.0**-28
        assert torch.equal(back[representable], x64[representable])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("target", ["fp8", "fp8-static", "fp16"])
def test_rms_norm_scaled(dtype, target):
    """The RMSNorm fused into the row scaling gives the bits of the norm kernel followed by the
    scaling kernel: q and the row scales, at an odd K, rows of different sizes and a zero row."""
    k = 203
    x = (torch.randn(6, k) * torch.logspace(-3, 3, 6)[:, None]).to(dtype).to(DEVICE)
    x[2] = 0.0
    weight = (torch.rand(k) + 0.5).to(dtype).to(DEVICE)
    input_scale = torch.tensor([0.02], device=DEVICE) if target == "fp8-static" else None
    normed = rms_norm(x, weight, 1e-5)
    if target == "fp16":
        q, scales = rms_norm_scaled(x, weight, 1e-5, torch.float16)
        q_ref, scales_ref = scale_to_fp16(normed)
    else:
        q, scales = rms_norm_scaled(x, weight, 1e-5, torch.float8_e4m3fn, input_scale)
        q_ref, scales_ref = quantize_fp8(normed, input_scale)
    assert q.dtype == q_ref.dtype
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(scales, scales_ref)


def test_rms_norm_scaled_checks_its_inputs():
    x = torch.randn(4, 32, device=DEVICE)
    with pytest.raises(ValueError, match=r"norm_weight: expected torch.float32 of shape \(32,\)"):
        rms_norm_scaled(x, torch.ones(31, device=DEVICE), 1e-6, torch.float16)
    with pytest.raises(ValueError, match="dtype: expected torch.float8_e4m3fn or torch.float16"):
        rms_norm_scaled(x, torch.ones(32, device=DEVICE), 1e-6, torch.bfloat16)


@pytest.mark.parametrize(
    "m, x_dtype, fused",
    [
        (1, torch.bfloat16, False),  # the matrix-vector kernel takes x as it is: the norm first
        (5, torch.bfloat16, True),  # x scaled into fp16 (fp8_fp16_x)
        (5, torch.float32, False),  # an fp32 x is not converted
        (70, torch.float32, True),  # x quantized for the FP8 dot
    ],
)
def test_matmul_rms_norm_of_x(kernel_options, m, x_dtype, fused):
    """matmul(x, ..., rms_norm_weight=w) is matmul(rms_norm(x, w)) bit for bit, the norm inside
    the kernel that converts x for the FP8 weights where there is one."""
    kernel_options(fp8_fp16_x=1)
    k, n = 96, 74
    x = torch.randn(m, k, device=DEVICE).to(x_dtype)
    norm_weight = (torch.rand(k, device=DEVICE) + 0.5).to(x_dtype)
    weight, scale = quantize_rows(torch.randn(n, k, device=DEVICE) * 0.1)
    residual = torch.randn(m, n // 2, device=DEVICE).to(x_dtype)
    call = dict(activation="silu_mul", residual=residual, weight_scale=scale)
    y = matmul(x, weight, **call, rms_norm_weight=norm_weight, rms_norm_eps=1e-5)
    plans = [plan for key, plan in matmul_module._plans.items() if key[-1] is not None]
    assert [plan.norm_fused for plan in plans] == [fused]
    expected = matmul(rms_norm(x, norm_weight, 1e-5), weight, **call)
    assert torch.equal(y, expected)


def test_matmul_rms_norm_weight_is_checked():
    x = torch.randn(3, 32, device=DEVICE)
    weight, scale = quantize_rows(torch.randn(16, 32, device=DEVICE))
    with pytest.raises(ValueError, match=r"rms_norm_weight: expected shape \(32,\)"):
        matmul(x, weight, weight_scale=scale, rms_norm_weight=torch.ones(16, device=DEVICE))
    with pytest.raises(ValueError, match="rms_norm_weight"):
        matmul(x, weight, weight_scale=scale, rms_norm_weight=torch.ones(32, device=DEVICE).half())


@pytest.mark.parametrize(
    "m, activation, k",
    [
        (2, None, 96),
        (7, "silu_mul", 3072),  # K split on the GPU: the row scales in the split's epilogue
        (33, None, 3072),
        (64, "silu_mul", 96),
    ],
)
def test_fp8_weights_with_bf16_x_scaled_into_fp16(kernel_options, m, activation, k):
    """Kernel option fp8_fp16_x: a bf16 x scaled per row into fp16, FP8 weights converted to fp16
    for the dot. Rows of magnitudes 1e-6..1e6 (and one of zeros), each against float64 within
    bf16's tolerance of its own size; on the GPU also against the weights converted to bf16
    (fp8_fp16_x=0), which computes the same exact products."""
    n = 202
    scale_rows = torch.logspace(-6, 6, m, device=DEVICE)[:, None]
    x = (torch.randn(m, k, device=DEVICE) * scale_rows).to(torch.bfloat16)
    x[m // 2] = 0.0
    weight, scale = quantize_rows(torch.randn(n, k, device=DEVICE) * 0.1)
    n_out = n // 2 if activation else n
    residual = (torch.randn(m, n_out, device=DEVICE) * scale_rows).to(torch.bfloat16)
    kernel_options(fp8_fp16_x=1)
    y = matmul(x, weight, activation=activation, residual=residual, weight_scale=scale)
    assert any(plan.x_fp16 for plan in matmul_module._plans.values()), "x was not put in fp16"
    expected = _reference(x, weight, scale, None, activation, residual, 1.0)
    rtol = KERNEL_RTOL[torch.bfloat16]
    for row in range(m):
        assert_close(y[row], expected[row], rtol, f"fp16 x, row {row} of m={m} k={k}")
    if DEVICE == "cuda":
        kernel_options(fp8_fp16_x=0)
        in_bf16 = matmul(x, weight, activation=activation, residual=residual, weight_scale=scale)
        for row in range(m):
            assert_close(y[row], in_bf16[row], rtol, f"fp16 x against bf16, row {row}")


def _reference(x, weight, scale, bias, activation, residual, alpha, x_scale_input=None):
    """float64 y of matmul with FP8 weights; x quantized as the kernel does when x_scale_input is
    not None (the large-M path): (q, scales) of the same rows."""
    x64 = x.double()
    if x_scale_input is not None:
        q, x_scale = x_scale_input
        x64 = (q.double() * x_scale.double()[:, None]).view(x.shape)
    y = x64 @ dequantize_rows(weight, scale).double().T
    if bias is not None:
        y = y + bias.double()
    if activation == "silu_mul":
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    y = alpha * y
    return y + residual.double() if residual is not None else y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "m, activation, static",
    [
        (1, None, False),  # decode at batch 1: the matrix-vector kernel
        (1, "silu_mul", False),  # the same with the fused gate, K = 3072
        (1, "silu_mul", True),  # K = 8192: split in two K slices (static scale: x unquantized)
        (7, "silu_mul", False),  # weights converted in registers for a tl.dot
        (100, None, False),  # x quantized per row, FP8 dot
        (100, "silu_mul", True),  # with a static input scale
        (300, None, False),  # the persistent TMA kernel for fp16 / bf16
        (300, "silu_mul", True),
        (3, "silu_mul", False),  # K = 3072: split along K on the GPU (scales in its epilogue)
    ],
)
def test_fp8_matmul_against_reference(dtype, m, activation, static):
    # K a multiple of 16 (TMA rows), N odd-sized
    k, n = (3072, 202) if m == 3 or (m == 1 and activation) else (96, 74)
    if m == 1 and static:
        k = 8192
        assert matmul_module._matvec_split_k(n, k) == 2
    x = torch.randn(m, k, dtype=dtype, device=DEVICE)
    weight, scale = quantize_rows(torch.randn(n, k, device=DEVICE) * 0.1)
    bias = torch.randn(n, dtype=dtype, device=DEVICE)
    n_out = n // 2 if activation else n
    residual = torch.randn(m, n_out, dtype=dtype, device=DEVICE)
    input_scale = torch.tensor([0.01], device=DEVICE) if static else None
    y = matmul(
        x,
        weight,
        bias,
        activation=activation,
        residual=residual,
        alpha=0.5,
        weight_scale=scale,
        input_scale=input_scale,
    )
    assert y.dtype == dtype and y.shape == (m, n_out)
    quantized_x = quantize_fp8(x, input_scale) if m > 64 else None
    expected = _reference(x, weight, scale, bias, activation, residual, 0.5, quantized_x)
    rtol = (
        FP8_DOT_RTOL[dtype] if quantized_x is not None and DEVICE == "cuda" else KERNEL_RTOL[dtype]
    )
    assert_close(y, expected, rtol, f"fp8 matmul m={m} k={k}")


def _matvec_cases():
    """(config, activation) for every matrix-vector config the autotuner keeps for that mode."""
    configs = matmul_module._MATVEC_CONFIGS if DEVICE == "cuda" else []
    return matvec_config_params(configs, torch.float8_e4m3fn)


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter runs its own matrix-vector config")
@pytest.mark.parametrize("config, activation", _matvec_cases())
def test_matvec_configs(monkeypatch, config, activation):
    """Each config of the matrix-vector table (FP8 weights at M = 1) in bf16, K split in two
    uneven slices (summed by the split-K epilogue, whose grid shrinks its column blocks at this
    size): odd N and K, bias, residual and alpha, against the dequantized reference."""
    tuner = matmul_module._matvec_fp8_kernel_tuned
    monkeypatch.setattr(tuner, "configs", [config])
    monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setattr(matmul_module, "_tuned_configs", {})
    monkeypatch.setattr(matmul_module, "_matvec_split_k", lambda n_rows, k: 2)
    dtype = torch.bfloat16
    k, n = 3000, 1202
    x = torch.randn(1, k, dtype=dtype, device=DEVICE)
    weight, scale = quantize_rows(torch.randn(n, k, device=DEVICE) * 0.1)
    bias = torch.randn(n, dtype=dtype, device=DEVICE)
    n_out = n // 2 if activation else n
    residual = torch.randn(1, n_out, dtype=dtype, device=DEVICE)
    y = matmul(
        x, weight, bias, activation=activation, residual=residual, alpha=0.5, weight_scale=scale
    )
    assert list(matmul_module._tuned_configs.values()) == [config]
    expected = _reference(x, weight, scale, bias, activation, residual, 0.5, None)
    assert_close(y, expected, KERNEL_RTOL[dtype], f"matvec config {config} {activation}")


@pytest.mark.parametrize(
    "options, m, activation",
    [
        ({"fp8_matvec": 0}, 1, None),
        ({"fp8_matvec": 0}, 1, "silu_mul"),
        ({"fp8_dot_min_m": 16}, 32, None),
        ({"fp8_dot_min_m": 16}, 32, "silu_mul"),
        ({"fp8_swap_ab": 1}, 7, None),
        ({"fp8_swap_ab": 1}, 7, "silu_mul"),
        ({"fp8_swap_ab": 0}, 7, "silu_mul"),
    ],
)
def test_fp8_kernel_options_small_m(kernel_options, options, m, activation):
    """Each small-M option's sides: M = 1 through the tl.dot kernel (fp8_matvec=0); M = 32 with x
    quantized for the FP8 tensor cores (fp8_dot_min_m=16); M = 7 with the converted weight as the
    dot's left operand and as its right one (fp8_swap_ab). K = 3072, split on the GPU."""
    kernel_options(**options)
    dtype = torch.float16
    k, n = 3072, 202
    x = torch.randn(m, k, dtype=dtype, device=DEVICE)
    weight, scale = quantize_rows(torch.randn(n, k, device=DEVICE) * 0.1)
    n_out = n // 2 if activation else n
    residual = torch.randn(m, n_out, dtype=dtype, device=DEVICE)
    y = matmul(x, weight, activation=activation, residual=residual, weight_scale=scale)
    quantized_x = quantize_fp8(x) if m == 32 else None
    expected = _reference(x, weight, scale, None, activation, residual, 1.0, quantized_x)
    rtol = (
        FP8_DOT_RTOL[dtype] if quantized_x is not None and DEVICE == "cuda" else KERNEL_RTOL[dtype]
    )
    assert_close(y, expected, rtol, f"fp8 matmul m={m} k={k}, options {options}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [{"fp8_swap_ab": 1}, {"fp8_swap_ab": 0}])
def test_fp8_weights_convert_exactly(kernel_options, dtype, options):
    """Every finite e4m3 value, converted in registers for a tl.dot (M = 16) as its left and as
    its right operand, comes out exactly: x is the identity."""
    kernel_options(**options)
    codes = torch.arange(256, dtype=torch.int32)
    codes[(codes & 0x7F) == 0x7F] = 0  # the two NaN patterns
    weight = codes.to(torch.uint8).view(torch.float8_e4m3fn).reshape(16, 16).to(DEVICE)
    x = torch.eye(16, dtype=dtype, device=DEVICE)
    y = matmul(x, weight, weight_scale=torch.ones(16, device=DEVICE))
    assert torch.equal(y, weight.to(dtype).T)


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter's FP8 dot is exact")
def test_fp8_dot_error_does_not_grow_with_k():
    """Llama-3-8B's longest K (the down projection, 14336) at large M: with each K slice added in
    fp32 the error stays at one slice's (about 1e-4); left in the tensor cores' accumulation
    (the fp8_fast_accum option) it was 8e-3 on an H200."""
    m, k, n = 512, 14336, 512
    x = torch.randn(m, k, device=DEVICE)
    weight, scale = quantize_rows(torch.randn(n, k, device=DEVICE) * 0.1)
    y = matmul(x, weight, None, weight_scale=scale)
    expected = _reference(x, weight, scale, None, None, None, 1.0, quantize_fp8(x))
    assert_close(y, expected, 5e-4, f"fp8 matmul k={k}")


def test_fp8_matmul_argument_errors():
    x = torch.randn(3, 32, device=DEVICE)
    weight, scale = quantize_rows(torch.randn(16, 32, device=DEVICE))
    with pytest.raises(ValueError, match="weight_scale: an FP8 weight needs its fp32 row scales"):
        matmul(x, weight)
    with pytest.raises(ValueError, match=r"weight_scale: expected contiguous fp32 \[16\]"):
        matmul(x, weight, weight_scale=scale[:8])
    with pytest.raises(ValueError, match="input_scale: expected one fp32 value"):
        matmul(x, weight, weight_scale=scale, input_scale=torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="weight_scale: only FP8"):
        matmul(x, torch.randn(16, 32, device=DEVICE), weight_scale=scale)


# ---------------------------------------------------------------------------- checkpoints

LLAMA = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=72,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


@pytest.fixture(scope="module")
def hf_llama():
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    return spread_weights_(model, lambda name: "norm" in name)


def _quantize_tensor(w: torch.Tensor, strategy: str):
    """(FP8 weight, its scale as the checkpoint stores it: [N, 1] per channel, [1] per tensor)."""
    if strategy == "channel":
        q, scale = quantize_rows(w)
        return q, scale[:, None]
    scale = (w.float().abs().max() / E4M3_MAX).reshape(1)
    q = (w.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def _write_fp8_checkpoint(hf_model, folder, strategy: str, activations: str, method: str):
    """save_pretrained, then every Linear of the blocks rewritten as an FP8 checkpoint stores it
    (lm_head left alone, as published checkpoints `ignore` it); returns {linear: dequantized
    fp32 weight}. activations: "none" | "dynamic" (per token) | "static" (an input_scale per
    Linear; q, k and v get different ones, of which the fused layer keeps the largest)."""
    hf_model.save_pretrained(folder, max_shard_size="40KB")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    dequantized = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(folder / shard)
        for key in list(tensors):
            linear = key.removesuffix(".weight")
            if not LINEAR.fullmatch(linear):
                continue
            q, scale = _quantize_tensor(tensors[key], strategy)
            # scales may come in any float dtype: bf16 ones here for the "fp8" layout
            scale = scale.to(torch.bfloat16 if method == "fp8" else torch.float32)
            dequantized[linear] = q.float() * scale.float()
            tensors[key] = q
            tensors[linear + ".weight_scale"] = scale
            index["weight_map"][linear + ".weight_scale"] = shard
            if activations == "static":
                tensors[linear + ".input_scale"] = torch.tensor(
                    [0.02 + 0.005 * "qkvogud".index(linear.split(".")[-1][0])]
                )
                index["weight_map"][linear + ".input_scale"] = shard
        save_file(tensors, folder / shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    config = json.loads((folder / "config.json").read_text())
    if method == "compressed-tensors":
        input_args = {
            "none": None,
            "dynamic": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
                        "strategy": "token"},
            "static": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                       "strategy": "tensor"},
        }[activations]  # fmt: skip
        config["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {"num_bits": 8, "type": "float", "symmetric": True,
                                "dynamic": False, "strategy": strategy},
                    "input_activations": input_args,
                    "output_activations": None,
                }
            },
            "ignore": ["lm_head"],
            "kv_cache_scheme": None,
        }  # fmt: skip
    else:
        config["quantization_config"] = {
            "quant_method": "fp8",
            "activation_scheme": activations,
            "ignored_layers": ["lm_head"],
        }
    (folder / "config.json").write_text(json.dumps(config))
    return dequantized


def _dequantized_reference(hf_model, dequantized: dict):
    """The HF model with each listed Linear's weight replaced by its dequantized FP8 weight."""
    reference = copy.deepcopy(hf_model)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, weight in dequantized.items():
            modules[name].weight.copy_(weight)
    return reference.to(DEVICE)


CHECKPOINT_CASES = [
    ("compressed-tensors", "channel", "none"),
    ("compressed-tensors", "channel", "dynamic"),
    ("compressed-tensors", "tensor", "static"),
    ("compressed-tensors", "tensor", "dynamic"),
    ("fp8", "tensor", "static"),
    ("fp8", "tensor", "dynamic"),
]


@pytest.fixture(scope="module", params=CHECKPOINT_CASES, ids="-".join)
def fp8_checkpoint(request, hf_llama, tmp_path_factory):
    method, strategy, activations = request.param
    folder = tmp_path_factory.mktemp("fp8")
    dequantized = _write_fp8_checkpoint(hf_llama, folder, strategy, activations, method)
    model = zoo.load(folder, device=DEVICE, dtype=torch.float32)
    return folder, model, _dequantized_reference(hf_llama, dequantized), request.param


def test_fp8_checkpoint_matches_dequantized_reference(fp8_checkpoint):
    _, model, reference, _ = fp8_checkpoint
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 13), device=DEVICE)
    with torch.no_grad():
        expected = reference(ids).logits
    assert_close(model(ids), expected, FP32_RTOL, "logits")


def test_fp8_checkpoint_layout(fp8_checkpoint):
    """Every Linear of the blocks is FP8 with a scale per output row (per-tensor scales fill the
    rows of their part of the fused layer); embedding, norms and the LM head keep fp32."""
    folder, model, _, (_, strategy, activations) = fp8_checkpoint
    tensors = {}
    for shard in folder.glob("*.safetensors"):
        tensors.update(load_file(shard))
    layer = model.layers[1]
    for module in (layer.attn.qkv, layer.attn.out, layer.mlp.gate_up, layer.mlp.down):
        assert isinstance(module, FP8Linear)
        assert module.weight.dtype == torch.float8_e4m3fn
        assert module.weight_scale.shape == (module.weight.shape[0],)
        assert (module.input_scale is not None) == (activations == "static")
    assert model.lm_head.weight.dtype == torch.float32
    assert model.embed.weight.dtype == torch.float32
    parts = ["q_proj", "k_proj", "v_proj"]
    prefix = "model.layers.1.self_attn."
    expected_rows = torch.cat(
        [tensors[prefix + p + ".weight_scale"].float().reshape(-1) for p in parts]
    )
    if strategy == "tensor":
        sizes = [tensors[prefix + p + ".weight"].shape[0] for p in parts]
        expected_rows = torch.cat([s.expand(n) for s, n in zip(expected_rows, sizes, strict=True)])
    assert torch.equal(layer.attn.qkv.weight_scale.cpu(), expected_rows)
    expected_bits = torch.cat([tensors[prefix + p + ".weight"] for p in parts]).view(torch.uint8)
    assert torch.equal(layer.attn.qkv.weight.cpu().view(torch.uint8), expected_bits)
    if activations == "static":
        largest = max(tensors[prefix + p + ".input_scale"].item() for p in parts)
        assert layer.attn.qkv.input_scale.item() == largest


def test_fp8_checkpoint_greedy_generation(fp8_checkpoint):
    _, model, reference, _ = fp8_checkpoint
    ids, mask = left_padded_batch(LLAMA["vocab_size"], 9, pads=3)
    with torch.no_grad():
        expected = reference.generate(
            ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0
        )
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=10), expected)


def _fake_quantized_inputs(reference, static_scales: dict | None):
    """Forward pre-hooks that round each FP8 Linear's input as our large-M path does: per row
    (dynamic), or with the layer's static input scale."""

    def hook_for(name):
        def hook(module, args):
            x = args[0]
            rows = x.reshape(-1, x.shape[-1]).float()
            if static_scales is None:
                scale = row_scales(rows)[:, None]
            else:
                scale = static_scales[name]
            q = (rows / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
            return ((q.float() * scale).view(x.shape).to(x.dtype),)

        return hook

    for name, module in reference.named_modules():
        if LINEAR.fullmatch(name):
            module.register_forward_pre_hook(hook_for(name))
    return reference


def test_fp8_checkpoint_large_batch_quantizes_activations(fp8_checkpoint):
    """B * T > 64 takes the FP8-activation path. Each FP8 Linear is checked on what it received:
    its output against float64 arithmetic on its input rounded as the kernel rounds it (per row,
    or with its static scale). The logits are checked against a reference whose Linears round their
    inputs the same way, where the FP8 dot is exact (the CPU): the two agree up to the values that
    sit on a rounding boundary, well within the error that rounding the inputs brings. (On the GPU
    the tensor cores' own rounding, FP8_DOT_RTOL, moves some of the next layer's inputs across such
    boundaries: there each step is what is checked.)"""
    _, model, reference, (_, _, activations) = fp8_checkpoint
    static = None
    if activations == "static":
        ours = {
            n: m.input_scale.item() for n, m in model.named_modules() if isinstance(m, FP8Linear)
        }
        # a fused layer quantizes its one input with the largest of its parts' scales
        static = {
            name: ours[_zoo_module(name)]
            for name, _ in reference.named_modules()
            if LINEAR.fullmatch(name)
        }
    emulated = _fake_quantized_inputs(copy.deepcopy(reference), static)
    ids = torch.randint(0, LLAMA["vocab_size"], (3, 30), device=DEVICE)
    with torch.no_grad():
        expected = emulated(ids).logits
        unrounded_inputs = reference(ids).logits
    steps = []
    hooks = [
        module.register_forward_hook(_check_fp8_step(name, steps), with_kwargs=True)
        for name, module in model.named_modules()
        if isinstance(module, FP8Linear)
    ]
    try:
        ours = model(ids, cuda_graph=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(steps) == 4 * LLAMA["num_hidden_layers"]
    rtol = FP8_DOT_RTOL[torch.float32] if DEVICE == "cuda" else KERNEL_RTOL[torch.float32]
    for name, error in steps:
        assert error <= rtol, f"{name}: {error:.2e} against its rounded input > {rtol:.0e}"
    assert torch.equal(model(ids), ours)  # the graphed call
    error = (ours - expected).abs().max() / expected.abs().max()
    rounding = (expected - unrounded_inputs).abs().max() / unrounded_inputs.abs().max()
    top1 = (ours.argmax(-1) == expected.argmax(-1)).float().mean().item()
    print(f"large M: {error:.2e} from the emulation; input rounding alone {rounding:.2e}")
    if DEVICE == "cpu":
        assert error <= 0.25 * rounding, f"{error:.2e} vs input rounding {rounding:.2e}"
        assert top1 >= 0.95, f"top-1 agreement {top1:.3f}"


def _check_fp8_step(name: str, steps: list):
    """A forward hook: the FP8 Linear's output against float64 arithmetic on its input (after
    the RMSNorm it was given, by the norm's own kernel) rounded by quantize_fp8 (with the layer's
    static scale, if any); appends (name, relative error)."""

    def hook(module, args, kwargs, out):
        call = inspect.signature(FP8Linear.forward).bind(module, *args, **kwargs)
        call.apply_defaults()
        x = call.arguments["x"]
        if call.arguments["norm"] is not None:
            x = call.arguments["norm"](x)
        rows = x.reshape(-1, x.shape[-1])
        residual = call.arguments["residual"]
        expected = _reference(
            rows,
            module.weight,
            module.weight_scale,
            module.bias,
            call.arguments["activation"],
            None if residual is None else residual.reshape(rows.shape[0], -1),
            call.arguments["alpha"],
            quantize_fp8(rows, module.input_scale),
        )
        error = (out.reshape(expected.shape).double() - expected).abs().max() / expected.abs().max()
        steps.append((name, error.item()))

    return hook


def _zoo_module(hf_name: str) -> str:
    layer = hf_name.split(".")[2]
    kind = hf_name.split(".")[-1]
    ours = {"q_proj": "attn.qkv", "k_proj": "attn.qkv", "v_proj": "attn.qkv", "o_proj": "attn.out",
            "gate_proj": "mlp.gate_up", "up_proj": "mlp.gate_up", "down_proj": "mlp.down"}[kind]  # fmt: skip
    return f"layers.{layer}.{ours}"


# ---------------------------------------------------------------------------- quantize="fp8"


def _quantized_reference(hf_model, linear_names):
    """The HF model with each named Linear's weight quantized per row and dequantized to fp32."""
    modules = dict(hf_model.named_modules())
    weights = {}
    for name in linear_names:
        weight = modules[name].weight.data
        transposed = isinstance(modules[name], transformers.pytorch_utils.Conv1D)
        q, scale = quantize_rows(weight.T if transposed else weight)
        weights[name] = dequantize_rows(q, scale).T if transposed else dequantize_rows(q, scale)
    return _dequantized_reference(hf_model, weights)


def test_tensor_parallel_with_fp8_is_refused(hf_llama, tmp_path):
    """Before any process group starts: tp > 1 takes 16-bit weights only."""
    hf_llama.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="tp=2 with FP8 weights"):
        zoo.load(tmp_path, device=DEVICE, dtype=torch.float32, quantize="fp8", tp=2)


def test_quantize_on_load_llama(hf_llama, tmp_path):
    hf_llama.save_pretrained(tmp_path, max_shard_size="40KB")
    model = zoo.load(tmp_path, device=DEVICE, dtype=torch.float32, quantize="fp8")
    fp8_modules = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert len(fp8_modules) == 4 * LLAMA["num_hidden_layers"]
    assert model.lm_head.weight.dtype == torch.float32
    names = [n for n, _ in hf_llama.named_modules() if LINEAR.fullmatch(n)]
    reference = _quantized_reference(hf_llama, names)
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 13), device=DEVICE)
    with torch.no_grad():
        expected = reference(ids).logits
    assert_close(model(ids), expected, FP32_RTOL, "logits")
    ids, mask = left_padded_batch(LLAMA["vocab_size"], 9, pads=3)
    with torch.no_grad():
        greedy = reference.generate(
            ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0
        )
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=10), greedy)
    # streamed text pieces need a tokenizer; the token stream itself is what generate returns
    stream = model.generate(ids[1:], max_new_tokens=5, stream=True) if model.tokenizer else None
    assert stream is None


def test_quantize_on_load_gpt2(tmp_path):
    """GPT-2's Conv1D weights are stored (in, out): quantized per output row after the
    transpose; its head is tied to the embedding and stays fp32."""
    config = transformers.GPT2Config(
        vocab_size=97, n_positions=64, n_embd=72, n_layer=2, n_head=3, pad_token_id=96
    )
    torch.manual_seed(2)
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    spread_weights_(hf_model, lambda name: "ln_" in name and name.endswith("weight"))
    hf_model.save_pretrained(tmp_path)
    model = zoo.load(tmp_path, device=DEVICE, dtype=torch.float32, quantize="fp8")
    assert sum(isinstance(m, FP8Linear) for m in model.modules()) == 8
    names = [n for n, m in hf_model.named_modules() if re.fullmatch(r".*\.(c_attn|c_proj|c_fc)", n)]
    reference = _quantized_reference(hf_model, names)
    ids = torch.randint(0, 96, (2, 11), device=DEVICE)
    with torch.no_grad():
        expected = reference(ids).logits
    assert_close(model(ids), expected, FP32_RTOL, "logits")


def test_quantize_on_load_bert_and_t5(tmp_path):
    """Encoders and encoder-decoders too: every Linear but the LM head (Bert's pooler included;
    T5's fused cross-attention K/V per row), against HF with those weights dequantized."""
    from test_bert import build_hf_model as build_bert
    from test_t5 import CASES as T5_CASES
    from test_t5 import build_hf_model as build_t5

    bert = build_bert("BertModel", {}, pooler=True)
    bert.save_pretrained(tmp_path / "bert")
    ours = zoo.load(tmp_path / "bert", device=DEVICE, dtype=torch.float32, quantize="fp8")
    assert sum(isinstance(m, FP8Linear) for m in ours.modules()) == 4 * 2 + 1
    linears = [n for n, m in bert.named_modules() if isinstance(m, torch.nn.Linear)]
    reference = _quantized_reference(bert, linears)
    ids = torch.randint(1, 97, (2, 9), device=DEVICE)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask)
    out = ours(ids, attention_mask=mask)
    assert_close(out.last_hidden_state, expected.last_hidden_state, FP32_RTOL, "bert hidden")
    assert_close(out.pooler_output, expected.pooler_output, FP32_RTOL, "bert pooler")

    config_kwargs, tied, _ = T5_CASES["flan-t5"]
    t5 = build_t5(config_kwargs, tied)
    t5.save_pretrained(tmp_path / "t5")
    ours = zoo.load(tmp_path / "t5", device=DEVICE, dtype=torch.float32, quantize="fp8")
    assert ours.lm_head.weight.dtype == torch.float32
    linears = [
        n
        for n, m in t5.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
    ]
    reference = _quantized_reference(t5, linears)
    ids = torch.randint(2, 97, (2, 11), device=DEVICE)
    mask = torch.ones_like(ids)
    decoder_ids = torch.randint(0, 97, (2, 7), device=DEVICE)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    logits = ours(ids, decoder_input_ids=decoder_ids, attention_mask=mask)
    assert_close(logits, expected, FP32_RTOL, "t5 logits")


def test_quantize_random_weights_and_meta():
    model = zoo.load("llama3-8b", device="meta", pretrained=False, quantize="fp8")
    qkv = model.layers[0].attn.qkv
    assert isinstance(qkv, FP8Linear) and qkv.weight.dtype == torch.float8_e4m3fn
    assert qkv.weight_scale.shape == (6144,)
    assert model.lm_head.weight.dtype == model.embed.weight.dtype == torch.float32
    fp8_bytes = sum(m.weight.numel() for m in model.modules() if isinstance(m, FP8Linear))
    assert fp8_bytes == 32 * (4096 * 6144 + 4096 * 4096 + 2 * 14336 * 4096 + 14336 * 4096)


def test_model_to_dtype_keeps_fp8_weights(hf_llama, tmp_path):
    hf_llama.save_pretrained(tmp_path)
    model = zoo.load(tmp_path, device=DEVICE, dtype=torch.float32, quantize="fp8")
    before = model.layers[0].mlp.down.weight.clone()
    model.to(torch.float16)
    down = model.layers[0].mlp.down
    assert down.weight.dtype == torch.float8_e4m3fn and down.weight_scale.dtype == torch.float32
    assert torch.equal(down.weight.view(torch.uint8), before.view(torch.uint8))
    assert model.embed.weight.dtype == torch.float16


# ---------------------------------------------------------------------------- errors


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "quantization, message",
    [
        (
            {"quant_method": "fp8", "weight_block_size": [128, 128]},
            r"block-wise FP8 \(weight_block_size \[128, 128\]",
        ),
        ({"quant_method": "fp8", "activation_scheme": "x"}, "activation_scheme 'x'"),
        ({"quant_method": "awq", "bits": 4}, r"quantized checkpoint.*'awq'.*unsupported"),
        (
            {"quant_method": "compressed-tensors", "format": "pack-quantized"},
            "compressed-tensors format 'pack-quantized' is unsupported",
        ),
        (
            {
                "quant_method": "compressed-tensors",
                "format": "float-quantized",
                "config_groups": {
                    "g": {"weights": {"type": "float", "num_bits": 8, "strategy": "channel"}}
                },
                "kv_cache_scheme": {"type": "float", "num_bits": 8, "strategy": "tensor"},
            },
            r"kv_cache_scheme .* \(an FP8 KV cache\) is unsupported",
        ),
        (
            {
                "quant_method": "compressed-tensors",
                "format": "float-quantized",
                "config_groups": {"g": {"weights": {"type": "int", "num_bits": 8}}},
            },
            r"config_groups\.g\.weights: type 'int' with num_bits 8 is unsupported",
        ),
        (
            {
                "quant_method": "compressed-tensors",
                "format": "float-quantized",
                "config_groups": {
                    "g": {
                        "weights": {
                            "type": "float",
                            "num_bits": 8,
                            "strategy": "group",
                            "group_size": 128,
                        }
                    }
                },
            },
            r"weights: strategy 'group' is unsupported here; supported: tensor, channel",
        ),
    ],
)
def test_unsupported_quantization_is_refused(hf_llama, tmp_path, quantization, message):
    hf_llama.save_pretrained(tmp_path)
    _edit_config(tmp_path, quantization_config=quantization)
    with pytest.raises(zoo.CheckpointError, match=rf"{re.escape(str(tmp_path))}: .*{message}"):
        zoo.load(tmp_path, device=DEVICE)


def test_older_compression_config_key(hf_llama, tmp_path):
    _write_fp8_checkpoint(hf_llama, tmp_path, "channel", "dynamic", "compressed-tensors")
    config = json.loads((tmp_path / "config.json").read_text())
    config["compression_config"] = config.pop("quantization_config")
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = zoo.load(tmp_path, device=DEVICE, dtype=torch.float32)
    assert isinstance(model.layers[0].attn.qkv, FP8Linear)


def test_fp8_lm_head_is_refused(hf_llama, tmp_path):
    _write_fp8_checkpoint(hf_llama, tmp_path, "channel", "none", "compressed-tensors")
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"]["lm_head.weight"]
    tensors = load_file(tmp_path / shard)
    tensors["lm_head.weight"], scale = quantize_rows(tensors["lm_head.weight"])
    tensors["lm_head.weight_scale"] = scale[:, None]
    index["weight_map"]["lm_head.weight_scale"] = shard
    save_file(tensors, tmp_path / shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    with pytest.raises(zoo.CheckpointError, match="lm_head.weight is stored in FP8"):
        zoo.load(tmp_path, device=DEVICE)


def test_unknown_quantize_method(hf_llama, tmp_path):
    with pytest.raises(ValueError, match=r"quantize: unknown method 'int4'; expected one of"):
        zoo.load(tmp_path, device=DEVICE, quantize="int4")


def test_text_streaming_chat_and_cli_on_a_quantized_model(capsys, tmp_path):
    from test_text import build_checkpoint

    from zoo.cli import main

    build_checkpoint(tmp_path)
    model = zoo.load(tmp_path, device=DEVICE, dtype=torch.float32, quantize="fp8")
    text = model.generate("hello\n", max_new_tokens=3)
    assert "".join(model.generate("hello\n", max_new_tokens=3, stream=True)) == text
    assert isinstance(model.chat([{"role": "user", "content": "hi"}], max_new_tokens=2), str)
    argv = ["generate", str(tmp_path), "--prompt", "hello\n", "--max-new-tokens", "3"]
    status = main([*argv, "--dtype", "float32", "--device", DEVICE, "--quantize", "fp8"])
    out = capsys.readouterr().out
    assert status == 0 and out == "hello\n" + text + "\n"


# ---------------------------------------------------------------------------- GPU


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 and CUDA graphs need a GPU")
def test_bf16_fp8_model_tracks_the_dequantized_reference(fp8_checkpoint):
    """In bf16 on the GPU, our FP8 model (FP8 weights only at these sizes) against the fp32
    reference holding the same weights dequantized: at most 1.5x the error of that reference run
    in bf16, the same top-1 at >= 95% of the positions; and CUDA-graph decode == eager."""
    folder, _, reference, _ = fp8_checkpoint
    model = zoo.load(folder, device=DEVICE, dtype=torch.bfloat16)
    reference_bf16 = copy.deepcopy(reference).to(torch.bfloat16)
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 31), device=DEVICE)
    with torch.no_grad():
        expected = reference(ids).logits.double()
        bf16_error = (reference_bf16(ids).logits.double() - expected).abs().max()
    ours = model(ids).double()
    error = (ours - expected).abs().max()
    agreement = (ours.argmax(-1) == expected.argmax(-1)).float().mean().item()
    print(
        f"fp8 bf16: error {error:.3e} vs the reference in bf16 {bf16_error:.3e}; top-1 {agreement}"
    )
    assert error <= 1.5 * bf16_error and agreement >= 0.95
    ids, mask = left_padded_batch(LLAMA["vocab_size"], 10, pads=3)
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=20, cuda_graph=False)
    graphed = model.generate(ids, attention_mask=mask, max_new_tokens=20, cuda_graph=True)
    assert torch.equal(eager, graphed)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU")
def test_fp8_weights_take_half_the_memory(hf_llama, tmp_path):
    hf_llama.save_pretrained(tmp_path)
    bf16 = zoo.load(tmp_path, device=DEVICE, dtype=torch.bfloat16)
    fp8 = zoo.load(tmp_path, device=DEVICE, dtype=torch.bfloat16, quantize="fp8")

    def linear_bytes(model):
        return sum(
            p.numel() * p.element_size()
            for m in model.modules()
            if isinstance(m, (FP8Linear, Linear)) and m is not getattr(model, "lm_head", None)
            for p in m.parameters()
        )

    assert linear_bytes(fp8) < 0.55 * linear_bytes(bf16)


def test_quantized_model_compiles_fullgraph(hf_llama, tmp_path):
    """torch.compile(fullgraph=True) traces the FP8 launchers as custom ops (the quantization of
    the activations too, at 3 x 30 tokens): the same bits as eager."""
    hf_llama.save_pretrained(tmp_path)
    model = zoo.load(tmp_path, device=DEVICE, dtype=torch.float32, quantize="fp8")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    try:
        for shape in ((2, 9), (3, 30)):
            ids = torch.randint(0, LLAMA["vocab_size"], shape, device=DEVICE)
            with torch.no_grad():
                assert torch.equal(compiled(ids), model(ids)), f"{shape}: compiled != eager"
    finally:
        torch._dynamo.reset()
