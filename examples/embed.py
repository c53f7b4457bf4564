"""Sentence embeddings with a zoo Bert: mean pooling over the attention mask, L2-normalised, and
their cosine-similarity matrix (as sentence-transformers' all-MiniLM-L6-v2 computes them).

    python examples/embed.py                                       # all-minilm-l6-v2, sample sentences
    python examples/embed.py --model /path/to/checkpoint --sentence "A cat." --sentence "A dog."

The checkpoint's own tokenizer.json is read through `tokenizers` (zoo.load sets model.tokenizer).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import zoo
from zoo.cli import run_reporting_errors

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "The girl is carrying a baby.",
    "A monkey is playing drums.",
]


def tokenize(model, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, attention mask and token types [B, T] of a right-padded batch, on the model's device.

    Keeps the tokenizer.json's own padding and truncation settings where it has them; pads on the
    right (what Bert's attention mask expects) and never beyond max_position_embeddings."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("the checkpoint has no tokenizer.json")
    limit = model.config.max_position_embeddings
    truncation = tokenizer.truncation or {}
    tokenizer.enable_truncation(min(truncation.get("max_length", limit), limit))
    padding = tokenizer.padding or {}
    pad_id = padding.get("pad_id", model.config.pad_token_id or 0)
    pad_token = padding.get("pad_token", tokenizer.id_to_token(pad_id))
    tokenizer.enable_padding(direction="right", pad_id=pad_id, pad_token=pad_token)
    encodings = tokenizer.encode_batch(sentences)

    def stack(field: str) -> torch.Tensor:
        rows = [getattr(e, field) for e in encodings]
        return torch.tensor(rows, dtype=torch.int64, device=model.device)

    return stack("ids"), stack("attention_mask"), stack("type_ids")


@torch.no_grad()
def embed(model, sentences: list[str]) -> torch.Tensor:
    """L2-normalised mean-pooled embeddings [B, hidden] (fp32) of the sentences."""
    ids, mask, types = tokenize(model, sentences)
    hidden = model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state.float()
    weights = mask.unsqueeze(-1).float()  # (B, T, 1): padded positions count for nothing
    mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return F.normalize(mean, dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description="Sentence embeddings and their similarities")
    parser.add_argument(
        "--model",
        default="all-minilm-l6-v2",
        help="registry name, HF repo id (org/name) or checkpoint folder",
    )
    parser.add_argument("--sentence", action="append", help="a sentence (repeat for more)")
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--quantize", choices=["fp8"], default=None, help="fp8: FP8 weights for the Linears"
    )
    args = parser.parse_args()

    model = zoo.load(args.model, device=args.device, quantize=args.quantize)
    sentences = args.sentence or SENTENCES
    embeddings = embed(model, sentences)
    similarity = embeddings @ embeddings.T  # cosine similarities: the rows are unit vectors

    print(f"{len(sentences)} embeddings of size {embeddings.shape[1]}; cosine similarities:")
    for i, sentence in enumerate(sentences):
        row = " ".join(f"{s:6.3f}" for s in similarity[i].tolist())
        print(f"[{i}] {row}   {sentence}")


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main, "embed.py"))
