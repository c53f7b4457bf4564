"""Bert parity with HF transformers through save_pretrained -> zoo.load: every checkpoint layout HF
writes (with or without the `bert.` prefix, with or without the pooler), right-padded batches with
token types, the legacy gamma/beta layout of the hub's bert-base-uncased, and examples/embed.py."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, assert_close, spread_weights_
from safetensors.torch import load_file, save_file

import zoo

transformers = pytest.importorskip("transformers")

FP32_RTOL = 1e-4

# Odd sizes: 3 heads of 24, vocab, intermediate and token types not powers of 2, non-default eps.
CONFIG = dict(
    vocab_size=97,
    hidden_size=72,
    num_hidden_layers=2,
    num_attention_heads=3,
    intermediate_size=101,
    max_position_embeddings=80,
    type_vocab_size=3,
    layer_norm_eps=1e-7,
    pad_token_id=0,
)

# case -> (HF class, extra config, keys saved with the `bert.` prefix, pooler saved). The layouts
# are what HF 5.x writes; test_checkpoint_layout checks that they still are.
CASES = {
    "bert-model": ("BertModel", {}, False, True),
    "pretraining": ("BertForPreTraining", {}, True, True),
    "masked-lm": ("BertForMaskedLM", {}, True, False),
    # a sentence-transformers-like export without pooler (and the tanh-GELU mapping)
    "no-pooler": ("BertModel", {"hidden_act": "gelu_new"}, False, False),
}


def build_hf_model(architecture: str, extra: dict, pooler: bool):
    config = transformers.BertConfig(**CONFIG, **extra)
    torch.manual_seed(1)
    cls = getattr(transformers, architecture)
    model = cls(config, add_pooling_layer=pooler) if architecture == "BertModel" else cls(config)
    return spread_weights_(model, lambda name: "LayerNorm.weight" in name).eval()


def encoder(hf_model):
    """The BertModel inside a head model (or the model itself)."""
    return getattr(hf_model, "bert", hf_model)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (HF model on DEVICE, checkpoint folder), built once per case."""
    cache = {}

    def get(case):
        if case not in cache:
            architecture, extra, _, pooler = CASES[case]
            hf_model = build_hf_model(architecture, extra, pooler)
            path = tmp_path_factory.mktemp(case)
            hf_model.save_pretrained(path)
            cache[case] = hf_model.to(DEVICE), path
        return cache[case]

    return get


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, saved):
    hf_model, path = saved(request.param)
    return request.param, hf_model, zoo.load(path, device=DEVICE, dtype=torch.float32)


def padded_batch(lengths, seq, vocab_size=CONFIG["vocab_size"]):
    """Right-padded ids, mask and token types (two segments per row); padding is id 0, type 0."""
    batch = len(lengths)
    ids = torch.randint(1, vocab_size, (batch, seq), device=DEVICE)
    mask = (
        torch.arange(seq, device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]
    ).long()
    types = torch.randint(0, CONFIG["type_vocab_size"], (batch, seq), device=DEVICE)
    return ids * mask, mask, types * mask


def test_checkpoint_layout(saved):
    for case, (_, _, prefixed, pooler) in CASES.items():
        _, path = saved(case)
        keys = load_file(path / "model.safetensors").keys()
        assert any(k.startswith("bert.") for k in keys) == prefixed, case
        assert any("pooler" in k for k in keys) == pooler, case


# 16 rows of 64 tokens, a third of them real: the batch runs packed
PACKED_LENGTHS = [64, 1, 5, 17, 30, 2, 9, 40, 3, 11, 64, 8, 20, 6, 33, 12]


@pytest.mark.parametrize("lengths, seq", [([11, 6, 1], 11), (PACKED_LENGTHS, 64)])
def test_padded_batch_matches_hf(checkpoint, lengths, seq):
    """The real positions and the pooler match HF, in a small batch run padded and in a batch
    of mostly short rows run packed (its real tokens one after another, its padded outputs 0)."""
    case, hf_model, model = checkpoint
    packed = zoo.layers.packed_tokens(len(lengths), seq, sum(lengths)) is not None
    assert packed == (seq == 64)
    ids, mask, types = padded_batch(lengths, seq=seq)
    with torch.no_grad():
        expected = encoder(hf_model)(ids, attention_mask=mask, token_type_ids=types)
    ours = model(ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    assert_close(
        ours.last_hidden_state[real],
        expected.last_hidden_state[real],
        FP32_RTOL,
        f"{case}: last hidden state at the real positions (packed: {packed})",
    )
    if packed:
        assert not ours.last_hidden_state[~real].any()
    if CASES[case][3]:
        assert_close(ours.pooler_output, expected.pooler_output, FP32_RTOL, f"{case}: pooler")
    else:
        assert ours.pooler_output is None and expected.pooler_output is None


def test_packing_decision():
    """Packing pays from PACK_MIN_TOKENS tokens, two rows and enough padding; the packed tokens
    are the real ones rounded up, gathered row after row, and sent back where they came from."""
    packed_tokens = zoo.layers.packed_tokens
    assert packed_tokens(2, 256, 13) is None  # 512 tokens: too few
    assert packed_tokens(1, 1024, 1) is None  # one row
    assert packed_tokens(16, 64, 960) is None  # 960 real of 1024: little padding
    assert packed_tokens(16, 64, 142) == 256  # 142 real + 1 spare, rounded up
    lengths = [3, 0, 2, 1] + [1] * 12
    tokens = packed_tokens(16, 64, sum(lengths))
    packed = zoo.layers.pack_rows(torch.tensor(lengths), tokens, 64, row_length=80)
    assert packed.tokens == 128 and packed.max_length == 128  # the spare row fits it
    source, position, inverse = packed.token_index()
    assert source[:6].tolist() == [0, 1, 2, 160, 161, 240]
    assert position[:6].tolist() == [0, 1, 2, 0, 1, 0]
    real = 3 + 2 + 13
    assert (source[real:] == 0).all() and (position[real:] == 0).all()
    assert inverse.shape == (16 * 80,) and inverse[source[:real]].tolist() == list(range(real))
    assert (inverse.bincount(minlength=128)[real:-1] == 0).all()  # padded: the last token only
    first, lengths, pooled = packed.rows.tolist()
    assert first[:5] == [0, 3, 3, 5, 6] and lengths[:4] == [3, 0, 2, 1] and pooled == first
    assert first[16] == real and lengths[16] == 128 - real  # the spare tokens: a row of their own


@pytest.mark.parametrize("seed", range(3))
def test_packing_of_random_rows(seed):
    """Every real token of random rows (empty ones, full ones) is packed once, in order, with its
    position, and read back at its place; every padded place reads the last spare token."""
    generator = torch.Generator().manual_seed(seed)
    batch, seq, row_length = 24, 48, 64
    lengths = torch.randint(0, seq + 1, (batch,), generator=generator)
    lengths[:3] = torch.tensor([0, seq, 1])
    real = int(lengths.sum())
    tokens = zoo.layers.packed_tokens(batch, seq, real) or -(-(real + 1) // 128) * 128
    source, position, inverse = zoo.layers.pack_rows(lengths, tokens, seq, row_length).token_index()
    place = torch.arange(row_length).expand(batch, -1)
    is_real = (place < lengths[:, None]).reshape(-1)
    expected = (torch.arange(batch)[:, None] * row_length + place).reshape(-1)[is_real]
    assert source[:real].tolist() == expected.tolist()
    assert position[:real].tolist() == place.reshape(-1)[is_real].tolist()
    assert inverse[is_real].tolist() == list(range(real))
    assert (inverse[~is_real] == tokens - 1).all()


def test_defaults_match_hf(checkpoint):
    """No attention mask, no token types: every token real, all of type 0."""
    case, hf_model, model = checkpoint
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 5), device=DEVICE)
    with torch.no_grad():
        expected = encoder(hf_model)(ids)
    ours = model(ids)
    assert_close(ours.last_hidden_state, expected.last_hidden_state, FP32_RTOL, case)


def test_padding_does_not_change_real_positions(saved):
    _, path = saved("bert-model")
    model = zoo.load(path, device=DEVICE, dtype=torch.float32)
    lengths = [9, 4, 1]
    ids, mask, types = padded_batch(lengths, seq=9)
    ids[1, 4:] = 7  # padding with other ids and types must not matter either
    types[1, 4:] = 2
    batched = model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    for row, length in enumerate(lengths):
        alone = model(ids[row : row + 1, :length], token_type_ids=types[row : row + 1, :length])
        assert_close(batched[row, :length], alone.last_hidden_state[0], 1e-5, f"row {row}")


def test_pooler_comes_from_the_checkpoint(saved):
    for case, (_, _, _, pooler) in CASES.items():
        _, path = saved(case)
        model = zoo.load(path, device="meta")
        names = [name for name, _ in model.named_parameters()]
        assert any(name.startswith("pooler.") for name in names) == pooler, case


def test_legacy_layout_loads(saved, tmp_path):
    """The hub's bert-base-uncased: `bert.` prefix, LayerNorm gamma/beta, a saved position_ids
    buffer, the tied MLM decoder weight saved and the NSP head present."""
    _, path = saved("pretraining")
    tensors = load_file(path / "model.safetensors")
    legacy = {}
    for key, tensor in tensors.items():
        if "LayerNorm" in key:
            key = key.replace(".weight", ".gamma").replace(".bias", ".beta")
        legacy[key] = tensor
    legacy["bert.embeddings.position_ids"] = torch.arange(CONFIG["max_position_embeddings"])[None]
    legacy["cls.predictions.decoder.weight"] = tensors[
        "bert.embeddings.word_embeddings.weight"
    ].clone()
    assert "bert.encoder.layer.0.output.LayerNorm.gamma" in legacy
    (tmp_path / "config.json").write_bytes((path / "config.json").read_bytes())
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})
    expected = zoo.load(path, device="cpu").state_dict()
    loaded = zoo.load(tmp_path, device="cpu").state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize(
    "mask, message",
    [
        ([[0, 1, 1], [1, 1, 0]], "right-padded"),
        ([[1, 0, 1], [1, 1, 1]], "right-padded"),
        ([[1, 1, 1], [0, 0, 0]], "no real token"),
        ([[1, 2, 1], [1, 1, 1]], "0 or 1"),
        ([[1, 1], [1, 1]], "shape"),
    ],
)
def test_bad_attention_mask_is_rejected(saved, mask, message):
    _, path = saved("bert-model")
    model = zoo.load(path, device=DEVICE)
    ids = torch.ones(2, 3, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        model(ids, attention_mask=torch.tensor(mask, device=DEVICE))


def test_bad_ids_and_token_types_are_rejected(saved):
    _, path = saved("bert-model")
    model = zoo.load(path, device=DEVICE)
    ids = torch.ones(1, 4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="token id 97 is outside"):
        model(torch.full((1, 4), 97, device=DEVICE))
    with pytest.raises(ValueError, match="token_type_ids: 3 is outside"):
        model(ids, token_type_ids=torch.full((1, 4), 3, device=DEVICE))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.ones(1, 81, dtype=torch.long, device=DEVICE))


@pytest.mark.parametrize(
    "name, count",
    [("bert-base-uncased", 109_482_240), ("bert-large-uncased", None), ("all-minilm-l6-v2", None)],
)
def test_meta_build_has_hf_parameter_count(name, count):
    """pretrained=False builds the real architecture: HF BertModel's parameters, pooler included."""
    entry = zoo.registry.get_entry(name)
    model = zoo.load(name, pretrained=False, device="meta")
    ours = sum(p.numel() for p in model.parameters())
    config = transformers.AutoConfig.for_model(**entry.config)
    with torch.device("meta"):
        hf_model = transformers.BertModel(config)
    assert ours == sum(p.numel() for p in hf_model.parameters())
    if count is not None:
        assert ours == count


def _load_embed_example():
    path = Path(__file__).resolve().parents[1] / "examples" / "embed.py"
    spec = importlib.util.spec_from_file_location("embed_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_embed_example_matches_hf_mean_pooling(saved, tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = "the a cat dog sat on mat runs fast today is good ##s".split()
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    hf_model, path = saved("no-pooler")
    for file in ("config.json", "model.safetensors"):
        (tmp_path / file).write_bytes((path / file).read_bytes())
    tokenizer.save(str(tmp_path / "tokenizer.json"))

    sentences = ["The cat sat on the mat.", "A dog runs fast today", "Cats!"]
    model = zoo.load(tmp_path, device=DEVICE, dtype=torch.float32)
    embed = _load_embed_example()
    ours = embed.embed(model, sentences)

    ids, mask, types = embed.tokenize(model, sentences)
    assert mask[:, 0].all() and not mask.all()  # right padded, different lengths
    with torch.no_grad():
        hidden = hf_model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    weights = mask.unsqueeze(-1).float()
    expected = F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)
    assert_close(ours, expected, FP32_RTOL, "sentence embeddings")
    assert_close((ours * ours).sum(-1), torch.ones(3, device=DEVICE), 1e-6, "unit norms")


@pytest.mark.skipif(
    DEVICE != "cuda", reason="bf16 is only right on the GPU (the interpreter gets it wrong)"
)
@pytest.mark.parametrize("case", ["bert-model", "masked-lm"])
def test_bf16_tracks_fp32_as_closely_as_hf_bf16(saved, case):
    """bf16 against the fp32 HF reference: our max-norm relative error on the real positions' last
    hidden state and on the pooler output is at most 1.5x HF bf16's own error."""
    hf_model, path = saved(case)
    hf_fp32 = encoder(hf_model)
    hf_bf16 = copy.deepcopy(hf_fp32).to(torch.bfloat16)
    ours_bf16 = zoo.load(path, device=DEVICE, dtype=torch.bfloat16)
    ids, mask, types = padded_batch([64, 50, 17, 1], seq=64)
    real = mask.bool()
    with torch.no_grad():
        reference = hf_fp32(ids, attention_mask=mask, token_type_ids=types)
        theirs = hf_bf16(ids, attention_mask=mask, token_type_ids=types)
    ours = ours_bf16(ids, attention_mask=mask, token_type_ids=types)
    pairs = [
        (
            "last hidden state",
            ours.last_hidden_state[real],
            theirs.last_hidden_state[real],
            reference.last_hidden_state[real],
        )
    ]
    if CASES[case][3]:
        pairs.append(("pooler", ours.pooler_output, theirs.pooler_output, reference.pooler_output))
    for what, mine, hf, ref in pairs:
        ref = ref.double()
        ours_err = ((mine.double() - ref).abs().max() / ref.abs().max()).item()
        hf_err = ((hf.double() - ref).abs().max() / ref.abs().max()).item()
        print(f"bf16 {case} {what}: relative error ours {ours_err:.3e}, HF {hf_err:.3e}")
        assert ours_err <= 1.5 * hf_err, f"{what}: ours {ours_err:.3e} vs HF bf16 {hf_err:.3e}"
