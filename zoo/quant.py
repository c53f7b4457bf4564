"""FP8 weights: the FP8 Linear and the model surgery that puts it in place of the plain Linears.

`zoo.load(..., quantize="fp8")` and published FP8 checkpoints give every Linear of the blocks an
FP8 e4m3 weight with one fp32 scale per output row (the input embedding, the norms and the LM
head stay in the model's dtype, as in published FP8 checkpoints). The swap happens on the meta
device, before any memory is allocated; the loader then fills the FP8 parameters tensor by tensor
(convert/fp8.py, convert/hf.py).
"""

from __future__ import annotations

import torch
from torch import nn

from convert.fp8 import quantize_rows
from kernels.matmul import matmul
from zoo.layers import Linear, RMSNorm


class FP8Linear(nn.Module):
    """y = residual + alpha * act(x @ (weight * weight_scale[:, None]).T + bias), in one matmul.

    weight: float8_e4m3fn [N, K]; weight_scale: fp32 [N] (one per output row, also for fused
    QKV / gate-up); input_scale: fp32 [1] when activations are quantized with a static scale
    (None: per token, at run time, where the kernel quantizes activations at all).
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, static_input: bool = False
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn), requires_grad=False
        )
        self.weight_scale = nn.Parameter(
            torch.empty(out_features, dtype=torch.float32), requires_grad=False
        )
        self.input_scale = (
            nn.Parameter(torch.empty(1, dtype=torch.float32), requires_grad=False)
            if static_input
            else None
        )
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(
        self,
        x: torch.Tensor,
        activation: str | None = None,
        residual: torch.Tensor | None = None,
        alpha: float = 1.0,
        norm: RMSNorm | None = None,
    ) -> torch.Tensor:
        # norm(x) first: inside the kernel that converts x for the FP8 weights where one runs
        return matmul(
            x,
            self.weight,
            self.bias,
            activation=activation,
            residual=residual,
            alpha=alpha,
            weight_scale=self.weight_scale,
            input_scale=self.input_scale,
            rms_norm_weight=norm.weight if norm is not None else None,
            rms_norm_eps=norm.eps if norm is not None else 0.0,
        )

    def _apply(self, fn, recurse=True):
        # model.to(dtype) converts the floating-point parameters: the FP8 weight and the fp32
        # scales keep their dtypes (only the bias follows the model), devices still move.
        kept = {n: p.data for n, p in self._parameters.items() if n != "bias" and p is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._parameters[name]
            if new.dtype != old.dtype:
                self._parameters[name] = nn.Parameter(old.to(new.device), requires_grad=False)
        return self


def linear_weights(model: nn.Module) -> set[str]:
    """The weight parameter names of the model's Linears (its LM head is a plain parameter
    or tied to the embedding, never a Linear that is quantized)."""
    return {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, Linear) and name.split(".")[-1] != "lm_head"
    }


def use_fp8_linears(
    model: nn.Module, weights: set[str], static_input: bool, source: str = ""
) -> None:
    """Replace each Linear whose weight is in `weights` by an FP8Linear of the same shape (on the
    meta device: nothing is allocated). A name in `weights` that is not such a Linear's weight
    (an FP8 LM head or embedding in a checkpoint) is refused, naming it."""
    from convert.hf import CheckpointError

    others = sorted(weights - linear_weights(model))
    if others:
        raise CheckpointError(
            f"{source}: {others[0]} is stored in FP8, but zoo keeps it in the model's dtype "
            "(FP8 is for the Linears of the blocks; list the LM head in the quantization "
            "config's ignore)"
        )
    for name in weights:
        owner, child = _owner(model, name)
        linear = getattr(owner, child)
        setattr(owner, child, _fp8_like(linear, static_input))


def quantize_model_(model: nn.Module) -> None:
    """Quantize every Linear of the blocks of a model that holds its weights already (random
    weights: pretrained=False), one Linear at a time."""
    for name in sorted(linear_weights(model)):
        owner, child = _owner(model, name)
        linear = getattr(owner, child)
        fp8 = _fp8_like(linear, static_input=False)
        weight, scale = quantize_rows(linear.weight.data)
        fp8.weight = nn.Parameter(weight, requires_grad=False)
        fp8.weight_scale = nn.Parameter(scale, requires_grad=False)
        if linear.bias is not None:
            fp8.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        setattr(owner, child, fp8)
        del linear, weight, scale


def _owner(model: nn.Module, weight_name: str) -> tuple[nn.Module, str]:
    parent, _, child = weight_name.removesuffix(".weight").rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def _fp8_like(linear: Linear, static_input: bool) -> FP8Linear:
    """An FP8Linear of linear's shape on the meta device; its bias in the bias's dtype."""
    out_features, in_features = linear.weight.shape
    with torch.device("meta"):
        fp8 = FP8Linear(in_features, out_features, linear.bias is not None, static_input)
        if linear.bias is not None:
            fp8.bias = nn.Parameter(
                torch.empty(out_features, dtype=linear.bias.dtype), requires_grad=False
            )
    return fp8
