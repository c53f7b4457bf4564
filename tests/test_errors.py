"""Bad checkpoints and bad inputs get a clear error: each test asserts the exception type and that
the message names the culprit (file, key, argument, value, shapes, devices or dtypes).

Input errors must be raised before any Triton kernel runs on the input: a guard (autouse fixture)
turns every kernel launch into a test failure, because on the GPU an out-of-range id or a mask on
the wrong device would be an illegal memory access that poisons the process, not an exception.

Covered elsewhere, not repeated here: test_loading.py (unknown registry name, folder without
config.json, unsupported model_type, pickle-only checkpoint, missing / mis-shaped / unexpected
tensor, Llama's out-of-vocabulary ids and generate's context limit), test_sampling.py
(GenerationConfig's argument checks), test_bert.py (Bert's mask layouts and values, too-high ids and
token types, length), test_t5.py (T5's mask padding side and values, missing decoder_input_ids),
test_rope.py (rope_inv_freq's rope_type).
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import DEVICE
from safetensors.torch import load_file, save_file
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import zoo
from convert.hf import SAFETENSORS_INDEX, CheckpointError

transformers = pytest.importorskip("transformers")

# family -> (HF config class, HF model class, config): tiny, with a different vocabulary size per
# family so that each message is seen to name the right one
TINY = {
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
        ),
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(vocab_size=61, n_positions=40, n_embd=32, n_layer=1, n_head=2, eos_token_id=60),
    ),
    "bert": (
        "BertConfig",
        "BertModel",
        dict(
            vocab_size=53,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=40,
            max_position_embeddings=24,
            type_vocab_size=2,
        ),
    ),
    "t5": (
        "T5Config",
        "T5ForConditionalGeneration",
        dict(
            vocab_size=47,
            d_model=32,
            d_kv=8,
            d_ff=40,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=20,
            decoder_start_token_id=0,
            eos_token_id=1,
            pad_token_id=0,
        ),
    ),
}
FAMILIES = list(TINY)
GENERATORS = ["llama", "gpt2", "t5"]  # the families with generate


def vocab(family: str) -> int:
    return TINY[family][2]["vocab_size"]


@pytest.fixture
def kernels_allowed():
    """Requested by a test that runs the model on purpose: the launch guard stays off."""


@pytest.fixture(autouse=True)
def no_kernel_launches(request, monkeypatch):
    """Any Triton kernel launch fails the test (GPU: JITFunction; interpreter: its own class)."""
    if "kernels_allowed" in request.fixturenames:
        return

    def launched(kernel, *args, **kwargs):
        raise AssertionError(
            f"Triton kernel {kernel.fn.__name__} was launched before the bad input was rejected"
        )

    for cls in (JITFunction, InterpretedFunction):
        monkeypatch.setattr(cls, "run", launched)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> a tiny HF checkpoint folder (save_pretrained); "llama-sharded" has several
    shards and an index."""
    made = {}
    for family, (config_class, model_class, config) in TINY.items():
        torch.manual_seed(0)
        hf_config = getattr(transformers, config_class)(**config)
        model = getattr(transformers, model_class)(hf_config)
        made[family] = tmp_path_factory.mktemp(family)
        model.save_pretrained(made[family])
        if family == "llama":
            made["llama-sharded"] = tmp_path_factory.mktemp("llama-sharded")
            model.save_pretrained(made["llama-sharded"], max_shard_size="10KB")
    return made


@pytest.fixture(scope="module")
def models(folders):
    models = {family: zoo.load(folders[family], device=DEVICE) for family in FAMILIES}
    # A graphed Bert call checks the values of its inputs inside its graph (its kernels stay in
    # bounds on any values) and raises after the replay: tests/test_graphs.py covers that path.
    # Here every family rejects bad values before any kernel runs.
    models["bert"].cuda_graph = False
    return models


@pytest.fixture
def copy_of(folders, tmp_path):
    """A fresh copy of one of the checkpoint folders, to damage."""

    def copy(name: str) -> Path:
        return Path(shutil.copytree(folders[name], tmp_path / name))

    return copy


def ids(*rows, dtype=torch.long, device=DEVICE):
    return torch.tensor(rows, dtype=dtype, device=device)


def forward(family, model, input_ids, **kwargs):
    """model(input_ids, ...); T5 also gets valid decoder ids (batch 1) unless given."""
    if family == "t5":
        kwargs.setdefault("decoder_input_ids", ids([0]))
    return model(input_ids, **kwargs)


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def header_length(data: bytes) -> int:
    """A safetensors file: 8 bytes (little-endian header length), the JSON header, the data."""
    return int.from_bytes(data[:8], "little")


# ---------------------------------------------------------------------------- checkpoint files


def test_index_naming_a_missing_shard(copy_of):
    folder = copy_of("llama-sharded")
    weight_map = json.loads((folder / SAFETENSORS_INDEX).read_text())["weight_map"]
    shard = sorted(set(weight_map.values()))[1]
    (folder / shard).unlink()
    with pytest.raises(
        FileNotFoundError, match=rf"names shard {re.escape(shard)}, which is missing"
    ):
        zoo.load(folder, device=DEVICE)


def test_index_naming_a_file_outside_the_folder(copy_of):
    folder = copy_of("llama-sharded")
    index = json.loads((folder / SAFETENSORS_INDEX).read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../elsewhere.safetensors"
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"names shard '\.\./elsewhere\.safetensors'"):
        zoo.load(folder, device=DEVICE)


@pytest.mark.parametrize("cut", ["in the data", "in the header"])
def test_truncated_safetensors_file(copy_of, cut):
    folder = copy_of("llama-sharded")
    shard = sorted(folder.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    end_of_header = 8 + header_length(data)
    keep = (end_of_header + len(data)) // 2 if cut == "in the data" else end_of_header // 2
    shard.write_bytes(data[:keep])
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(shard.name)}: not a readable safetensors file"
    ):
        zoo.load(folder, device=DEVICE)


@pytest.mark.parametrize("damage", ["header not JSON", "not safetensors at all", "empty"])
def test_corrupt_safetensors_file(copy_of, damage):
    folder = copy_of("llama")
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "header not JSON":  # same length, so only the JSON parse can fail
        length = header_length(data)
        data[8 : 8 + length] = b"{" + b"#" * (length - 1)
    elif damage == "not safetensors at all":  # e.g. an error page saved by a failed download
        data = bytearray(b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>")
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors"):
        zoo.load(folder, device=DEVICE)


def test_tensor_in_two_shards(copy_of):
    folder = copy_of("llama-sharded")
    first, second = sorted(folder.glob("*.safetensors"))[:2]
    tensors = load_file(second)
    key, tensor = next(iter(load_file(first).items()))
    tensors[key] = tensor
    save_file(tensors, second, metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(key)}.*also appears in {re.escape(first.name)}"
    ):
        zoo.load(folder, device=DEVICE)


def test_integer_tensor_is_refused_not_cast(copy_of):
    folder = copy_of("llama")
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    tensors[key] = torch.ones_like(tensors[key], dtype=torch.int8)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{re.escape(key)}.*dtype torch\.int8"):
        zoo.load(folder, device=DEVICE)


def test_wrong_shape_of_a_transposed_conv1d_weight(copy_of):
    """GPT-2 stores Conv1D weights (in, out) and we transpose them: the message gives the shapes
    as the file stores them."""
    folder = copy_of("gpt2")
    tensors = load_file(folder / "model.safetensors")
    key = next(k for k in tensors if k.endswith("h.0.attn.c_attn.weight"))
    assert tuple(tensors[key].shape) == (32, 96)
    tensors[key] = torch.zeros(32, 95)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(key)}' has shape \(32, 95\), expected \(32, 96\)"
    ):
        zoo.load(folder, device=DEVICE)


def test_wrong_shape_of_one_part_of_a_fused_weight(copy_of):
    """k_proj is rows of our fused QKV: the message names the HF key and its own shape."""
    folder = copy_of("llama")
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.0.self_attn.k_proj.weight"
    tensors[key] = torch.zeros(32, 32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(key)}' has shape \(32, 32\), expected \(16, 32\)"
    ):
        zoo.load(folder, device=DEVICE)


# ---------------------------------------------------------------------------- config.json


def refuse_weight_reads(monkeypatch):
    """Config errors must come before any tensor is read."""

    def read(*args, **kwargs):
        raise AssertionError("a tensor was read before the config was checked")

    monkeypatch.setattr("convert.hf.iter_tensors", read)


@pytest.mark.parametrize(
    "key, value",
    [
        # transformers 5.x spelling
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
        # transformers 4.x spellings
        ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
        ("rope_scaling", {"type": "dynamic", "factor": 2.0}),
    ],
)
@pytest.mark.parametrize("device", [DEVICE, "meta"])
def test_unsupported_rope_type(copy_of, monkeypatch, key, value, device):
    folder = copy_of("llama")
    edit_config(folder, **{"rope_parameters": None, key: value})
    refuse_weight_reads(monkeypatch)
    rope_type = value.get("rope_type", value.get("type"))
    with pytest.raises(
        ValueError,
        match=rf"{re.escape(str(folder))}: unsupported rope_type '{rope_type}'.*"
        r"supported: default, llama3",
    ):
        zoo.load(folder, device=device)


def test_llama3_rope_scaling_without_its_keys(copy_of, monkeypatch):
    folder = copy_of("llama")
    edit_config(folder, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0})
    refuse_weight_reads(monkeypatch)
    with pytest.raises(ValueError, match="llama3.*low_freq_factor, high_freq_factor"):
        zoo.load(folder, device=DEVICE)


def test_config_without_a_needed_key(copy_of, monkeypatch):
    folder = copy_of("gpt2")
    edit_config(folder, n_embd=None)
    refuse_weight_reads(monkeypatch)
    with pytest.raises(CheckpointError, match=r"config\.json has no 'n_embd'.*'gpt2'"):
        zoo.load(folder, device=DEVICE)


def test_quantized_checkpoint_is_refused(copy_of, monkeypatch):
    folder = copy_of("llama")
    edit_config(folder, quantization_config={"quant_method": "gptq", "bits": 4})
    refuse_weight_reads(monkeypatch)
    with pytest.raises(CheckpointError, match=r"quantized checkpoint.*'gptq'"):
        zoo.load(folder, device=DEVICE)


def test_load_arguments(folders):
    with pytest.raises(ValueError, match=r"dtype: expected float32, float16 or bfloat16.*int8"):
        zoo.load(folders["llama"], device=DEVICE, dtype=torch.int8)
    with pytest.raises(
        ValueError, match="pretrained=False takes a registry name or an HF repo id, not a folder"
    ):
        zoo.load(folders["llama"], pretrained=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(folders, models):
    with pytest.raises(ValueError, match="device cuda: CUDA is not available"):
        zoo.load(folders["llama"], device="cuda")
    for family in GENERATORS:
        with pytest.raises(ValueError, match="cuda_graph=True: .* this one is on cpu"):
            models[family].generate(ids([1, 2]), max_new_tokens=2, cuda_graph=True)


# ---------------------------------------------------------------------------- token ids


@pytest.mark.parametrize(
    "family, bad",
    [("llama", -1), ("gpt2", -1), ("gpt2", 61), ("bert", -3), ("t5", -1), ("t5", 47)],
)
def test_out_of_vocab_ids(models, family, bad):
    with pytest.raises(
        ValueError,
        match=rf"input_ids: token id {bad} is outside the vocabulary \[0, {vocab(family)}\)",
    ):
        forward(family, models[family], ids([1, bad, 2]))


@pytest.mark.parametrize("bad", [-1, 47])
def test_out_of_vocab_decoder_ids(models, bad):
    with pytest.raises(
        ValueError, match=rf"decoder_input_ids: token id {bad} is outside the vocabulary \[0, 47\)"
    ):
        models["t5"](ids([1, 2]), decoder_input_ids=ids([0, bad]))


@pytest.mark.parametrize("family", GENERATORS)
def test_generate_checks_ids(models, family):
    bad = vocab(family)
    with pytest.raises(ValueError, match=rf"token id {bad} is outside the vocabulary"):
        models[family].generate(ids([1, bad]), max_new_tokens=2)


def test_decoder_start_token_outside_the_vocab(models):
    with pytest.raises(ValueError, match=r"decoder_start_token_id: 47 is outside the vocabulary"):
        models["t5"].generate(ids([1, 2]), max_new_tokens=2, decoder_start_token_id=47)


def test_bert_token_types(models):
    model = models["bert"]
    with pytest.raises(ValueError, match=r"token_type_ids: -1 is outside \[0, 2\)"):
        model(ids([1, 2]), token_type_ids=ids([0, -1]))
    with pytest.raises(ValueError, match=r"token_type_ids: shape \(1, 3\) != input_ids \(1, 2\)"):
        model(ids([1, 2]), token_type_ids=ids([0, 0, 0]))
    with pytest.raises(TypeError, match="token_type_ids: expected a torch.Tensor, got list"):
        model(ids([1, 2]), token_type_ids=[[0, 0]])


# ---------------------------------------------------------------------------- context length


@pytest.mark.parametrize("family, context", [("llama", 64), ("gpt2", 40)])
def test_forward_beyond_the_context(models, family, context):
    too_long = torch.ones(1, context + 1, dtype=torch.long, device=DEVICE)
    with pytest.raises(
        ValueError,
        match=rf"input_ids: {context + 1} tokens exceed the model's context of {context}",
    ):
        models[family](too_long)


def test_gpt2_generate_beyond_n_positions(models):
    prompt = torch.ones(2, 30, dtype=torch.long, device=DEVICE)
    with pytest.raises(
        ValueError,
        match=r"prompt length 30 plus max_new_tokens 11 is 41, beyond the model's context of 40",
    ):
        models["gpt2"].generate(prompt, max_new_tokens=11)


# ---------------------------------------------------------------------------- generation arguments


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize(
    "kwargs, culprit",
    [
        (dict(max_new_tokens=-1), "max_new_tokens: expected an int >= 0, got -1"),
        (dict(max_new_tokens=2.5), "max_new_tokens: expected an int >= 0, got 2.5"),
        (dict(do_sample=True, temperature=-0.5), "temperature: expected a number >= 0, got -0.5"),
        (dict(do_sample=True, top_p=0.0), "top_p: expected a number in (0, 1], got 0.0"),
        (dict(top_p=1.5), "top_p: expected a number in (0, 1], got 1.5"),
        (dict(top_k=-1), "top_k: expected an int >= 0 (0 disables it), got -1"),
    ],
)
def test_invalid_generation_arguments(models, family, kwargs, culprit):
    with pytest.raises(ValueError, match=re.escape(culprit)):
        models[family].generate(ids([1, 2]), **{"max_new_tokens": 2, **kwargs})


# ---------------------------------------------------------------------------- empty input


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", [(1, 0), (0, 3)])
def test_empty_input(models, family, shape):
    empty = torch.zeros(shape, dtype=torch.long, device=DEVICE)
    with pytest.raises(
        ValueError, match=rf"input_ids: empty input of shape {re.escape(str(shape))}"
    ):
        forward(family, models[family], empty)


@pytest.mark.parametrize("family", GENERATORS)
def test_generate_empty_input(models, family):
    empty = torch.zeros(1, 0, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match=r"input_ids: empty input of shape \(1, 0\)"):
        models[family].generate(empty, max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids: empty list of prompts"):
        models[family].generate([], max_new_tokens=2)


def test_empty_decoder_input(models):
    with pytest.raises(ValueError, match=r"decoder_input_ids: empty input of shape \(1, 0\)"):
        models["t5"](
            ids([1, 2]), decoder_input_ids=torch.zeros(1, 0, dtype=torch.long, device=DEVICE)
        )


# ---------------------------------------------------------------------------- dtypes and types


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.int16, torch.bool])
def test_input_ids_of_a_wrong_dtype(models, family, dtype):
    with pytest.raises(
        ValueError, match=rf"input_ids: expected int64 or int32 token ids, got {dtype}"
    ):
        forward(family, models[family], ids([1, 0], dtype=dtype))


@pytest.mark.parametrize("family", FAMILIES)
def test_input_ids_not_a_batch_of_tensors(models, family):
    with pytest.raises(ValueError, match=r"input_ids: expected shape \[batch, seq\], got \(3,\)"):
        forward(family, models[family], torch.tensor([1, 2, 3], device=DEVICE))
    with pytest.raises(TypeError, match="input_ids: expected a torch.Tensor, got list"):
        forward(family, models[family], [[1, 2, 3]])


@pytest.mark.parametrize("family", GENERATORS)
def test_generate_with_a_list_of_ids(models, family):
    """A list of token ids is named as such, not taken for text prompts."""
    with pytest.raises(TypeError, match="input_ids: expected a torch.Tensor.*list holding list"):
        models[family].generate([[1, 2, 3]], max_new_tokens=2)


def test_decoder_input_ids_of_a_wrong_dtype(models):
    with pytest.raises(ValueError, match=r"decoder_input_ids: expected int64 or int32.*float32"):
        models["t5"](ids([1, 2]), decoder_input_ids=ids([0.0], dtype=torch.float32))


def test_token_type_ids_of_a_wrong_dtype(models):
    with pytest.raises(ValueError, match=r"token_type_ids: expected int64 or int32.*float32"):
        models["bert"](ids([1, 2]), token_type_ids=ids([0.0, 1.0], dtype=torch.float32))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_float_attention_mask(models, family, dtype):
    """A float mask may be additive (0 / -inf) or hold 0.5, which a cast would silently make a
    pad: refused, naming the dtype."""
    mask = torch.ones(1, 2, dtype=dtype, device=DEVICE)
    with pytest.raises(
        ValueError, match=rf"attention_mask: expected an integer or bool tensor.*{dtype}"
    ):
        forward(family, models[family], ids([1, 2]), attention_mask=mask)


@pytest.mark.parametrize("family", GENERATORS)
def test_generate_float_attention_mask(models, family):
    mask = torch.tensor([[0.5, 1.0]], device=DEVICE)
    with pytest.raises(ValueError, match=r"attention_mask: expected an integer.*float32"):
        models[family].generate(ids([1, 2]), attention_mask=mask, max_new_tokens=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_mask_not_a_tensor(models, family):
    with pytest.raises(TypeError, match="attention_mask: expected a torch.Tensor, got list"):
        forward(family, models[family], ids([1, 2]), attention_mask=[[1, 1]])


def test_bool_attention_mask_is_accepted(models, kernels_allowed):
    """bool and int32 masks are as good as int64 ones (same logits)."""
    model = models["gpt2"]
    prompt = ids([5, 6, 7], [9, 5, 6])
    mask = ids([1, 1, 1], [0, 1, 1])
    expected = model(prompt, attention_mask=mask)
    for other in (mask.bool(), mask.int()):
        assert torch.equal(model(prompt, attention_mask=other), expected)


# ---------------------------------------------------------------------------- devices


@pytest.mark.parametrize("family", FAMILIES)
def test_input_ids_on_another_device(models, family):
    on_meta = torch.zeros(1, 3, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match=rf"input_ids: on meta, but the model is on {DEVICE}"):
        forward(family, models[family], on_meta)


@pytest.mark.parametrize("family", GENERATORS)
def test_generate_input_ids_on_another_device(models, family):
    on_meta = torch.zeros(1, 3, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match=rf"input_ids: on meta, but the model is on {DEVICE}"):
        models[family].generate(on_meta, max_new_tokens=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_mask_on_another_device(models, family):
    mask = torch.ones(1, 2, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match=rf"attention_mask: on meta, input_ids on {DEVICE}"):
        forward(family, models[family], ids([1, 2]), attention_mask=mask)


def test_decoder_input_ids_on_another_device(models):
    with pytest.raises(
        ValueError, match=rf"decoder_input_ids: on meta, but the model is on {DEVICE}"
    ):
        models["t5"](ids([1, 2]), decoder_input_ids=ids([0], device="meta"))


def test_token_type_ids_on_another_device(models):
    with pytest.raises(ValueError, match=rf"token_type_ids: on meta, input_ids on {DEVICE}"):
        models["bert"](ids([1, 2]), token_type_ids=ids([0, 0], device="meta"))


# ---------------------------------------------------------------------------- nothing unsafe


def test_pad_id_outside_the_vocab_with_repetition_penalty(models, kernels_allowed):
    """Finished rows are padded with pad_token_id, which need not be a vocabulary id (-1 here):
    the repetition penalty's bookkeeping must not index with it (on the GPU an out-of-range
    scatter is a device-side assert that poisons the process)."""
    model = models["llama"]
    prompt = ids([3, 4, 5], [6, 7, 8])
    out = model.generate(
        prompt,
        max_new_tokens=3,
        eos_token_id=list(range(vocab("llama"))),  # every row finishes at its first token
        pad_token_id=-1,
        repetition_penalty=1.3,
    )
    assert out.shape == (2, 4)
    assert ((out[:, 3] >= 0) & (out[:, 3] < vocab("llama"))).all()


# ---------------------------------------------------------------------------- config.json values


def refuse_allocation(monkeypatch):
    """Size errors must come before the model's memory is allocated (the meta build is free)."""

    def to_empty(*args, **kwargs):
        raise AssertionError("the model was allocated before config.json was checked")

    monkeypatch.setattr(torch.nn.Module, "to_empty", to_empty)


# family -> its size keys (checked for type and range) as config.json spells them
SIZE_KEYS = {
    "llama": [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
    ],
    "gpt2": ["vocab_size", "n_embd", "n_layer", "n_head", "n_positions", "n_inner"],
    "bert": [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "type_vocab_size",
    ],
    "t5": [
        "vocab_size",
        "d_model",
        "d_kv",
        "d_ff",
        "num_layers",
        "num_decoder_layers",
        "num_heads",
        "relative_attention_num_buckets",
    ],
}
BAD_SIZES = [
    (-32, "expected a value >= 1"),
    (0, "expected a value >= 1"),
    ("32", "expected an integer, got '32'"),
    (True, "expected an integer, got True"),
    (32.5, "expected an integer, got 32.5"),
    ([32], r"expected an integer, got \[32\]"),
    (10**9, "expected a value <= "),
]


@pytest.mark.parametrize(
    "family, key", [(family, key) for family, keys in SIZE_KEYS.items() for key in keys]
)
@pytest.mark.parametrize("value, problem", BAD_SIZES, ids=[repr(v) for v, _ in BAD_SIZES])
def test_bad_size_in_config_is_named(copy_of, monkeypatch, family, key, value, problem):
    folder = copy_of(family)
    edit_config(folder, **{key: value})
    refuse_weight_reads(monkeypatch)
    refuse_allocation(monkeypatch)
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(folder))}: config\.json {key}: {problem}"
    ):
        zoo.load(folder, device=DEVICE)


@pytest.mark.parametrize(
    "family, key, value, problem",
    [
        ("llama", "rms_norm_eps", "tiny", "expected a finite number"),
        ("llama", "rms_norm_eps", -1.0, "expected a value >= 0"),
        ("llama", "initializer_range", -0.5, "expected a value >= 0"),
        ("llama", "tie_word_embeddings", "yes", "expected true or false"),
        ("llama", "attention_bias", 1, "expected true or false"),
        ("llama", "hidden_act", 3, "expected a string"),
        ("llama", "eos_token_id", -2, "expected a token id"),
        ("llama", "eos_token_id", [1, "2"], "expected a token id"),
        ("gpt2", "layer_norm_epsilon", float("nan"), "expected a finite number"),
        ("gpt2", "activation_function", ["gelu"], "expected a string"),
        ("bert", "layer_norm_eps", "1e-12", "expected a finite number"),
        ("bert", "pad_token_id", 1.5, "expected a token id"),
        ("t5", "feed_forward_proj", {"gated": True}, "expected a string"),
        ("t5", "tie_word_embeddings", "false", "expected true or false"),
    ],
)
def test_bad_value_in_config_is_named(copy_of, monkeypatch, family, key, value, problem):
    folder = copy_of(family)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    refuse_weight_reads(monkeypatch)
    refuse_allocation(monkeypatch)
    with pytest.raises(ValueError, match=rf"config\.json {key}: {problem}"):
        zoo.load(folder, device=DEVICE)


@pytest.mark.parametrize(
    "family, changes, message",
    [
        ("llama", dict(num_key_value_heads=3), "num_attention_heads 2 is not a multiple of"),
        ("gpt2", dict(n_head=3), "n_embd 32 is not a multiple of n_head 3"),
        ("bert", dict(num_attention_heads=3), "hidden_size 32 is not a multiple of"),
    ],
)
def test_sizes_that_do_not_divide(copy_of, monkeypatch, family, changes, message):
    folder = copy_of(family)
    edit_config(folder, **changes)
    refuse_weight_reads(monkeypatch)
    refuse_allocation(monkeypatch)
    with pytest.raises(ValueError, match=message):
        zoo.load(folder, device=DEVICE)


@pytest.mark.parametrize("content", ["[1, 2, 3]", '"llama"', "42", "null"])
def test_config_json_that_is_not_an_object(copy_of, content):
    folder = copy_of("llama")
    (folder / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=r"config\.json: expected a JSON object"):
        zoo.load(folder, device=DEVICE)


def test_generation_config_that_is_not_an_object(copy_of):
    folder = copy_of("gpt2")
    (folder / "generation_config.json").write_text("[]")
    with pytest.raises(CheckpointError, match=r"generation_config\.json: expected a JSON object"):
        zoo.load(folder, device=DEVICE)


# ---------------------------------------------------------------------------- config vs tensors


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layers", [3, 40])
def test_more_layers_than_the_checkpoint_holds(copy_of, monkeypatch, family, layers):
    """Found from the headers' names before the model is built: a count and the first few keys,
    not thousands of them."""
    key = {"llama": "num_hidden_layers", "gpt2": "n_layer", "bert": "num_hidden_layers"}
    key = key.get(family, "num_layers")
    folder = copy_of(family)
    edit_config(folder, **{key: layers})
    refuse_weight_reads(monkeypatch)
    refuse_allocation(monkeypatch)
    with pytest.raises(CheckpointError, match=r"missing (\d+) tensor\(s\)") as raised:
        zoo.load(folder, device=DEVICE)
    message = str(raised.value)
    assert "and" in message and "more" in message and len(message) < 600, message
    count = int(re.search(r"missing (\d+) tensor", message).group(1))
    assert count > (layers - 1) * 4


def test_fewer_layers_than_the_checkpoint_holds(copy_of, monkeypatch):
    folder = copy_of("llama-sharded")
    edit_config(folder, num_hidden_layers=None)  # stays 1 in the file: set to 1 below, saved 2
    config = json.loads((folder / "config.json").read_text())
    assert config.get("num_hidden_layers") is None
    edit_config(folder, num_hidden_layers=1)
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    extra = {k.replace("layers.0.", "layers.1."): v for k, v in tensors.items() if "layers.0." in k}
    save_file(extra, folder / "extra.safetensors", metadata={"format": "pt"})
    index = json.loads((folder / SAFETENSORS_INDEX).read_text())
    index["weight_map"].update({key: "extra.safetensors" for key in extra})
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index))
    refuse_weight_reads(monkeypatch)
    refuse_allocation(monkeypatch)
    with pytest.raises(
        CheckpointError,
        match=r"9 unexpected tensor\(s\).*model\.layers\.1\..*\(extra\.safetensors\)",
    ):
        zoo.load(folder, device=DEVICE)


@pytest.mark.parametrize(
    "family, key",
    [
        ("llama", "vocab_size"),
        ("llama", "hidden_size"),
        ("llama", "intermediate_size"),
        ("gpt2", "vocab_size"),
        ("gpt2", "n_positions"),
        ("gpt2", "n_inner"),
        ("bert", "vocab_size"),
        ("bert", "type_vocab_size"),
        ("bert", "max_position_embeddings"),
        ("t5", "vocab_size"),
        ("t5", "d_ff"),
        ("t5", "d_kv"),
    ],
)
@pytest.mark.parametrize("factor", [2, 1000])
def test_size_that_disagrees_with_the_tensors(copy_of, monkeypatch, family, key, factor):
    """Each tensor's header shape is compared with the model built on the meta device: a vocab
    of 50,000 against a checkpoint of 50 fails at once, allocating nothing."""
    folder = copy_of(family)
    config = json.loads((folder / "config.json").read_text())
    edit_config(folder, **{key: (config.get(key) or 4 * config["n_embd"]) * factor})
    refuse_weight_reads(monkeypatch)
    refuse_allocation(monkeypatch)
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor '[\w.]+' has shape \([\d, ]+\), expected "
        r"\([\d, ]+\) \(from config\.json\)$",
    ):
        zoo.load(folder, device=DEVICE)


def test_many_missing_tensors_are_counted_not_listed(copy_of):
    folder = copy_of("llama")
    tensors = load_file(folder / "model.safetensors")
    kept = {k: v for k, v in tensors.items() if "layers" not in k}
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing 9 tensor\(s\).*and 4 more$"):
        zoo.load(folder, device=DEVICE)


def test_many_unexpected_tensors_are_counted_not_listed(copy_of):
    folder = copy_of("llama")
    tensors = load_file(folder / "model.safetensors")
    tensors.update({f"extra.{i}.weight": torch.ones(2) for i in range(1000)})
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1000 unexpected tensor\(s\)") as raised:
        zoo.load(folder, device=DEVICE)
    assert "and 995 more" in str(raised.value) and len(str(raised.value)) < 600


# ---------------------------------------------------------------------------- rope settings

# config.json rope spellings of transformers 4 (rope_theta + rope_scaling) and 5
# (rope_parameters), alone and together, as checkpoints in the wild write them
LLAMA3_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
ROPE_CONFIGS = {
    "4.x default": dict(rope_theta=5e5),
    "4.x llama3": dict(rope_theta=5e5, rope_scaling={"rope_type": "llama3", **LLAMA3_SCALING}),
    "4.x llama3, old 'type' key": dict(rope_scaling={"type": "llama3", **LLAMA3_SCALING}),
    "5.x default": dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
    "5.x llama3": dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3_SCALING}
    ),
    "5.x llama3 without original length": dict(
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 5e5,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        }
    ),
    "both: rope_scaling llama3 wins over rope_parameters default": dict(
        rope_theta=2e5,
        rope_parameters={"rope_type": "default", "rope_theta": 5e5},
        rope_scaling={"rope_type": "llama3", **LLAMA3_SCALING},
    ),
    "both: rope_scaling default wins over rope_parameters llama3": dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3_SCALING},
        rope_scaling={"rope_type": "default"},
    ),
    "both: empty rope_scaling leaves rope_parameters": dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3_SCALING},
        rope_scaling={},
    ),
    "both: null rope_scaling leaves rope_parameters": dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 3e5, **LLAMA3_SCALING},
        rope_scaling=None,
    ),
    "top-level original length wins": dict(
        original_max_position_embeddings=16,
        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3_SCALING},
    ),
}


def write_rope(folder: Path, settings: dict) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key in (
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "original_max_position_embeddings",
    ):
        config.pop(key, None)
    config.update(settings)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("settings", ROPE_CONFIGS.values(), ids=ROPE_CONFIGS.keys())
def test_rope_settings_are_read_as_transformers_reads_them(copy_of, settings):
    """Our inverse frequencies equal those transformers computes from the same config.json."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    folder = copy_of("llama")
    write_rope(folder, settings)
    hf_config = transformers.AutoConfig.from_pretrained(folder)
    rope_type = hf_config.rope_parameters["rope_type"]
    if rope_type == "default":
        head_dim = hf_config.hidden_size // hf_config.num_attention_heads
        theta = hf_config.rope_parameters["rope_theta"]
        expected = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    model = zoo.load(folder, device="meta")
    from zoo.layers import rope_inv_freq

    ours = rope_inv_freq(model.config.head_dim, model.config.rope_theta, model.config.rope_scaling)
    assert torch.equal(ours, expected.float()), (ours, expected)


@pytest.mark.parametrize(
    "settings, key, rope_type",
    [
        (
            dict(
                rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                rope_scaling={"rope_type": "yarn", "factor": 4.0},
            ),
            "rope_scaling",
            "yarn",
        ),
        (
            dict(
                rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0},
                rope_scaling={},
            ),
            "rope_parameters",
            "linear",
        ),
        (
            dict(rope_parameters={"rope_type": "longrope", "factor": 2.0}),
            "rope_parameters",
            "longrope",
        ),
        (dict(rope_scaling={"type": "no-such-rope"}), "rope_scaling", "no-such-rope"),
    ],
)
def test_unsupported_rope_type_names_the_key(copy_of, monkeypatch, settings, key, rope_type):
    folder = copy_of("llama")
    write_rope(folder, settings)
    refuse_weight_reads(monkeypatch)
    with pytest.raises(
        ValueError, match=rf"unsupported rope_type '{rope_type}'.*\(config\.json {key}\)"
    ):
        zoo.load(folder, device=DEVICE)


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4}}),
            r"config\.json rope_parameters: rope parameters per layer type",
        ),
        (dict(rope_parameters={"rope_theta": 1e4, "partial_rotary_factor": 0.5}), "partial_rotary"),
        (dict(partial_rotary_factor=0.25), "partial_rotary_factor 0.25"),
        (dict(rope_scaling="llama3"), r"config\.json rope_scaling: expected an object"),
        (dict(rope_theta="10000"), r"config\.json rope_theta: expected a finite number"),
        (
            dict(rope_scaling={"rope_type": "llama3", **LLAMA3_SCALING, "factor": -8.0}),
            r"config\.json factor: expected a positive number",
        ),
    ],
)
def test_bad_rope_settings(copy_of, monkeypatch, settings, message):
    folder = copy_of("llama")
    write_rope(folder, settings)
    refuse_weight_reads(monkeypatch)
    with pytest.raises(ValueError, match=message):
        zoo.load(folder, device=DEVICE)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(model_type=None), r"config\.json has no model_type"),
        (dict(model_type=["llama"]), r"config\.json model_type \['llama'\]"),
        (dict(architectures="LlamaForCausalLM"), r"config\.json architectures: expected a list"),
        (dict(architectures=[3]), r"config\.json architectures: expected a list of class"),
    ],
)
def test_model_type_and_architectures_are_checked(copy_of, changes, message):
    folder = copy_of("llama")
    edit_config(folder, **changes)
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder))}: {message}"):
        zoo.load(folder, device=DEVICE)


def test_error_classes_are_on_the_package():
    assert zoo.CheckpointError is CheckpointError
    assert issubclass(zoo.HubError, OSError)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        zoo.nothing  # noqa: B018


def test_rope_types_agree_with_the_rotary_kernels():
    """convert.config stays free of the kernels' imports, so it keeps its own copy of the list."""
    from convert.config import SUPPORTED_ROPE_TYPES
    from zoo import layers

    assert SUPPORTED_ROPE_TYPES == layers.SUPPORTED_ROPE_TYPES
