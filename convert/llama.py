"""Llama 3 / Granite / Mistral / Qwen2 / Qwen3 checkpoint keys -> zoo parameters: q/k/v fused
into one QKV weight (and bias), gate/up into one gate-up weight (rows concatenated in that
order).

Tensor parallel (a Shard): each rank reads its query heads, key/value heads and MLP rows into
its fused [q_r; k_r; v_r] and [gate_r; up_r], the matching input columns of o_proj and
down_proj, its rows of an untied LM head; embedding, norms and the biases of o_proj and
down_proj (added once, by rank 0) are read whole."""

from convert.hf import DROP, KeyMap, Part, Target
from convert.shard import Shard


def key_map(config, shard: Shard | None = None) -> KeyMap:
    """HF `LlamaForCausalLM` / `GraniteForCausalLM` / `MistralForCausalLM` / `Qwen2ForCausalLM` /
    `Qwen3ForCausalLM` keys for this config (a zoo LlamaConfig), for one rank of `shard` (None:
    the whole model)."""
    c = config
    d = c.head_dim
    shard = shard or Shard(0, 1)
    (q0, q1), (kv0, kv1) = shard.heads(c.num_heads, c.num_kv_heads)
    i0, i1 = shard.split(c.intermediate_size, "intermediate_size")
    whole = shard.world == 1

    def part(dim: int, start: int, end: int, size: int) -> Part | None:
        return None if whole else Part.span(dim, start, end, size)

    q_rows, kv_rows, inter = (q1 - q0) * d, (kv1 - kv0) * d, i1 - i0
    q_part = part(0, q0 * d, q1 * d, c.num_heads * d)
    kv_part = part(0, kv0 * d, kv1 * d, c.num_kv_heads * d)
    inter_part = part(0, i0, i1, c.intermediate_size)
    if (
        c.tie_word_embeddings
    ):  # a tied head is the embedding itself; a copy in the file is redundant
        head = DROP
    else:
        v0, v1 = shard.vocab(c.vocab_size) if not whole else (0, c.vocab_size)
        head = Target("lm_head.weight", part=part(0, v0, v1, c.vocab_size))
    keys: KeyMap = {
        "model.embed_tokens.weight": Target("embed.weight"),
        "model.norm.weight": Target("norm.weight"),
        "lm_head.weight": head,
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
            keys[hf + f"self_attn.q_proj.{kind}"] = Target(qkv, 0, q_rows, part=q_part)
            keys[hf + f"self_attn.k_proj.{kind}"] = Target(
                qkv, q_rows, q_rows + kv_rows, part=kv_part
            )
            keys[hf + f"self_attn.v_proj.{kind}"] = Target(
                qkv, q_rows + kv_rows, q_rows + 2 * kv_rows, part=kv_part
            )
        keys[hf + "self_attn.o_proj.weight"] = Target(
            ours + "attn.out.weight", part=part(1, q0 * d, q1 * d, c.num_heads * d)
        )
        if c.attention_bias:
            keys[hf + "self_attn.o_proj.bias"] = Target(ours + "attn.out.bias")
        if c.qk_norm:
            keys[hf + "self_attn.q_norm.weight"] = Target(ours + "attn.q_norm.weight")
            keys[hf + "self_attn.k_norm.weight"] = Target(ours + "attn.k_norm.weight")
        for kind in kinds + (["bias"] if c.mlp_bias else []):
            gate_up = ours + "mlp.gate_up." + kind
            keys[hf + f"mlp.gate_proj.{kind}"] = Target(gate_up, 0, inter, part=inter_part)
            keys[hf + f"mlp.up_proj.{kind}"] = Target(gate_up, inter, 2 * inter, part=inter_part)
        keys[hf + "mlp.down_proj.weight"] = Target(
            ours + "mlp.down.weight", part=part(1, i0, i1, c.intermediate_size)
        )
        if c.mlp_bias:
            keys[hf + "mlp.down_proj.bias"] = Target(ours + "mlp.down.bias")
    return keys
