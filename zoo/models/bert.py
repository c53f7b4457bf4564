"""Bert: a bidirectional post-LayerNorm encoder, with the optional pooler.

    h = layer_norm(word[ids] + token_type[tt] + position[t])
    h = layer_norm(h + out(attn(qkv(h))))                    # attention over the real keys only
    h = layer_norm(h + down(gelu(up(h))))
    pooler_output = tanh(dense(h[:, 0]))                     # [CLS]

A batch is right-padded: `attention_mask` rows are ones then zeros, and each row's keys stop at its
length (the attention kernel's kv_end), so padding never changes the real positions' outputs.
A batch of mostly short rows runs packed (zoo.layers.pack_rows): its rows' real tokens one after
another, so the matmuls, norms and attention skip the padding; its padded positions' outputs are
then 0. Otherwise they are computed too (they attend to the real keys), as HF's BertModel does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from convert.config import read_count, read_float, read_size, read_str, read_token_ids
from kernels.attention import attention
from kernels.embedding import embedding
from zoo import graphs
from zoo.generation import check_input_ids, right_padding_lengths
from zoo.generation.inputs import (
    ValueChecks,
    check_attention_mask,
    check_cuda_graph,
    check_token_type_ids,
)
from zoo.layers import (
    LayerNorm,
    Linear,
    PackedRows,
    init_random_,
    may_pack,
    pack_rows,
    packed_tokens,
)

# HF `hidden_act` -> our matmul epilogue (HF ACT2FN: "gelu" is the exact erf GELU)
ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}


@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str = "gelu"
    # BertModel builds a pooler; a checkpoint without one (BertForMaskedLM) turns it off
    add_pooling_layer: bool = True
    initializer_range: float = 0.02
    pad_token_id: int | None = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"unsupported hidden_act {self.hidden_act!r} for bert; "
                f"supported: {', '.join(ACTIVATIONS)}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf: dict) -> BertConfig:
        """From a `bert` config.json (an encoder with absolute positions)."""
        position_type = read_str(hf, "position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(
                f"unsupported position_embedding_type {position_type!r} for bert; "
                "supported: absolute"
            )
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise ValueError("bert as a decoder (is_decoder / add_cross_attention) is unsupported")
        return cls(
            vocab_size=read_size(hf, "vocab_size"),
            hidden_size=read_size(hf, "hidden_size"),
            intermediate_size=read_size(hf, "intermediate_size"),
            num_layers=read_count(hf, "num_hidden_layers"),
            num_heads=read_count(hf, "num_attention_heads"),
            max_position_embeddings=read_size(hf, "max_position_embeddings", 512),
            type_vocab_size=read_size(hf, "type_vocab_size", 2),
            layer_norm_eps=read_float(hf, "layer_norm_eps", 1e-12, min=0.0),
            hidden_act=read_str(hf, "hidden_act", "gelu"),
            initializer_range=read_float(hf, "initializer_range", 0.02, min=0.0),
            pad_token_id=read_token_ids(hf, "pad_token_id", 0),
        )


@dataclass
class BertOutput:
    last_hidden_state: torch.Tensor  # [B, T, hidden]
    pooler_output: torch.Tensor | None  # [B, hidden]; None when the checkpoint has no pooler


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = LayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, input_ids, token_type_ids, position_ids):
        # word + token type first, then + position, rounded in that order as HF's BertEmbeddings
        # adds them (the kernel's second table is any [rows, hidden] table)
        x = embedding(
            input_ids,
            self.word.weight,
            positions=token_type_ids,
            position_weight=self.token_type.weight,
        )  # (B, T, hidden)
        h, _ = self.norm(x, residual=embedding(position_ids, self.position.weight))
        return h


class BertBlock(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.activation = ACTIVATIONS[config.hidden_act]
        self.qkv = Linear(hidden, 3 * hidden, bias=True)
        self.attn_out = Linear(hidden, hidden, bias=True)
        self.attn_norm = LayerNorm(hidden, eps)
        self.intermediate = Linear(hidden, config.intermediate_size, bias=True)
        self.output = Linear(config.intermediate_size, hidden, bias=True)
        self.output_norm = LayerNorm(hidden, eps)

    def forward(
        self, h: torch.Tensor, kv_end: torch.Tensor | None, packed: PackedRows | None = None
    ) -> torch.Tensor:
        """h [B, T, hidden] with rows of kv_end real tokens, or packed rows [1, tokens, hidden]."""
        batch, seq, hidden = h.shape
        qkv = self.qkv(h).view(batch, seq, 3, self.num_heads, self.head_dim)  # (B, T, 3, H, D)
        q, k, v = qkv.unbind(2)  # (B, T, H, D) views of the fused output
        if packed is None:
            o = attention(q, k, v, causal=False, scale=self.scale, kv_end=kv_end)  # (B, T, H, D)
        else:
            first, lengths, _ = packed.rows
            o = attention(
                q, k, v, causal=False, scale=self.scale, kv_end=lengths, seq_offsets=first,
                max_length=packed.max_length,
            )  # fmt: skip
        # post-LayerNorm: the residual add is fused into the projection's epilogue
        h = self.attn_norm(self.attn_out(o.view(batch, seq, hidden), residual=h))
        x = self.intermediate(h, activation=self.activation)  # (B, T, I)
        return self.output_norm(self.output(x, residual=h))


class Bert(nn.Module):
    """Bert encoder on our kernels.

    `model(input_ids, attention_mask=None, token_type_ids=None)` -> BertOutput with
    `last_hidden_state` [B, T, hidden] and `pooler_output` [B, hidden] (None without a pooler).
    On CUDA a plain call replays a CUDA graph per shape bucket (zoo.graphs); `cuda_graph = False`
    on the model (or per call) runs it eagerly.
    """

    cuda_graph: bool = True

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertBlock(config) for _ in range(config.num_layers))
        self.pooler = (
            Linear(config.hidden_size, config.hidden_size, bias=True)
            if config.add_pooling_layer
            else None
        )

    def init_buffers(self) -> None:
        """Nothing to fill: Bert has no non-parameter state."""

    def init_random(self, generator: torch.Generator | None = None) -> None:
        init_random_(self, self.config.initializer_range, generator)

    @property
    def device(self) -> torch.device:
        return self.embeddings.word.weight.device

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        cuda_graph: bool | None = None,
    ) -> BertOutput:
        """Encode a right-padded batch of token ids [B, T].

        attention_mask [B, T]: 1 for real tokens, 0 for padding; each row is ones then zeros with
        at least one 1 (None: every token is real). token_type_ids [B, T] in
        [0, type_vocab_size) (None: all 0). Outputs at padded positions are meaningless (0
        where the batch runs packed, zoo.layers.pack_rows); the real positions do not depend on
        them. On CUDA the call replays a CUDA graph of its shape bucket (bitwise the eager
        result) unless cuda_graph=False.
        """
        c = self.config
        check_cuda_graph(cuda_graph, self.device)
        graphed = graphs.use_graphs(self, cuda_graph)
        # eagerly the value checks are read back with one sync before any kernel runs; a graphed
        # call computes them inside its graph and reads them back after it (zoo.graphs)
        checks = ValueChecks(enabled=not graphed)
        check_input_ids(input_ids, c.vocab_size, self.device, checks=checks)
        batch, seq = input_ids.shape
        if seq > c.max_position_embeddings:
            raise ValueError(
                f"input_ids: {seq} tokens exceed max_position_embeddings {c.max_position_embeddings}"
            )
        if graphed:
            if token_type_ids is not None:
                check_token_type_ids(token_type_ids, input_ids, c.type_vocab_size, checks)
            if attention_mask is not None:
                attention_mask = check_attention_mask(attention_mask, input_ids, checks)
            hidden, pooled = graphs.bert_forward(self, input_ids, attention_mask, token_type_ids)
            return BertOutput(last_hidden_state=hidden, pooler_output=pooled)
        token_type_ids = check_token_type_ids(token_type_ids, input_ids, c.type_vocab_size, checks)
        kv_end = right_padding_lengths(attention_mask, input_ids, "Bert batches", checks)
        checks.run()
        tokens = None
        # (a torch.compile trace runs padded: packing reads the real token count to the host)
        if kv_end is not None and may_pack(batch, seq) and not torch.compiler.is_compiling():
            tokens = packed_tokens(batch, seq, int(kv_end.sum()))
        if tokens is not None:
            padded = graphs.padded_length(batch, seq, c.max_position_embeddings)
            packed = pack_rows(kv_end, tokens, padded, row_length=seq)
            return self.encode_packed(input_ids, token_type_ids, packed)
        return self.encode(input_ids, token_type_ids, kv_end)

    def encode(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, kv_end: torch.Tensor | None
    ) -> BertOutput:
        """forward without the input checks (no host sync, so it can be captured in a CUDA
        graph): token_type_ids [B, T]; kv_end [B] int32 real lengths, or None for full rows."""
        batch, seq = input_ids.shape
        position_ids = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        h = self.embeddings(input_ids, token_type_ids, position_ids)  # (B, T, hidden)
        for layer in self.layers:
            h = layer(h, kv_end)
        pooled = None
        if self.pooler is not None:
            pooled = self.pooler(h[:, 0], activation="tanh")  # (B, hidden), from [CLS]
        return BertOutput(last_hidden_state=h, pooler_output=pooled)

    def encode_packed(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, packed: PackedRows
    ) -> BertOutput:
        """encode with the rows packed (zoo.layers.pack_rows, index and rows on the device): the
        same outputs at the real positions, 0 at the padded ones."""
        batch, seq = input_ids.shape
        source, positions, inverse = packed.token_index()
        ids = input_ids.reshape(-1)[source].view(1, -1)
        types = token_type_ids.reshape(-1)[source].view(1, -1)
        h = self.embeddings(ids, types, positions.view(1, -1))  # (1, tokens, hidden)
        for layer in self.layers:
            h = layer(h, None, packed)
        pooled = None
        if self.pooler is not None:
            first_tokens = h[0].index_select(0, packed.rows[2, :batch])  # (B, hidden), [CLS]
            pooled = self.pooler(first_tokens, activation="tanh")
        # back to [B, T]: each position reads its packed token, the padded ones the last spare
        # token, set to 0 (a gather: deterministic, where a scatter of the spares would not be)
        h[0, -1].zero_()
        hidden = h[0].index_select(0, inverse).view(batch, seq, -1)
        return BertOutput(last_hidden_state=hidden, pooler_output=pooled)
