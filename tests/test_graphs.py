"""CUDA graphs on plain calls (zoo.graphs): the bucket rule, the padding, and replay == eager.

On the CPU the graphed calls run their padded static buffers eagerly (GraphPool.capture = False):
the real positions must be bitwise those of the unpadded eager call, which is what makes a replay
equal to it on the GPU, where the tests below replay real graphs."""

import pytest
import torch
from helpers import DEVICE

import kernels.matmul
import zoo
from kernels.attention import _bucket as attention_bucket
from kernels.utils import next_pow2
from zoo import graphs
from zoo.generation import left_padding

transformers = pytest.importorskip("transformers")

needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
GPU_DTYPES = [torch.float32, torch.bfloat16]

# Tiny odd-sized models (2 layers, non-power-of-2 widths and vocabularies).
BERT = dict(
    vocab_size=97,
    hidden_size=72,
    num_hidden_layers=2,
    num_attention_heads=3,
    intermediate_size=101,
    max_position_embeddings=80,
    type_vocab_size=3,
)
WIDE = 1601
GPT2 = dict(vocab_size=97, n_positions=128, n_embd=72, n_layer=2, n_head=3, eos_token_id=96)
LLAMA = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=88,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    eos_token_id=100,
)
T5 = dict(
    vocab_size=101,
    d_model=64,
    d_kv=16,
    d_ff=72,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    feed_forward_proj="gated-gelu",
    decoder_start_token_id=0,
    eos_token_id=1,
    pad_token_id=0,
)
BUILD = {
    "bert": lambda: transformers.BertModel(transformers.BertConfig(**BERT)),
    # K = 1601 in the down projection: skinny calls split it (split-K)
    "bert-wide": lambda: transformers.BertModel(
        transformers.BertConfig(**{**BERT, "intermediate_size": WIDE})
    ),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)),
    "t5": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(**T5)),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    paths = {}

    def get(family: str):
        if family not in paths:
            torch.manual_seed(3)
            hf_model = BUILD[family]().eval()
            with torch.no_grad():  # far from HF's init, so every term matters
                for param in hf_model.parameters():
                    param.normal_(0.0, 0.1 if param.dim() > 1 else 0.3).add_(
                        float(param.dim() == 1)
                    )
            paths[family] = tmp_path_factory.mktemp(family)
            hf_model.save_pretrained(paths[family])
        return paths[family]

    return get


def load(saved, family: str, dtype=torch.float32, padded_eagerly: bool = False):
    model = zoo.load(saved(family), device=DEVICE, dtype=dtype)
    if padded_eagerly:
        graphs.graph_pool(model).capture = False
    return model


def right_padded(vocab_size: int, lengths: list[int], seq: int | None = None):
    seq = seq or max(lengths)
    ids = torch.randint(2, vocab_size, (len(lengths), seq), device=DEVICE)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, n:] = 0
    return ids, mask


def left_padded(vocab_size: int, lengths: list[int]):
    seq = max(lengths)
    ids = torch.randint(2, vocab_size, (len(lengths), seq), device=DEVICE)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, seq - n :] = 1
    return ids, mask


# --- the bucket rule (CPU) -------------------------------------------------------------------


def test_padded_length_keeps_every_kernel_bucket():
    for batch in (1, 2, 3, 5, 8):
        for seq in range(1, 300):
            padded = graphs.padded_length(batch, seq)
            assert padded >= seq
            assert next_pow2(batch * padded) == next_pow2(batch * seq), (batch, seq, padded)
            assert attention_bucket(padded) == attention_bucket(seq), (batch, seq, padded)
            longer = padded + 1  # the largest such length
            assert next_pow2(batch * longer) != next_pow2(batch * seq) or attention_bucket(
                longer
            ) != attention_bucket(seq), (batch, seq, padded)


@pytest.mark.parametrize(
    "batch, seq, limit, expected",
    [
        (1, 1, None, 1),
        (1, 5, None, 8),
        (1, 100, None, 128),
        (3, 6, None, 10),  # M bucket 32: 3 * 10 = 30; attention bucket 16
        (3, 100, None, 128),  # attention bucket 128 (M bucket 512 would allow 170)
        (2, 5000, None, 8192),  # past the attention's 4096 cap only the M bucket binds
        (1, 70, 80, 80),  # a position table of 80
        (4, 300, 300, 300),  # never below seq
    ],
)
def test_padded_length_examples(batch, seq, limit, expected):
    assert graphs.padded_length(batch, seq, limit) == expected


def test_cpu_models_run_eagerly(saved):
    bert = zoo.load(saved("bert"), device="cpu")
    assert not graphs.use_graphs(bert, None) and not graphs.use_graphs(bert, True)
    ids = torch.randint(0, 97, (1, 5))
    with pytest.raises(ValueError, match="cuda_graph=True: .* this one is on cpu"):
        bert(ids, cuda_graph=True)
    gpt2 = zoo.load(saved("gpt2"), device="cpu")
    with pytest.raises(ValueError, match="cuda_graph=True: .* this one is on cpu"):
        gpt2(ids, cuda_graph=True)


# --- the padded calls, run eagerly on their static buffers (CPU and GPU) ----------------------


@pytest.mark.parametrize(
    "lengths, seq", [([5], None), ([7, 3, 1], None), ([9, 9], 12), ([18], None)]
)
def test_bert_padded_call_equals_unpadded(saved, lengths, seq):
    model = load(saved, "bert", padded_eagerly=True)
    ids, mask = right_padded(97, lengths, seq)
    types = torch.randint(0, 3, ids.shape, device=DEVICE)
    batch, seq = ids.shape
    expected = model(ids, attention_mask=mask, token_type_ids=types, cuda_graph=False)
    hidden, pooled = graphs.bert_forward(model, ids, mask, types)
    assert torch.equal(hidden, expected.last_hidden_state)
    assert torch.equal(pooled, expected.pooler_output)

    pool = graphs.graph_pool(model)
    length = graphs.padded_length(batch, seq, BERT["max_position_embeddings"])
    assert length > seq  # the call really was padded
    assert pool.keys() == [("bert", batch, length)]
    static = pool.static_inputs(("bert", batch, length))
    assert static["input_ids"].shape == static["token_type_ids"].shape == (batch, length)
    assert torch.equal(static["input_ids"][:, :seq], ids)
    # the pads (and the mask's zeros) stay unseen: the mask's padded columns are zeros
    assert torch.equal(static["attention_mask"][:, :seq], mask)
    assert not static["attention_mask"][:, seq:].any()


def test_bert_packed_call_equals_eager(saved):
    """A batch of mostly short rows runs packed in its graph too, bitwise the eager call, with a
    graph per packed size; a second call of other lengths of that size reuses it."""
    model = load(saved, "bert", padded_eagerly=True)
    lengths = [60, 1, 5, 17, 30, 2, 9, 40, 3, 11, 57, 8, 20, 6, 33, 12]  # 16 x 64: 314 real
    for _ in range(2):
        ids, mask = right_padded(97, lengths, 64)
        types = torch.randint(0, 3, ids.shape, device=DEVICE)
        expected = model(ids, attention_mask=mask, token_type_ids=types, cuda_graph=False)
        hidden, pooled = graphs.bert_forward(model, ids, mask, types)
        assert torch.equal(hidden, expected.last_hidden_state)
        assert torch.equal(pooled, expected.pooler_output)
        assert not hidden[mask == 0].any()
        lengths = lengths[::-1]
    assert graphs.graph_pool(model).keys() == [("bert", 16, 64, 384)]


def test_bert_padded_call_without_mask(saved):
    model = load(saved, "bert", padded_eagerly=True)
    ids = torch.randint(0, 97, (2, 11), device=DEVICE)
    expected = model(ids, cuda_graph=False)
    hidden, pooled = graphs.bert_forward(model, ids, None, torch.zeros_like(ids))
    assert torch.equal(hidden, expected.last_hidden_state)
    assert torch.equal(pooled, expected.pooler_output)
    static = graphs.graph_pool(model).static_inputs(("bert", 2, 16))
    assert static["attention_mask"].sum(-1).tolist() == [11, 11]  # full rows end at the real length


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("lengths", [[5], [9, 4, 9]])
def test_decoder_padded_call_equals_unpadded(saved, family, lengths):
    model = load(saved, family, padded_eagerly=True)
    ids, mask = left_padded(model.config.vocab_size, lengths)
    expected = model(ids, attention_mask=mask, cuda_graph=False)
    positions, kv_start = left_padding(mask, ids)
    with torch.inference_mode():
        logits = graphs.decoder_forward(model, ids, positions, kv_start)
    assert torch.equal(logits, expected)
    batch, seq = ids.shape
    (key,) = graphs.graph_pool(model).keys()
    assert key == ("decoder", batch, graphs.padded_length(batch, seq))
    assert key[2] > seq
    static = graphs.graph_pool(model).static_inputs(key)
    assert static["cache"].max_length == key[2]  # the cache holds the padded call
    assert torch.equal(static["kv_start"], kv_start)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prefill_padded_equals_unpadded_then_decodes_the_same(saved, family):
    model = load(saved, family, padded_eagerly=True)
    ids, mask = left_padded(model.config.vocab_size, [6, 3])
    positions, kv_start = left_padding(mask, ids)
    with torch.inference_mode():
        eager_cache, padded_cache = model.new_cache(2, 32), model.new_cache(2, 32)
        expected = graphs.prefill(model, eager_cache, ids, positions, kv_start, cuda_graph=False)
        logits = graphs.bucketed_prefill(model, padded_cache, ids, positions, kv_start)
        assert torch.equal(logits, expected)
        assert padded_cache.lengths.tolist() == [6, 6]  # the pads' slots are free again
        assert torch.equal(padded_cache.kv_start, kv_start)
        real = slice(0, 6)
        padded_k, padded_v = torch.stack(padded_cache.k), torch.stack(padded_cache.v)
        eager_k, eager_v = torch.stack(eager_cache.k), torch.stack(eager_cache.v)
        assert torch.equal(padded_k[..., real, :], eager_k[..., real, :])
        assert torch.equal(padded_v[..., real, :], eager_v[..., real, :])
        # the padded prompt really was longer: its pads wrote the slot after the prompt
        assert padded_k[..., 6, :].abs().sum() > 0
        step = torch.randint(2, model.config.vocab_size, (2, 1), device=DEVICE)
        next_positions = positions[:, -1:] + 1
        after_eager = model.forward_cached(step, next_positions, eager_cache, last_only=True)
        after_padded = model.forward_cached(step, next_positions, padded_cache, last_only=True)
        assert torch.equal(after_padded, after_eager)


@pytest.mark.parametrize("enc_lengths, dec_seq", [([5], 3), ([7, 2, 4], 6)])
def test_t5_padded_call_equals_unpadded(saved, enc_lengths, dec_seq):
    model = load(saved, "t5", padded_eagerly=True)
    ids, mask = right_padded(101, enc_lengths)
    dec = torch.randint(0, 101, (len(enc_lengths), dec_seq), device=DEVICE)
    expected = model(ids, decoder_input_ids=dec, attention_mask=mask, cuda_graph=False)
    lengths = mask.sum(-1).to(torch.int32)
    with torch.inference_mode():
        logits = graphs.t5_forward(model, ids, lengths, dec)
    assert torch.equal(logits, expected)
    batch, seq = ids.shape
    key = ("t5", batch, graphs.padded_length(batch, seq), graphs.padded_length(batch, dec_seq))
    assert graphs.graph_pool(model).keys() == [key]


def test_t5_padded_encoder_pass_equals_unpadded(saved):
    model = load(saved, "t5", padded_eagerly=True)
    ids, mask = right_padded(101, [7, 3])
    lengths = mask.sum(-1).to(torch.int32)
    with torch.inference_mode():
        eager_cache = model.new_cache(2, 4, encoder_length=16)
        padded_cache = model.new_cache(2, 4, encoder_length=16)
        model.encode_into(eager_cache, ids, lengths, cuda_graph=False)
        graphs.t5_encode_into(model, padded_cache, ids, lengths)
    assert torch.equal(padded_cache.encoder_lengths, lengths)
    assert torch.equal(padded_cache.cross_kv[:, :, :7], eager_cache.cross_kv[:, :, :7])
    (key,) = graphs.graph_pool(model).keys()
    assert key[:3] == ("t5-encode", 2, 8)


def test_pool_is_dropped_when_the_weights_move(saved):
    model = load(saved, "bert", padded_eagerly=True)
    ids = torch.randint(0, 97, (1, 5), device=DEVICE)
    graphs.bert_forward(model, ids, None, torch.zeros_like(ids))
    assert len(graphs.graph_pool(model).keys()) == 1
    model.to(torch.float16)  # the graphs would read the old weights
    assert graphs.graph_pool(model).keys() == []
    graphs.bert_forward(model, ids, None, torch.zeros_like(ids))
    assert len(graphs.graph_pool(model).keys()) == 1
    # a new tensor in the first parameter's place (load_state_dict(..., assign=True) does this)
    first_name, first = next(model.named_parameters())
    owner, _, name = first_name.rpartition(".")
    setattr(model.get_submodule(owner), name, torch.nn.Parameter(first.detach().clone()))
    assert graphs.graph_pool(model).keys() == []


# --- real graphs (GPU) -------------------------------------------------------------------------


def _pool(model):
    return graphs.graph_pool(model)


@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_bert_replay_equals_eager(saved, dtype):
    model = load(saved, "bert", dtype)
    cases = [[5], [7], [8], [3, 8, 1], [20], [31, 17], [70], [80], [40, 2, 33, 9]]
    for lengths in cases:
        for with_mask in (True, False):
            ids, mask = right_padded(97, lengths)
            types = torch.randint(0, 3, ids.shape, device=DEVICE)
            mask = mask if with_mask else None
            expected = model(ids, attention_mask=mask, token_type_ids=types, cuda_graph=False)
            for _ in range(2):  # captured on the first call, replayed on the second
                out = model(ids, attention_mask=mask, token_type_ids=types)
                what = f"bert {lengths} mask={with_mask}"
                assert torch.equal(out.last_hidden_state, expected.last_hidden_state), what
                assert torch.equal(out.pooler_output, expected.pooler_output), what
    assert len(_pool(model)) > 3  # several buckets, each replayed


@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_replay_equals_eager_through_split_k_and_tma(saved, dtype):
    """Skinny calls split the down projection's K; bf16 calls over 256 rows take the TMA kernel
    on Hopper. Both choices follow the M bucket, so padding within it keeps them."""
    model = load(saved, "bert-wide", dtype)
    device = torch.device(DEVICE)
    assert kernels.matmul._pick_split_k(16, BERT["hidden_size"], WIDE, device) > 1
    for lengths in ([9], [5, 3], [33, 20, 7], [70, 70, 50, 65], [80, 61, 80, 3, 44]):
        ids, mask = right_padded(97, lengths)
        expected = model(ids, attention_mask=mask, cuda_graph=False)
        for _ in range(2):
            out = model(ids, attention_mask=mask)
            assert torch.equal(out.last_hidden_state, expected.last_hidden_state), lengths
            assert torch.equal(out.pooler_output, expected.pooler_output), lengths


@needs_cuda
def test_bert_outputs_do_not_alias(saved):
    model = load(saved, "bert")
    first_ids = torch.randint(0, 97, (2, 7), device=DEVICE)
    first = model(first_ids)
    kept = first.last_hidden_state.clone()
    second = model(torch.randint(0, 97, (2, 6), device=DEVICE))  # same bucket: same graph
    assert len(_pool(model)) == 1
    assert torch.equal(first.last_hidden_state, kept)
    assert first.last_hidden_state.data_ptr() != second.last_hidden_state.data_ptr()
    assert first.pooler_output.data_ptr() != second.pooler_output.data_ptr()
    hidden = first.last_hidden_state.untyped_storage().data_ptr()
    hidden_out, pooled_out, _checks = _pool(model)._entries.popitem()[1].outputs
    static = [t.untyped_storage().data_ptr() for t in (hidden_out, pooled_out)]
    assert hidden not in static


@needs_cuda
def test_pool_evicts_the_least_recently_used(saved):
    model = load(saved, "bert")
    pool = _pool(model)
    pool.max_graphs = 2
    calls = {length: torch.randint(0, 97, (1, length), device=DEVICE) for length in (5, 12, 30)}
    expected = {n: model(ids, cuda_graph=False).last_hidden_state for n, ids in calls.items()}
    model(calls[5])
    model(calls[12])
    model(calls[5])  # 5 is now the most recently used
    model(calls[30])
    assert pool.keys() == [("bert", 1, 8), ("bert", 1, 32)]  # 12's graph went
    assert len(pool) == 2
    for n, ids in calls.items():
        assert torch.equal(model(ids).last_hidden_state, expected[n])
    assert len(pool) == 2


@needs_cuda
def test_memory_bound_drops_graphs_but_not_results(saved):
    model = load(saved, "bert")
    pool = _pool(model)
    ids = torch.randint(0, 97, (2, 9), device=DEVICE)
    model(ids)
    charged = pool.nbytes
    assert charged > 0
    pool.clear()
    pool.max_bytes = 1  # no graph fits: the bucket runs eagerly on its static buffers
    expected = model(ids, cuda_graph=False).last_hidden_state
    assert torch.equal(model(ids).last_hidden_state, expected)
    assert len(pool) == 0


@needs_cuda
def test_opt_out_per_call_and_per_model(saved):
    model = load(saved, "bert")
    ids = torch.randint(0, 97, (1, 9), device=DEVICE)
    model(ids, cuda_graph=False)
    assert len(_pool(model)) == 0
    model.cuda_graph = False
    model(ids)
    assert len(_pool(model)) == 0
    model(ids, cuda_graph=True)  # the call's word wins
    assert len(_pool(model)) == 1


@needs_cuda
def test_inputs_are_checked_around_a_replay(saved):
    """Decoders check values before their replay; Bert inside its graph, raising after it."""
    model = load(saved, "bert")
    ids = torch.randint(0, 97, (2, 9), device=DEVICE)
    expected = model(ids).last_hidden_state  # the bucket's graph exists
    bad = ids.clone()
    bad[1, 3] = 97
    with pytest.raises(ValueError, match="input_ids: token id 97 is outside the vocabulary"):
        model(bad)
    mask = torch.ones_like(ids)
    mask[0, 2] = 0  # a hole: not right-padded
    with pytest.raises(ValueError, match="attention_mask: Bert batches must be right-padded"):
        model(ids, attention_mask=mask)
    types = torch.zeros_like(ids)
    types[0, 4] = -1
    with pytest.raises(ValueError, match=r"token_type_ids: -1 is outside \[0, 3\)"):
        model(ids, token_type_ids=types)
    assert torch.equal(model(ids).last_hidden_state, expected)  # the graph still serves
    gpt2 = load(saved, "gpt2")
    gpt2(ids)
    with pytest.raises(ValueError, match="input_ids: token id 97 is outside the vocabulary"):
        gpt2(bad)


@needs_cuda
def test_no_capture_inside_a_user_capture(saved):
    model = load(saved, "bert")
    ids = torch.randint(0, 97, (1, 9), device=DEVICE)
    expected = model(ids, cuda_graph=False).last_hidden_state.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = model.encode(ids, torch.zeros_like(ids), None)  # no host checks in a capture
        assert not graphs.use_graphs(model, None)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.last_hidden_state, expected)
    assert len(_pool(model)) == 0


@needs_cuda
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_decoder_replay_equals_eager(saved, family, dtype):
    model = load(saved, family, dtype)
    vocab = model.config.vocab_size
    # the last two run over 256 rows: with bf16 on Hopper, the matmuls' TMA kernel
    for lengths in ([5], [7, 7], [8, 3], [20, 17, 1], [33], [60, 41], [60, 60, 12, 59, 33]):
        ids, mask = left_padded(vocab, lengths)
        expected = model(ids, attention_mask=mask, cuda_graph=False)
        for _ in range(2):
            assert torch.equal(model(ids, attention_mask=mask), expected), f"{family} {lengths}"
    assert len(_pool(model)) > 3


@needs_cuda
@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_greedy_generation_same_with_graphs_on_and_off(saved, family, dtype):
    model = load(saved, family, dtype)
    vocab = model.config.vocab_size
    pad = right_padded if family == "t5" else left_padded
    for lengths in ([9], [12, 5, 12], [30, 3]):
        ids, mask = pad(vocab, lengths)
        off = model.generate(ids, attention_mask=mask, max_new_tokens=12, cuda_graph=False)
        for _ in range(2):
            on = model.generate(ids, attention_mask=mask, max_new_tokens=12)
            assert torch.equal(on, off), f"{family} {lengths}"
    # the prefill (or T5's encoder pass) ran from the pool
    assert any(key[0] in ("prefill", "t5-encode") for key in _pool(model).keys())


@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_t5_replay_equals_eager(saved, dtype):
    """Bitwise, over several inputs per bucket: a kernel that computes a real position in another
    order when the call is padded (the attention's bias path, once) changes the last bits of a
    few percent of bf16 calls only."""
    model = load(saved, "t5", dtype)
    cases = [([5], 1), ([5], 3), ([7, 2, 4], 6), ([20, 11], 9), ([33], 17), ([70, 40, 66, 20], 9)]
    for enc_lengths, dec_seq in cases:
        for attempt in range(8):
            ids, mask = right_padded(101, enc_lengths)
            dec = torch.randint(0, 101, (len(enc_lengths), dec_seq), device=DEVICE)
            expected = model(ids, decoder_input_ids=dec, attention_mask=mask, cuda_graph=False)
            for _ in range(2):
                logits = model(ids, decoder_input_ids=dec, attention_mask=mask)
                assert torch.equal(logits, expected), f"t5 {enc_lengths} {dec_seq} input {attempt}"


def test_bert_graphed_call_checks_values_inside_the_bucket(saved):
    """A graphed Bert call checks the values inside its graph (no sync before the work) and
    raises the eager call's error after it; a shorter call after a longer one in the same bucket
    does not see the longer call's mask."""
    model = load(saved, "bert", padded_eagerly=True)
    ids, mask = right_padded(97, [7, 4])
    types = torch.zeros_like(ids)
    graphs.bert_forward(model, ids, mask, types)
    bad_cases = [
        (ids.masked_fill(ids == ids[0, 0], 97), mask, types, "input_ids: token id 97 is outside"),
        (ids, mask.flip(-1), types, "attention_mask: Bert batches must be right-padded"),
        (ids, mask * 2, types, "attention_mask: values must be 0 or 1"),
        (ids, mask, types + 3, r"token_type_ids: 3 is outside \[0, 3\)"),
        (ids, torch.zeros_like(mask), types, "attention_mask: a row has no real token"),
    ]
    for bad_ids, bad_mask, bad_types, match in bad_cases:
        with pytest.raises(ValueError, match=match):
            graphs.bert_forward(model, bad_ids, bad_mask, bad_types)
        with pytest.raises(ValueError, match=match):  # the same error as the eager call
            model(bad_ids, attention_mask=bad_mask, token_type_ids=bad_types, cuda_graph=False)
    shorter, shorter_mask = right_padded(97, [5, 3])
    expected = model(shorter, attention_mask=shorter_mask, cuda_graph=False)
    hidden, pooled = graphs.bert_forward(model, shorter, None, torch.zeros_like(shorter))
    full = model(shorter, cuda_graph=False)
    assert torch.equal(hidden, full.last_hidden_state) and torch.equal(pooled, full.pooler_output)
    hidden, _ = graphs.bert_forward(model, shorter, shorter_mask, torch.zeros_like(shorter))
    assert torch.equal(hidden, expected.last_hidden_state)
    ones = torch.ones_like(shorter)
    hidden, _ = graphs.bert_forward(model, shorter, None, ones)
    assert torch.equal(
        hidden, model(shorter, token_type_ids=ones, cuda_graph=False).last_hidden_state
    )
    hidden, _ = graphs.bert_forward(model, shorter, None, None)  # the type ids are 0 again
    assert torch.equal(hidden, full.last_hidden_state)
    hidden, _ = graphs.bert_forward(model, shorter, None, None)  # and the buffers left as they are
    assert torch.equal(hidden, full.last_hidden_state)


def test_calls_from_two_threads_share_a_bucket_one_after_the_other(saved):
    """Calls of one bucket share its static buffers: the pool's lock keeps each call's copy-in,
    run and copy-out together, so threads get their own results."""
    import threading

    model = load(saved, "bert", padded_eagerly=True)
    inputs = [right_padded(97, [6, 4]), right_padded(97, [7, 2])]
    expected = [model(ids, attention_mask=mask, cuda_graph=False) for ids, mask in inputs]
    results, errors = {}, []

    def work(index: int) -> None:
        try:
            ids, mask = inputs[index]
            for _ in range(3):
                results[index] = graphs.bert_forward(model, ids, mask, None)
        except Exception as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for index, want in enumerate(expected):
        assert torch.equal(results[index][0], want.last_hidden_state)
