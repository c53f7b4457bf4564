"""T5 / Flan-T5 checkpoint keys -> zoo parameters: self-attention q/k/v fused into one QKV weight,
cross-attention k/v into one KV weight, gated-gelu wi_0/wi_1 into one gate-up weight (rows
concatenated in that order). Only layer 0 of each stack holds a relative-attention-bias table:
it becomes the stack's `relative_bias`."""

from convert.hf import DROP, KeyMap, Target


def key_map(config) -> KeyMap:
    """HF `T5ForConditionalGeneration` keys for this config (a zoo T5Config)."""
    c = config
    inner = c.num_heads * c.d_kv
    keys: KeyMap = {
        "shared.weight": Target("shared.weight"),
        # the stacks' embeddings are the shared matrix (HF ties them; some files keep copies)
        "encoder.embed_tokens.weight": DROP,
        "decoder.embed_tokens.weight": DROP,
        # a tied head is the shared embedding itself; a copy in the file is redundant
        "lm_head.weight": DROP if c.tie_word_embeddings else Target("lm_head.weight"),
        # never used by HF either (its _keys_to_ignore_on_load_unexpected)
        "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight": DROP,
    }
    for stack, num_layers in (("encoder", c.num_layers), ("decoder", c.num_decoder_layers)):
        keys[f"{stack}.final_layer_norm.weight"] = Target(f"{stack}.norm.weight")
        keys[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = Target(
            f"{stack}.relative_bias.weight"
        )
        for i in range(num_layers):
            hf = f"{stack}.block.{i}.layer."
            ours = f"{stack}.layers.{i}."
            qkv = ours + "attn.qkv.weight"
            keys[hf + "0.layer_norm.weight"] = Target(ours + "attn_norm.weight")
            keys[hf + "0.SelfAttention.q.weight"] = Target(qkv, 0, inner)
            keys[hf + "0.SelfAttention.k.weight"] = Target(qkv, inner, 2 * inner)
            keys[hf + "0.SelfAttention.v.weight"] = Target(qkv, 2 * inner, 3 * inner)
            keys[hf + "0.SelfAttention.o.weight"] = Target(ours + "attn.out.weight")
            ff = 1
            if stack == "decoder":
                kv = ours + "cross.kv.weight"
                keys[hf + "1.layer_norm.weight"] = Target(ours + "cross_norm.weight")
                keys[hf + "1.EncDecAttention.q.weight"] = Target(ours + "cross.q.weight")
                keys[hf + "1.EncDecAttention.k.weight"] = Target(kv, 0, inner)
                keys[hf + "1.EncDecAttention.v.weight"] = Target(kv, inner, 2 * inner)
                keys[hf + "1.EncDecAttention.o.weight"] = Target(ours + "cross.out.weight")
                ff = 2
            keys[hf + f"{ff}.layer_norm.weight"] = Target(ours + "ff_norm.weight")
            dense = hf + f"{ff}.DenseReluDense."
            if c.gated:
                keys[dense + "wi_0.weight"] = Target(ours + "ff.wi.weight", 0, c.d_ff)
                keys[dense + "wi_1.weight"] = Target(ours + "ff.wi.weight", c.d_ff, 2 * c.d_ff)
            else:
                keys[dense + "wi.weight"] = Target(ours + "ff.wi.weight")
            keys[dense + "wo.weight"] = Target(ours + "ff.wo.weight")
    return keys
