"""Bert checkpoint keys -> zoo parameters: query/key/value fused into one QKV weight (rows
concatenated in that order).

Checkpoints come in several spellings, all read through `normalize_key`:
- `BertModel.save_pretrained` and sentence-transformers exports: no prefix
  (`embeddings.word_embeddings.weight`), with or without `pooler.dense.*`;
- `BertForMaskedLM` / `BertForPreTraining`: a `bert.` prefix, plus their `cls.*` heads, which are
  dropped (this model is the encoder);
- older exports (the hub's bert-base-uncased): LayerNorm `gamma`/`beta` for `weight`/`bias`, and a
  saved `embeddings.position_ids` buffer (dropped).
"""

import dataclasses

from convert.hf import DROP, KeyMap, Target

POOLER_KEY = "pooler.dense.weight"

# The pretraining heads of BertForMaskedLM / BertForPreTraining (not part of the encoder).
HEAD_KEYS = [
    "cls.predictions.bias",
    "cls.predictions.transform.dense.weight",
    "cls.predictions.transform.dense.bias",
    "cls.predictions.transform.LayerNorm.weight",
    "cls.predictions.transform.LayerNorm.bias",
    "cls.predictions.decoder.weight",  # a copy of the tied word embeddings in older exports
    "cls.predictions.decoder.bias",
    "cls.seq_relationship.weight",
    "cls.seq_relationship.bias",
]


def normalize_key(key: str) -> str:
    """`bert.encoder...` -> `encoder...`; legacy LayerNorm `gamma`/`beta` -> `weight`/`bias`."""
    key = key.removeprefix("bert.")
    if key.endswith("LayerNorm.gamma"):
        key = key.removesuffix("gamma") + "weight"
    elif key.endswith("LayerNorm.beta"):
        key = key.removesuffix("beta") + "bias"
    return key


def config_from_checkpoint(config, names: set[str]):
    """The config with a pooler exactly when the checkpoint holds one (`BertModel` and
    `BertForPreTraining` save it, `BertForMaskedLM` does not)."""
    has_pooler = any(normalize_key(name) == POOLER_KEY for name in names)
    return dataclasses.replace(config, add_pooling_layer=has_pooler)


def key_map(config) -> KeyMap:
    """Bert keys (after `normalize_key`) for this config (a zoo BertConfig)."""
    c = config
    hidden = c.hidden_size
    keys: KeyMap = {
        "embeddings.word_embeddings.weight": Target("embeddings.word.weight"),
        "embeddings.position_embeddings.weight": Target("embeddings.position.weight"),
        "embeddings.token_type_embeddings.weight": Target("embeddings.token_type.weight"),
        "embeddings.LayerNorm.weight": Target("embeddings.norm.weight"),
        "embeddings.LayerNorm.bias": Target("embeddings.norm.bias"),
        "embeddings.position_ids": DROP,  # a buffer in older exports
    }
    keys.update(dict.fromkeys(HEAD_KEYS, DROP))
    if c.add_pooling_layer:
        keys["pooler.dense.weight"] = Target("pooler.weight")
        keys["pooler.dense.bias"] = Target("pooler.bias")
    for i in range(c.num_layers):
        hf = f"encoder.layer.{i}."
        ours = f"layers.{i}."
        for kind in ("weight", "bias"):
            for j, name in enumerate(("query", "key", "value")):
                keys[hf + f"attention.self.{name}.{kind}"] = Target(
                    ours + "qkv." + kind, j * hidden, (j + 1) * hidden
                )
            keys[hf + f"attention.output.dense.{kind}"] = Target(ours + "attn_out." + kind)
            keys[hf + f"attention.output.LayerNorm.{kind}"] = Target(ours + "attn_norm." + kind)
            keys[hf + f"intermediate.dense.{kind}"] = Target(ours + "intermediate." + kind)
            keys[hf + f"output.dense.{kind}"] = Target(ours + "output." + kind)
            keys[hf + f"output.LayerNorm.{kind}"] = Target(ours + "output_norm." + kind)
    return keys
