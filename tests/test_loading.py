"""zoo.load: registry, shape-only builds, and clear errors for bad checkpoints."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

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


# ---------------------------------------------------------------------------- CPU, no GPU

ROOT = Path(__file__).resolve().parents[1]


def run_without_triton_interpret(args: list[str], cwd=ROOT) -> subprocess.CompletedProcess:
    """A fresh Python with TRITON_INTERPRET unset (as a new user's shell has it)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cpu_load_arranges_the_interpreter(tmp_path):
    """zoo.load on a machine without a GPU makes the kernels run through Triton's interpreter
    (no "0 active drivers" at the first kernel), says so once, and computes HF's logits."""
    path = tiny_llama_checkpoint(tmp_path / "llama")
    ids = [[1, 7, 3, 49]]
    script = f"""
import json, os
import torch, zoo
try:
    zoo.load("llama3.2-1b-instrct")  # a typo first: its own error, the warning still to come
except KeyError:
    pass
model = zoo.load({str(path)!r})
zoo.load({str(path)!r}, device="cpu", dtype=torch.float16)
logits = model(torch.tensor({ids}))
print(json.dumps(dict(interpret=os.environ.get("TRITON_INTERPRET"), logits=logits.tolist())))
"""
    done = run_without_triton_interpret(["-c", script])
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["interpret"] == "1"
    assert done.stderr.count("Triton's interpreter") == 1, done.stderr
    assert "slow" in done.stderr
    hf_model = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        expected = hf_model(torch.tensor(ids)).logits
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("first", ["triton", "kernels.matmul"])
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_triton_imported_without_the_interpreter_is_refused(tmp_path, first):
    path = tiny_llama_checkpoint(tmp_path / "llama")
    script = f"""
import {first}, zoo
try:
    zoo.load({str(path)!r}, device="cpu")
except RuntimeError as e:
    print(e)
"""
    done = run_without_triton_interpret(["-c", script])
    assert done.returncode == 0, done.stderr
    assert "triton was already imported without it" in done.stdout
    assert "TRITON_INTERPRET=1 python script.py" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_triton_interpret_turned_off_on_the_cpu_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=0: .*set TRITON_INTERPRET=1"):
        zoo.load(tiny_llama_checkpoint(tmp_path), device="cpu")


@pytest.mark.parametrize("pretrained", [True, False])
def test_bfloat16_on_the_cpu_is_refused(tmp_path, pretrained):
    """Triton's interpreter computes bfloat16 dots wrongly: refused, naming what works."""
    source = tiny_llama_checkpoint(tmp_path) if pretrained else "llama3.2-1b"
    with pytest.raises(ValueError, match=r"dtype bfloat16 on the CPU: .* use dtype=torch\.float32"):
        zoo.load(source, device="cpu", dtype=torch.bfloat16, pretrained=pretrained)
    # shapes only: no kernel runs, so bfloat16 is fine there
    assert zoo.load("llama3.2-1b", device="meta", dtype=torch.bfloat16, pretrained=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_example_runs_on_the_cpu_without_triton_interpret(tmp_path):
    """examples/*.py load through zoo.load, which arranges the interpreter for them."""
    from test_text import build_checkpoint

    build_checkpoint(tmp_path)
    example = str(ROOT / "examples" / "generate.py")
    args = [example, "--model", str(tmp_path), "--prompt", "hello\n", "--max-new-tokens", "3"]
    done = run_without_triton_interpret(args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("hello\nhi ")
    assert done.stderr.count("Triton's interpreter") == 1, done.stderr


@pytest.mark.parametrize("example", ["generate.py", "chat.py", "embed.py", "translate.py"])
def test_example_reports_a_missing_checkpoint_in_one_line(tmp_path, example):
    """A user's error in an example script is one line naming the culprit, not a traceback."""
    missing = tmp_path / "no-such-checkpoint"
    args = [str(ROOT / "examples" / example), "--model", str(missing)]
    if example == "generate.py":
        args += ["--prompt", "hello"]
    done = run_without_triton_interpret(args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{example}: error: "), done.stderr
    assert str(missing) in lines[0]


def test_layer_count_far_beyond_the_checkpoint_is_refused_at_once(tmp_path):
    path = tiny_llama_checkpoint(tmp_path)
    config = json.loads((path / "config.json").read_text())
    cases = [(50000, "num_hidden_layers: expected a value <= 4096"), (300, r"missing \d+ tensor")]
    for layers, problem in cases:
        config["num_hidden_layers"] = layers
        (path / "config.json").write_text(json.dumps(config))
        start = time.perf_counter()
        with pytest.raises(ValueError, match=problem) as raised:
            zoo.load(path, device="cpu")
        assert time.perf_counter() - start < 10
        assert len(str(raised.value)) < 600
