"""GPT-2 checkpoint keys -> zoo parameters. HF's Conv1D stores weights (in, out): transposed
here. Keys come with the `transformer.` prefix (GPT2LMHeadModel) or without (GPT2Model).

Tensor parallel (a Shard): each rank reads its heads' q, k and v columns of c_attn (already
fused as [q | k | v] columns) into its [q_r; k_r; v_r] rows, its MLP columns of c_fc, the
matching input rows of both c_proj; embeddings, norms and the c_proj biases (added once, by
rank 0) are read whole."""

from convert.hf import DROP, KeyMap, Part, Target
from convert.shard import Shard


def normalize_key(key: str) -> str:
    return key.removeprefix("transformer.")


def key_map(config, shard: Shard | None = None) -> KeyMap:
    """HF `GPT2LMHeadModel` / `GPT2Model` keys (prefix removed) for this config (GPT2Config),
    for one rank of `shard` (None: the whole model)."""
    shard = shard or Shard(0, 1)
    width, inner = config.n_embd, config.n_inner
    h0, h1 = shard.split(config.n_head, "n_head")
    i0, i1 = shard.split(inner, "n_inner")
    q0, q1 = h0 * config.head_dim, h1 * config.head_dim
    whole = shard.world == 1
    # per layer: ours, HF's, the Part of the weight (stored (in, out)) and of the bias
    if whole:
        parts = {name: (None, None) for name in ("qkv", "out", "fc", "proj")}
    else:
        qkv_columns = tuple((k * width + q0, k * width + q1) for k in range(3))
        parts = {
            "qkv": (Part(1, qkv_columns, 3 * width), Part(0, qkv_columns, 3 * width)),
            "out": (Part.span(0, q0, q1, width), None),
            "fc": (Part.span(1, i0, i1, inner), Part.span(0, i0, i1, inner)),
            "proj": (Part.span(0, i0, i1, inner), None),
        }
    keys: KeyMap = {
        "wte.weight": Target("wte.weight"),
        "wpe.weight": Target("wpe.weight"),
        "ln_f.weight": Target("ln_f.weight"),
        "ln_f.bias": Target("ln_f.bias"),
        "lm_head.weight": DROP,  # tied to wte
    }
    for i in range(config.n_layer):
        hf, ours = f"h.{i}.", f"blocks.{i}."
        keys[hf + "attn.bias"] = DROP  # causal-mask buffers of older exports
        keys[hf + "attn.masked_bias"] = DROP
        for name in ("ln_1", "ln_2"):
            keys[hf + f"{name}.weight"] = Target(ours + f"{name}.weight")
            keys[hf + f"{name}.bias"] = Target(ours + f"{name}.bias")
        for hf_name, our_name, kind in (
            ("attn.c_attn", "attn.qkv", "qkv"),
            ("attn.c_proj", "attn.out", "out"),
            ("mlp.c_fc", "fc", "fc"),
            ("mlp.c_proj", "proj", "proj"),
        ):
            weight_part, bias_part = parts[kind]
            keys[hf + f"{hf_name}.weight"] = Target(
                ours + f"{our_name}.weight", transpose=True, part=weight_part
            )
            keys[hf + f"{hf_name}.bias"] = Target(ours + f"{our_name}.bias", part=bias_part)
    return keys
