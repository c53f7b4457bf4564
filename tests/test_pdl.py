"""Programmatic dependent launch (PDL): on Hopper every kernel may be scheduled while the previous
one finishes and waits for it before touching memory, so results must be bitwise the same with
PDL on and off. A kernel that read or wrote before its wait would race with its predecessor; the
models below chain every kernel (matmul with split-K and in-place residuals, attention, norms,
embeddings, RoPE with the cache write, split-KV decode, T5's relative bias) at real sizes,
replayed from CUDA graphs, where the kernels are back to back."""

import pytest
import torch
from helpers import DEVICE

import kernels.utils
import zoo
from kernels.utils import is_hopper_or_newer, pdl_meta

HOPPER = DEVICE == "cuda" and is_hopper_or_newer(torch.device(DEVICE))
needs_hopper = pytest.mark.skipif(not HOPPER, reason="PDL needs a Hopper (sm_90+) GPU")


def test_pdl_only_where_the_hardware_has_it():
    assert pdl_meta(torch.device("cpu"), 1) == {"USE_PDL": False, "launch_pdl": False}
    if HOPPER:
        assert pdl_meta(torch.device(DEVICE), 1) == {"USE_PDL": True, "launch_pdl": True}
        # many rows: the kernels are long enough that PDL no longer pays
        assert pdl_meta(torch.device(DEVICE), 4096) == {"USE_PDL": False, "launch_pdl": False}


@needs_hopper
def test_off_switch(monkeypatch):
    monkeypatch.setattr(kernels.utils, "PDL", False)
    assert pdl_meta(torch.device(DEVICE), 1) == {"USE_PDL": False, "launch_pdl": False}


def _bert_outputs(model, ids):
    """Eager outputs, then the same forward replayed from a CUDA graph."""
    mask, types = torch.ones_like(ids), torch.zeros_like(ids)
    # with the mask the eager call tunes the kernels for the captured call's arguments (kv_end)
    eager = model(ids, attention_mask=mask, cuda_graph=False).last_hidden_state.clone()
    kv_end = mask.sum(-1).to(torch.int32)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = model.encode(ids, types, kv_end)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):  # replays overlap the previous replay's tail too
        graph.replay()
    torch.cuda.synchronize()
    return eager, out.last_hidden_state.clone(), out.pooler_output.clone()


@needs_hopper
@pytest.mark.parametrize("batch, seq", [(1, 128), (2, 100)])
def test_bert_same_with_and_without_pdl(monkeypatch, batch, seq):
    model = zoo.load("bert-base-uncased", pretrained=False)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=DEVICE)
    monkeypatch.setattr(kernels.utils, "PDL", False)
    expected = _bert_outputs(model, ids)
    monkeypatch.setattr(kernels.utils, "PDL", True)
    actual = _bert_outputs(model, ids)
    for name, a, e in zip(("eager", "graph", "pooler"), actual, expected, strict=True):
        assert torch.equal(a, e), f"bert {batch}x{seq} {name}: outputs differ with PDL"


@needs_hopper
@pytest.mark.parametrize("name", ["gpt2", "llama3.2-1b", "t5-small"])
def test_generation_same_with_and_without_pdl(monkeypatch, name):
    model = zoo.load(name, pretrained=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 96), device=DEVICE)
    outputs = {}
    for pdl in (False, True):
        monkeypatch.setattr(kernels.utils, "PDL", pdl)
        model.engine.reset()  # capture the decode and prefill graphs again
        outputs[pdl] = model.generate(ids, max_new_tokens=48, eos_token_id=[])
    assert torch.equal(outputs[True], outputs[False]), f"{name}: tokens differ with PDL"
