"""GPT-2 checkpoint keys -> zoo parameters. HF's Conv1D stores weights (in, out): transposed
here. Keys come with the `transformer.` prefix (GPT2LMHeadModel) or without (GPT2Model)."""

from convert.hf import DROP, KeyMap, Target


def normalize_key(key: str) -> str:
    return key.removeprefix("transformer.")


def key_map(config) -> KeyMap:
    """HF `GPT2LMHeadModel` / `GPT2Model` keys (prefix removed) for this config (GPT2Config)."""
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
        for hf_name, our_name in (
            ("attn.c_attn", "attn.qkv"),
            ("attn.c_proj", "attn.out"),
            ("mlp.c_fc", "fc"),
            ("mlp.c_proj", "proj"),
        ):
            keys[hf + f"{hf_name}.weight"] = Target(ours + f"{our_name}.weight", transpose=True)
            keys[hf + f"{hf_name}.bias"] = Target(ours + f"{our_name}.bias")
    return keys
