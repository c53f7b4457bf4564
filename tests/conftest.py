import os

import torch

# Without a GPU every Triton kernel runs on the CPU through the interpreter; it must be switched on
# before triton is first imported (importing torch does not import triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
