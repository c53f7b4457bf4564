"""Which part of a tensor-parallel model one rank holds: plain arithmetic on config sizes, shared
by the key maps (which rows and columns of each checkpoint tensor a rank reads) and the models
(the sizes of a rank's layers). Every split is checked here, with an error naming the size."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `world` tensor-parallel ranks (world >= 1)."""

    rank: int
    world: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is outside a tensor-parallel world of {self.world}")

    def split(self, size: int, name: str) -> tuple[int, int]:
        """[start, end) of this rank's equal part of `size` (a config.json value called name)."""
        if size % self.world:
            raise ValueError(
                f"tensor parallelism tp={self.world}: config.json {name} {size} is not "
                f"divisible by {self.world}"
            )
        part = size // self.world
        return self.rank * part, (self.rank + 1) * part

    def heads(self, num_heads: int, num_kv_heads: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """([start, end) of this rank's query heads, [start, end) of its key/value heads).

        Query heads are split evenly; key/value heads too when there are at least as many as
        ranks, else each rank keeps the one key/value head its query heads use (replicated over
        world / num_kv_heads ranks)."""
        q = self.split(num_heads, "num_attention_heads")
        if num_kv_heads >= self.world:
            return q, self.split(num_kv_heads, "num_key_value_heads")
        if self.world % num_kv_heads:
            raise ValueError(
                f"tensor parallelism tp={self.world}: config.json num_key_value_heads "
                f"{num_kv_heads} neither divides by nor divides {self.world} (each rank needs "
                "whole key/value heads)"
            )
        first = self.rank * num_kv_heads // self.world
        return q, (first, first + 1)

    def vocab(self, vocab_size: int) -> tuple[int, int]:
        """[start, end) of this rank's rows of a vocabulary-split LM head: ceil(V / world) rows
        each, the last rank's part shorter when V does not divide."""
        per_rank = self.vocab_part(vocab_size)
        start = self.rank * per_rank
        end = min(start + per_rank, vocab_size)
        if end <= start:
            raise ValueError(
                f"tensor parallelism tp={self.world}: config.json vocab_size {vocab_size} leaves "
                f"rank {self.rank} no rows of the LM head"
            )
        return start, end

    def vocab_part(self, vocab_size: int) -> int:
        """Rows of the LM head per rank before the last (the padded width of a gathered part)."""
        return -(-vocab_size // self.world)
