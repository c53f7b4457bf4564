"""zoo.load: registry, shape-only builds, and clear errors for bad checkpoints."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import zoo
from convert.hf import CheckpointError

transformers = pytest.importorskip("transformers")


def tiny_llama_checkpoint(path):
    config = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_list_models_has_the_registry():
    names = zoo.list_models()
    for name in [
        "llama3-8b",
        "llama3.1-8b-instruct",
        "llama3.2-1b",
        "granite-8b-code-base",
        "granite-3.3-8b-instruct",
    ]:
        assert name in names


def test_unknown_name_lists_the_known_models():
    with pytest.raises(KeyError, match="no-such-model.*llama3-8b"):
        zoo.load("no-such-model")


@pytest.mark.parametrize(
    "name", ["llama3-8b", "llama3.2-1b", "granite-8b-code-base", "granite-3.3-2b-instruct"]
)
def test_meta_build_has_hf_parameter_count(name):
    entry = zoo.registry.get_entry(name)
    model = zoo.load(name, pretrained=False, device="meta")
    ours = sum(p.numel() for p in model.parameters())
    config_class = transformers.AutoConfig.for_model(**entry.config)
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(config_class)
    assert ours == sum(p.numel() for p in hf_model.parameters())
    if name == "llama3-8b":
        assert ours == 8_030_261_248


def test_missing_tensor_is_named(tmp_path):
    path = tiny_llama_checkpoint(tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight"):
        zoo.load(path, device="cpu")


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
    path = tiny_llama_checkpoint(tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(31)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*\(31,\).*\(32,\)"):
        zoo.load(path, device="cpu")


def test_unexpected_tensor_is_named(tmp_path):
    path = tiny_llama_checkpoint(tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.extra.weight"] = torch.ones(3)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.extra\.weight"):
        zoo.load(path, device="cpu")


def test_unsupported_model_type(tmp_path):
    path = tiny_llama_checkpoint(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "mamba"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mamba.*supported: llama, granite"):
        zoo.load(path, device="cpu")


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        zoo.load(tmp_path, device="cpu")


def test_pickle_only_checkpoint_is_refused(tmp_path):
    path = tiny_llama_checkpoint(tmp_path)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*safetensors"):
        zoo.load(path, device="cpu")


def test_out_of_vocab_ids_are_rejected(tmp_path):
    model = zoo.load(tiny_llama_checkpoint(tmp_path), device="cpu")
    with pytest.raises(ValueError, match="token id 50 is outside"):
        model(torch.tensor([[1, 50]]))
    with pytest.raises(ValueError, match="context of 64"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=63)
