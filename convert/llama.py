"""Llama 3 / Granite / Mistral / Qwen2 / Qwen3 checkpoint keys -> zoo parameters: q/k/v fused
into one QKV weight (and bias), gate/up into one gate-up weight (rows concatenated in that
order)."""

from convert.hf import DROP, KeyMap, Target


def key_map(config) -> KeyMap:
    """HF `LlamaForCausalLM` / `GraniteForCausalLM` / `MistralForCausalLM` / `Qwen2ForCausalLM` /
    `Qwen3ForCausalLM` keys for this config (a zoo LlamaConfig)."""
    c = config
    q_rows = c.num_heads * c.head_dim
    kv_rows = c.num_kv_heads * c.head_dim
    inter = c.intermediate_size
    keys: KeyMap = {
        "model.embed_tokens.weight": Target("embed.weight"),
        "model.norm.weight": Target("norm.weight"),
        # a tied head is the embedding itself; a copy in the file is redundant
        "lm_head.weight": DROP if c.tie_word_embeddings else Target("lm_head.weight"),
    }
    kinds = ["weight"]
    for i in range(c.num_layers):
        hf = f"model.layers.{i}."
        ours = f"layers.{i}."
        keys[hf + "input_layernorm.weight"] = Target(ours + "attn_norm.weight")
        keys[hf + "post_attention_layernorm.weight"] = Target(ours + "mlp_norm.weight")
        keys[hf + "self_attn.rotary_emb.inv_freq"] = DROP  # a buffer in older exports
        for kind in kinds + (["bias"] if c.qkv_bias else []):
            qkv = ours + "attn.qkv." + kind
            keys[hf + f"self_attn.q_proj.{kind}"] = Target(qkv, 0, q_rows)
            keys[hf + f"self_attn.k_proj.{kind}"] = Target(qkv, q_rows, q_rows + kv_rows)
            keys[hf + f"self_attn.v_proj.{kind}"] = Target(
                qkv, q_rows + kv_rows, q_rows + 2 * kv_rows
            )
        for kind in kinds + (["bias"] if c.attention_bias else []):
            keys[hf + f"self_attn.o_proj.{kind}"] = Target(ours + "attn.out." + kind)
        if c.qk_norm:
            keys[hf + "self_attn.q_norm.weight"] = Target(ours + "attn.q_norm.weight")
            keys[hf + "self_attn.k_norm.weight"] = Target(ours + "attn.k_norm.weight")
        for kind in kinds + (["bias"] if c.mlp_bias else []):
            gate_up = ours + "mlp.gate_up." + kind
            keys[hf + f"mlp.gate_proj.{kind}"] = Target(gate_up, 0, inter)
            keys[hf + f"mlp.up_proj.{kind}"] = Target(gate_up, inter, 2 * inter)
            keys[hf + f"mlp.down_proj.{kind}"] = Target(ours + "mlp.down." + kind)
    return keys
