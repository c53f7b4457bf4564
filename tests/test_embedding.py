import pytest
import torch
from helpers import DEVICE, DTYPES

from kernels.embedding import embedding


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_scale_and_positions(dtype):
    weight = torch.randn(37, 24, device=DEVICE, dtype=dtype)
    positions_table = torch.randn(11, 24, device=DEVICE, dtype=dtype)
    ids = torch.randint(0, 37, (3, 5), device=DEVICE)
    positions = torch.randint(0, 11, (3, 5), device=DEVICE)
    plain = embedding(ids, weight)
    assert torch.equal(plain, weight[ids])
    scaled = embedding(ids, weight, scale=12.0)
    assert torch.equal(scaled, (weight[ids].float() * 12.0).to(dtype))
    summed = embedding(ids, weight, positions=positions, position_weight=positions_table)
    expected = (weight[ids].float() + positions_table[positions].float()).to(dtype)
    assert torch.equal(summed, expected)


def test_out_of_range_ids_are_never_read():
    weight = torch.randn(5, 8, device=DEVICE)
    ids = torch.tensor([[0, 5, -1, 4]], device=DEVICE)
    out = embedding(ids, weight)
    assert torch.equal(out[0, 0], weight[0]) and torch.equal(out[0, 3], weight[4])
    assert torch.equal(out[0, 1:3], torch.zeros(2, 8, device=DEVICE))
