"""Relative position bias lookup (kernels.relative_bias) against HF T5's own bucket function."""

import pytest
import torch
from helpers import DEVICE, DTYPES

from kernels.relative_bias import relative_position_bias
from zoo.models.t5 import relative_position_buckets

transformers = pytest.importorskip("transformers")
hf_bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket


def reference(table, query_length, key_length, offsets, bidirectional, num_buckets, max_distance):
    """HF's T5Attention.compute_bias, per batch row (query positions offset[b] + i)."""
    rows = []
    for offset in offsets:
        context = torch.arange(query_length, device=DEVICE)[:, None] + offset
        memory = torch.arange(key_length, device=DEVICE)[None, :]
        buckets = hf_bucket(
            memory - context,
            bidirectional=bidirectional,
            num_buckets=num_buckets,
            max_distance=max_distance,
        )
        rows.append(table[buckets].permute(2, 0, 1))  # (H, Tq, S)
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(
    "num_buckets, max_distance, heads, query_length, key_length, offsets",
    [
        (8, 20, 3, 23, 23, None),  # encoder: every distance bucket, beyond max_distance too
        (32, 128, 5, 13, 300, None),  # the real T5 buckets, keys beyond max_distance
        (8, 20, 3, 1, 37, [0, 5, 30]),  # decode step: one query per row at its cache length
        (32, 128, 6, 7, 160, [3, 140]),  # several queries after a cache prefix
    ],
)
def test_matches_hf_compute_bias(
    dtype, bidirectional, num_buckets, max_distance, heads, query_length, key_length, offsets
):
    table = torch.randn(num_buckets, heads, device=DEVICE).to(dtype)
    buckets = relative_position_buckets(bidirectional, num_buckets, max_distance, DEVICE)
    query_offset = None
    if offsets is not None:
        query_offset = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    ours = relative_position_bias(table, buckets, query_length, key_length, query_offset)
    expected = reference(
        table,
        query_length,
        key_length,
        offsets or [0],
        bidirectional,
        num_buckets,
        max_distance,
    )
    assert ours.dtype == dtype
    assert ours.shape == expected.shape
    assert torch.equal(ours, expected)  # a copy of table values: exact


def test_bucket_table_is_hf_bucket_function():
    for bidirectional in (True, False):
        buckets = relative_position_buckets(bidirectional, 32, 128, DEVICE)
        relative = torch.arange(-128, 129, device=DEVICE)
        expected = hf_bucket(
            relative, bidirectional=bidirectional, num_buckets=32, max_distance=128
        )
        assert torch.equal(buckets.long(), expected)


def test_rejects_bad_inputs():
    table = torch.randn(8, 3, device=DEVICE)
    buckets = relative_position_buckets(True, 8, 20, DEVICE)
    with pytest.raises(ValueError, match="buckets"):
        relative_position_bias(table, buckets.long(), 4, 4)
    with pytest.raises(ValueError, match="query_offset"):
        relative_position_bias(table, buckets, 1, 4, torch.zeros(2, device=DEVICE))
    with pytest.raises(ValueError, match="table"):
        relative_position_bias(table[0], buckets, 4, 4)
