"""FP8 (e4m3) weights: per-row quantization, and the FP8 checkpoint formats of config.json.

A zoo FP8 Linear holds `weight` float8_e4m3fn [N, K] and `weight_scale` fp32 [N] (one scale per
output row: W ~= weight * weight_scale[:, None]), plus `input_scale` fp32 [1] when the checkpoint
quantizes activations with a static scale. Fused QKV / gate-up keep one scale per row, so a
checkpoint's per-tensor scale fills the rows of its part.

Checkpoint formats read (config.json `quantization_config`, or the older `compression_config`):
- compressed-tensors (`quant_method` "compressed-tensors", `format` "float-quantized"; older
  exports "naive-quantized" for the same tensors): each of `config_groups` quantizes weights
  with {type "float", num_bits 8, strategy "tensor" | "channel"} and activations with nothing,
  {dynamic true, strategy "token" (or "tensor")} or {dynamic false, strategy "tensor"}; modules in
  `ignore` (usually lm_head) stay unquantized. Tensors: `<linear>.weight` F8_E4M3,
  `<linear>.weight_scale` ([1] or [] per tensor, [N, 1] per channel) and, with static
  activations, `<linear>.input_scale` ([1] or []).
- `quant_method` "fp8" (AutoFP8 exports): per-tensor `weight_scale`, `activation_scheme`
  "static" (an `input_scale` per Linear) or "dynamic", `ignored_layers`. Block-wise scales
  (`weight_block_size`, `weight_scale_inv`: DeepSeek-style) are refused.
Which Linears are FP8 is read off the tensors themselves (an F8_E4M3 weight with its scale); the
config says how activations are treated and is checked for what the kernels implement.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
# A row of zeros gets this scale (any positive value gives zeros); it also keeps 1 / scale finite.
MIN_SCALE = 1e-12
FP8_HEADER_DTYPE = "F8_E4M3"
COMPRESSED_TENSORS_FORMATS = ("float-quantized", "naive-quantized")


def row_scales(rows: torch.Tensor) -> torch.Tensor:
    """fp32 [N] scales of [N, K] fp32 rows: max|row| / 448, correctly rounded (as
    kernels/quantize.py divides), at least MIN_SCALE. The divisor is a tensor: torch's CUDA
    kernels turn a division by a Python scalar into a multiplication by its reciprocal, which can
    be one ulp off."""
    amax = rows.abs().amax(dim=1)
    return (amax / torch.full_like(amax, E4M3_MAX)).clamp_min(MIN_SCALE)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn [N, K], fp32 scales [N]) of a [N, K] weight: each row scaled so its largest
    magnitude is 448, then rounded to nearest even. Computed in fp32 on w's device."""
    w32 = w.float()
    scale = row_scales(w32)
    q = (w32 / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 [N, K] weights that an FP8 weight [N, K] with row scales [N] stands for."""
    return q.float() * scale.float()[:, None]


@dataclass(frozen=True)
class Fp8Scheme:
    """How an FP8 checkpoint treats activations: `static_input` when every FP8 Linear has an
    `input_scale` (activations quantized with it), else per token at run time."""

    method: str  # config.json's quant_method, for messages
    static_input: bool


class UnsupportedQuantization(ValueError):
    """A quantization config this loader does not implement; the message names the setting."""


def scheme_from_config(hf_config: dict) -> Fp8Scheme | None:
    """The FP8 scheme of config.json (None: not quantized). Any other quantization method, or an
    FP8 variant the kernels do not implement, raises UnsupportedQuantization naming it."""
    key = "quantization_config" if hf_config.get("quantization_config") else "compression_config"
    config = hf_config.get(key)
    if not config:
        return None
    if not isinstance(config, dict):
        raise UnsupportedQuantization(f"{key}: expected an object, got {config!r}")
    method = config.get("quant_method", "?")
    if method == "compressed-tensors":
        return _compressed_tensors_scheme(config, key)
    if method == "fp8":
        return _fp8_scheme(config, key)
    raise UnsupportedQuantization(
        f"quantized checkpoint ({key}, quant_method {method!r}) is unsupported; FP8 checkpoints "
        "(quant_method 'compressed-tensors' with format 'float-quantized', or 'fp8') load, and "
        "a float32 / float16 / bfloat16 checkpoint can be quantized with quantize='fp8'"
    )


def _compressed_tensors_scheme(config: dict, key: str) -> Fp8Scheme:
    fmt = config.get("format")
    if fmt not in COMPRESSED_TENSORS_FORMATS:
        raise UnsupportedQuantization(
            f"{key}: compressed-tensors format {fmt!r} is unsupported; supported: "
            f"{', '.join(COMPRESSED_TENSORS_FORMATS)} (FP8 weights)"
        )
    groups = config.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise UnsupportedQuantization(f"{key}: compressed-tensors config has no config_groups")
    static = set()
    for name, group in groups.items():
        where = f"{key}.config_groups.{name}"
        if not isinstance(group, dict):
            raise UnsupportedQuantization(f"{where}: expected an object, got {group!r}")
        _check_fp8_args(group.get("weights"), f"{where}.weights", ("tensor", "channel"), False)
        activations = group.get("input_activations")
        if activations is None:
            static.add(False)
            continue
        dynamic = activations.get("dynamic") if isinstance(activations, dict) else None
        strategies = ("token", "tensor") if dynamic is True else ("tensor",)
        _check_fp8_args(activations, f"{where}.input_activations", strategies, dynamic is True)
        static.add(dynamic is not True)
        if group.get("output_activations") is not None:
            raise UnsupportedQuantization(
                f"{where}.output_activations: unsupported (expected null)"
            )
    kv_cache = config.get("kv_cache_scheme")
    if kv_cache is not None:
        raise UnsupportedQuantization(
            f"{key}: kv_cache_scheme {kv_cache!r} (an FP8 KV cache) is unsupported; the KV cache "
            "is kept in the model's dtype"
        )
    if len(static) > 1:
        raise UnsupportedQuantization(
            f"{key}: config_groups mix static and dynamic activations; one of them is supported"
        )
    return Fp8Scheme("compressed-tensors", static.pop())


def _check_fp8_args(args, where: str, strategies: tuple[str, ...], dynamic: bool) -> None:
    """compressed-tensors QuantizationArgs that our FP8 kernels implement: 8-bit floats,
    symmetric, one of `strategies`, static unless `dynamic`."""
    if not isinstance(args, dict):
        raise UnsupportedQuantization(f"{where}: expected FP8 quantization arguments, got {args!r}")
    kind, bits = args.get("type"), args.get("num_bits")
    if kind != "float" or bits != 8:
        raise UnsupportedQuantization(
            f"{where}: type {kind!r} with num_bits {bits!r} is unsupported (FP8: type 'float', "
            "num_bits 8)"
        )
    if args.get("symmetric", True) is not True:
        raise UnsupportedQuantization(f"{where}: asymmetric quantization is unsupported")
    strategy = args.get("strategy") or ("tensor" if args.get("group_size") is None else "group")
    if strategy not in strategies or args.get("block_structure") is not None:
        raise UnsupportedQuantization(
            f"{where}: strategy {strategy!r} is unsupported here; supported: "
            f"{', '.join(strategies)}"
        )
    if bool(args.get("dynamic", False)) != dynamic:
        raise UnsupportedQuantization(
            f"{where}: dynamic={args.get('dynamic')!r} is unsupported for strategy {strategy!r}"
        )


def _fp8_scheme(config: dict, key: str) -> Fp8Scheme:
    block = config.get("weight_block_size")
    if block is not None:
        raise UnsupportedQuantization(
            f"{key}: block-wise FP8 (weight_block_size {block!r}, DeepSeek-style "
            "weight_scale_inv) is unsupported; per-tensor and per-channel FP8 scales load"
        )
    scheme = config.get("activation_scheme", "dynamic")
    if scheme not in ("static", "dynamic"):
        raise UnsupportedQuantization(
            f"{key}: activation_scheme {scheme!r} is unsupported; expected 'static' or 'dynamic'"
        )
    return Fp8Scheme("fp8", scheme == "static")


def fp8_weights(
    headers: dict, key_map: dict, normalize_key: Callable[[str], str], source: str
) -> set[str]:
    """The zoo weight parameters an FP8 checkpoint stores in FP8 (F8_E4M3 tensors in its headers).
    Every part of one fused parameter must agree (zoo.quant.use_fp8_linears then refuses any
    that is not a Linear of the blocks, e.g. an FP8 LM head)."""
    from convert.hf import DROP, CheckpointError

    kinds: dict[str, set[bool]] = {}
    for raw_key, header in headers.items():
        target = key_map.get(normalize_key(raw_key))
        if target is DROP:
            continue
        kinds.setdefault(target.param, set()).add(header.dtype == FP8_HEADER_DTYPE)
    mixed = sorted(p for p, k in kinds.items() if len(k) > 1)
    if mixed:
        raise CheckpointError(
            f"{source}: the parts of {mixed[0]} are partly FP8 and partly not; a fused layer "
            "needs all of its parts in one format"
        )
    return {p for p, k in kinds.items() if True in k}


def checkpoint_key_map(key_map: dict, weights: set[str], scheme: Fp8Scheme) -> dict:
    """key_map plus the scale tensors of an FP8 checkpoint: each FP8 weight's bits are copied as
    they are, `<linear>.weight_scale` fills the rows of its part of `<module>.weight_scale`, and
    `<linear>.input_scale` (static activations) goes to `<module>.input_scale` (a fused layer
    takes the largest of its parts', as its parts share one input)."""
    from convert.hf import DROP, Target

    keys = dict(key_map)
    for key, target in key_map.items():
        if target is DROP or target.param not in weights or not key.endswith(".weight"):
            continue
        keys[key] = dataclasses.replace(target, fp8="bits")
        stem, module = key.removesuffix(".weight"), target.param.removesuffix(".weight")
        keys[stem + ".weight_scale"] = Target(
            module + ".weight_scale", target.row_start, target.row_end, fill="scale"
        )
        if scheme.static_input:
            keys[stem + ".input_scale"] = Target(module + ".input_scale", fill="max")
    return keys


def quantizing_key_map(key_map: dict, weights: set[str]) -> dict:
    """key_map for quantize='fp8' on a float checkpoint: each tensor of a weight in `weights` is
    quantized per row as it streams in, its scales written to the rows of `<module>.weight_scale`."""
    from convert.hf import DROP

    keys = dict(key_map)
    for key, target in key_map.items():
        if target is DROP or target.param not in weights:
            continue
        scale = target.param.removesuffix(".weight") + ".weight_scale"
        keys[key] = dataclasses.replace(target, fp8="quantize", scale=scale)
    return keys
