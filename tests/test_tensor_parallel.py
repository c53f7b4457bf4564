"""Tensor parallelism: zoo.load(path, tp=2) in two processes (gloo on the CPU, NCCL on two GPUs)
against the same checkpoint at tp=1: logits of a left-padded batch and greedy tokens; sampled
tokens the same on both ranks; checkpoints whose sizes do not split refused, naming the size.

The two ranks run in one spawn (tp_worker.py) over every case at once: on two GPUs when there
are, else on the CPU; bf16 in a second spawn on the GPUs."""

import json

import pytest
import torch
import torch.multiprocessing as mp
from helpers import assert_close, left_padded_batch, spread_weights_
from tp_worker import free_port, run

import zoo
from convert.shard import Shard

transformers = pytest.importorskip("transformers")

# Under pytest-xdist (--dist loadgroup) one worker runs this module: its spawn of two ranks, a
# module fixture, then happens once instead of on every worker that draws one of its tests.
pytestmark = pytest.mark.xdist_group("tensor_parallel")

WORLD = 2
NEW_TOKENS = 4
FP32_RTOL = 1e-4

_COMMON = dict(
    num_hidden_layers=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0
)
CASES = {
    # GQA 4:2 split to 2:1 per rank, llama3 rope, untied head of an odd vocabulary (the last
    # rank's part is shorter), a sharded checkpoint (a rank's parts come from several files)
    "llama3": (
        "LlamaForCausalLM",
        dict(
            _COMMON,
            vocab_size=101,
            hidden_size=64,
            intermediate_size=72,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            tie_word_embeddings=False,
        ),
    ),
    # Granite 3's four multipliers (residual scaling of each rank's part), with one KV head
    # (fewer than ranks: replicated) and attention and MLP biases (the row-split projections
    # add theirs once), tied head
    "granite": (
        "GraniteForCausalLM",
        dict(
            _COMMON,
            vocab_size=97,
            hidden_size=48,
            intermediate_size=80,
            num_attention_heads=4,
            num_key_value_heads=1,
            attention_bias=True,
            mlp_bias=True,
            embedding_multiplier=6.0,
            attention_multiplier=0.11,
            residual_multiplier=0.35,
            logits_scaling=2.5,
            tie_word_embeddings=True,
        ),
    ),
    # Qwen2: q/k/v biases split with their heads, a sliding window on layer 1, tied head
    "qwen2": (
        "Qwen2ForCausalLM",
        dict(
            _COMMON,
            vocab_size=98,
            hidden_size=64,
            intermediate_size=72,
            num_attention_heads=4,
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=6,
            max_window_layers=1,
            tie_word_embeddings=True,
        ),
    ),
    # GPT-2: c_attn's q, k and v columns of a rank's heads, Conv1D transposes, biases of the
    # row-split projections added once, tied head of an odd vocabulary
    "gpt2": (
        "GPT2LMHeadModel",
        dict(
            vocab_size=99,
            n_positions=64,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_inner=96,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
}
# checkpoints whose sizes do not split over 2 ranks, and the error that must name them
ERROR_CASES = {
    "odd-heads": (
        "LlamaForCausalLM",
        dict(
            _COMMON,
            vocab_size=97,
            hidden_size=48,
            intermediate_size=80,
            num_attention_heads=3,
            num_key_value_heads=1,
        ),
        "num_attention_heads 3 is not divisible by 2",
    ),
    "odd-kv-heads": (
        "LlamaForCausalLM",
        dict(
            _COMMON,
            vocab_size=97,
            hidden_size=96,
            intermediate_size=80,
            num_attention_heads=6,
            num_key_value_heads=3,
        ),
        "num_key_value_heads 3 is not divisible by 2",
    ),
    "odd-intermediate": (
        "LlamaForCausalLM",
        dict(
            _COMMON,
            vocab_size=97,
            hidden_size=64,
            intermediate_size=71,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        "intermediate_size 71 is not divisible by 2",
    ),
}


def save_checkpoint(path, architecture: str, config_kwargs: dict, sharded: bool = False):
    config_class = {"GPT2LMHeadModel": "GPT2Config"}.get(
        architecture, architecture.replace("ForCausalLM", "Config")
    )
    config = getattr(transformers, config_class)(**config_kwargs)
    torch.manual_seed(1)
    model = getattr(transformers, architecture)(config).eval()
    # norm weights around 1: Llama's *norm.weight, GPT-2's ln_*.weight
    spread_weights_(
        model, lambda name: "norm.weight" in name or ".ln_" in name and "weight" in name
    )
    model.save_pretrained(path, max_shard_size="20KB" if sharded else "1GB")
    return path


def cli_argv(folder, device: str) -> list[str]:
    """A chat reply streamed by the zoo command (the last case of a spawn: the command ends
    the process group zoo.load started)."""
    argv = ["generate", str(folder), "--chat", "--prompt", "hi", "--max-new-tokens", "4"]
    return argv + ["--dtype", "float32", "--device", device]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from test_text import build_checkpoint

    paths = {"cli": tmp_path_factory.mktemp("cli")}
    build_checkpoint(paths["cli"])  # a scripted tiny Llama with a tokenizer and chat template
    for name, (architecture, kwargs) in CASES.items():
        path = tmp_path_factory.mktemp(name)
        paths[name] = save_checkpoint(path, architecture, kwargs, sharded=name == "llama3")
    for name, (architecture, kwargs, _) in ERROR_CASES.items():
        paths[name] = save_checkpoint(tmp_path_factory.mktemp(name), architecture, kwargs)
    return paths


def inputs(name: str) -> dict:
    """The case's calls: a batch of 2 x 9 ids, row 0 left-padded by 3."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(sum(map(ord, name)))
    ids, mask = left_padded_batch(CASES[name][1]["vocab_size"], 9, pads=3)
    torch.random.set_rng_state(generator_state)
    return {"ids": ids.cpu(), "mask": mask.cpu(), "max_new_tokens": NEW_TOKENS}


def spawn_ranks(checkpoints, out_dir, device: str, dtype: str = "float32") -> dict:
    """Run every case on WORLD spawned ranks; {(case, rank): result}."""
    cases = [dict(name=n, path=str(checkpoints[n]), dtype=dtype, **inputs(n)) for n in CASES]
    cases += [dict(name=n, path=str(checkpoints[n]), dtype=dtype) for n in ERROR_CASES]
    cases.append(dict(name="cli", argv=cli_argv(checkpoints["cli"], device)))
    mp.spawn(run, args=(WORLD, free_port(), cases, str(out_dir), device), nprocs=WORLD)
    return {
        (case["name"], rank): torch.load(out_dir / f"{case['name']}.{rank}.pt")
        for case in cases
        for rank in range(WORLD)
    }


# Where the two ranks run: two GPUs (NCCL), else the CPU (gloo) of a machine without a GPU;
# with one GPU, nowhere (NCCL takes one GPU per rank, and this process's kernels are compiled for
# the GPU, so it cannot compute CPU references).
if torch.cuda.device_count() >= 2:
    RANKS_DEVICE = "cuda"
elif not torch.cuda.is_available():
    RANKS_DEVICE = "cpu"
else:
    RANKS_DEVICE = None
two_gpus = pytest.mark.skipif(RANKS_DEVICE != "cuda", reason="needs 2 CUDA devices")


@pytest.fixture(scope="module")
def ranks(checkpoints, tmp_path_factory):
    """Every case's fp32 results on the two ranks."""
    if RANKS_DEVICE is None:
        pytest.skip("one GPU: two ranks need two GPUs, or a machine without one (gloo)")
    return spawn_ranks(checkpoints, tmp_path_factory.mktemp("ranks"), RANKS_DEVICE)


def reference(path, name: str, device: str = RANKS_DEVICE, dtype=torch.float32) -> dict:
    """The same calls at tp=1."""
    model = zoo.load(path, device=device, dtype=dtype)
    case = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs(name).items()}
    return {
        "logits": model(case["ids"], attention_mask=case["mask"], cuda_graph=False).cpu(),
        "greedy": model.generate(
            case["ids"], attention_mask=case["mask"], max_new_tokens=NEW_TOKENS, eos_token_id=[]
        ).cpu(),
    }


def rank_results(ranks: dict, name: str) -> list[dict]:
    results = [ranks[(name, rank)] for rank in range(WORLD)]
    for result in results:
        assert "crash" not in result, result["crash"]
        assert "error" not in result, result["error"]
    return results


def real_positions(logits: torch.Tensor) -> torch.Tensor:
    """The logits [B, T, V] of the real tokens (row 0's 3 left pads left out): [n, V]."""
    real = torch.ones(logits.shape[:2], dtype=torch.bool)
    real[0, :3] = False
    return logits[real]


def check_against_tp1(results: list[dict], expected: dict, rtol: float) -> None:
    for rank, got in enumerate(results):
        assert_close(
            real_positions(got["logits"]),
            real_positions(expected["logits"]),
            rtol,
            f"rank {rank} logits",
        )
        assert torch.equal(got["greedy"], expected["greedy"]), (
            f"rank {rank} greedy:\n{got['greedy']}\ntp=1:\n{expected['greedy']}"
        )


@pytest.mark.parametrize("name", list(CASES))
def test_tp2_matches_tp1(name, checkpoints, ranks):
    results = rank_results(ranks, name)
    check_against_tp1(results, reference(checkpoints[name], name), FP32_RTOL)


@pytest.mark.parametrize("name", list(CASES))
def test_every_rank_has_the_same_results(name, ranks):
    """Bitwise: each vocabulary part is computed once and gathered; sampling without a seed
    draws rank 0's on every rank."""
    first, *others = rank_results(ranks, name)
    for rank, other in enumerate(others, start=1):
        assert_same_results(first, other, rank)


def assert_same_results(first: dict, other: dict, rank: int) -> None:
    assert first.keys() == other.keys()
    for key, value in first.items():
        same = torch.equal(value, other[key]) if torch.is_tensor(value) else value == other[key]
        assert same, f"rank {rank} {key} differs from rank 0's"


def test_cli_prints_on_the_first_rank_only(checkpoints, ranks, capsys):
    """`torchrun --nproc-per-node 2 -m zoo.cli generate ... --chat`: the first rank prints the
    reply tp=1 prints, the other rank nothing."""
    from zoo.cli import main

    assert main(cli_argv(checkpoints["cli"], RANKS_DEVICE)) == 0
    expected = capsys.readouterr()
    first, other = rank_results(ranks, "cli")
    assert first["status"] == other["status"] == 0, first["stderr"] + other["stderr"]
    assert first["stdout"] == expected.out and expected.out.strip()
    assert other["stdout"] == other["stderr"] == ""


def test_cli_tp_must_match_the_launch(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    from zoo.cli import main

    status = main(["generate", "x", "--prompt", "hi", "--tp", "2"])
    assert status == 2
    assert "--tp 2: launch 2 processes with torchrun --nproc-per-node 2" in capsys.readouterr().err


def test_symmetric_memory_is_on_where_the_gpus_have_it(ranks):
    """zoo.load turns the one-shot all-reduce on for GPUs (the H200s of the two-GPU machine
    have it); on the CPU the switch reports False and every all-reduce stays with gloo."""
    on_gpus = RANKS_DEVICE == "cuda"
    for result in rank_results(ranks, "llama3"):
        assert result["symmetric_default"] is on_gpus
        assert result["symmetric_on"] is on_gpus


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_sizes_that_do_not_split_are_refused(name, checkpoints, ranks):
    match = ERROR_CASES[name][2]
    for rank in range(WORLD):
        result = ranks[(name, rank)]
        assert "crash" not in result, result["crash"]
        assert match in result.get("error", ""), result
        assert str(checkpoints[name]) in result["error"]


def test_shard_arithmetic():
    # key/value heads: split when there are enough, else one each, replicated
    assert Shard(1, 2).heads(8, 2) == ((4, 8), (1, 2))
    assert [Shard(r, 4).heads(8, 2)[1] for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [Shard(r, 8).heads(64, 8) for r in (0, 7)] == [((0, 8), (0, 1)), ((56, 64), (7, 8))]
    # vocabulary: ceil(V / N) rows, the last part shorter
    assert [Shard(r, 2).vocab(101) for r in range(2)] == [(0, 51), (51, 101)]
    assert Shard(0, 2).vocab_part(101) == 51
    with pytest.raises(ValueError, match="num_key_value_heads 3 neither divides by nor divides 4"):
        Shard(0, 4).heads(12, 3)
    with pytest.raises(ValueError, match="vocab_size 5 leaves rank 3 no rows"):
        Shard(3, 4).vocab(5)


def test_tp_needs_a_process_group(checkpoints, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        zoo.load(checkpoints["llama3"], tp=2)


@pytest.mark.parametrize("tp", [0, -1, 2.0, "2", True])
def test_tp_must_be_a_count(checkpoints, tp):
    with pytest.raises(ValueError, match="tp: expected an int >= 1"):
        zoo.load(checkpoints["llama3"], tp=tp)


@pytest.mark.parametrize(
    "config",
    [
        dict(
            model_type="t5", d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, vocab_size=50
        ),
        dict(
            model_type="bert",
            hidden_size=32,
            num_attention_heads=2,
            num_hidden_layers=1,
            intermediate_size=64,
            vocab_size=50,
        ),
    ],
)
def test_other_families_refuse_tp(config, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"not model_type '{config['model_type']}'"):
        zoo.load(tmp_path, tp=2)


def test_tp1_is_the_single_process_model(checkpoints):
    """tp=1 (and None) is today's model: no process group, zoo.parallel never imported."""
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import sys, torch.distributed as dist, zoo\n"
        f"model = zoo.load({str(checkpoints['qwen2'])!r}, device='meta', tp=1)\n"
        "assert model.tp is None and not dist.is_initialized()\n"
        "assert 'zoo.parallel' not in sys.modules, 'tp=1 imported zoo.parallel'\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


# ----------------------------------------------------------------------------------- two GPUs


@pytest.fixture(scope="module")
def bf16_ranks(checkpoints, tmp_path_factory):
    return spawn_ranks(checkpoints, tmp_path_factory.mktemp("bf16-ranks"), "cuda", "bfloat16")


@two_gpus
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_graphs_and_one_shot_all_reduce_match_tp1(name, checkpoints, ranks):
    """fp32 on two GPUs, through CUDA graphs (plain call and decode) and the one-shot
    all-reduce over symmetric memory."""
    results = rank_results(ranks, name)
    expected = reference(checkpoints[name], name)
    for rank, got in enumerate(results):
        assert got["symmetric_on"], f"rank {rank}: the one-shot all-reduce is unavailable"
        for key in ("graph_logits", "symmetric_logits"):
            assert_close(
                real_positions(got[key]),
                real_positions(expected["logits"]),
                FP32_RTOL,
                f"rank {rank} {key}",
            )
        for key in ("graph_greedy", "symmetric_greedy"):
            assert torch.equal(got[key], expected["greedy"]), f"rank {rank} {key}"


@two_gpus
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_bf16_tp2_tracks_fp32_as_closely_as_tp1(name, checkpoints, bf16_ranks):
    """bf16 at tp=2 against the fp32 logits: the error at most 2x tp=1's bf16 error (each
    row-split projection rounds the ranks' parts to bf16 before summing them: two roundings
    more than tp=1's one), top-1 agreement >= 95%; the ranks agree bitwise; graphed calls and
    decode equal the eager ones."""
    results = rank_results(bf16_ranks, name)
    exact = real_positions(reference(checkpoints[name], name, "cuda")["logits"]).double()
    tp1 = real_positions(reference(checkpoints[name], name, "cuda", torch.bfloat16)["logits"])
    tp1_err = (tp1.double() - exact).abs().max() / exact.abs().max()
    for rank, got in enumerate(results):
        ours = real_positions(got["logits"]).double()
        err = (ours - exact).abs().max() / exact.abs().max()
        agreement = (ours.argmax(-1) == exact.argmax(-1)).float().mean().item()
        print(f"{name} rank {rank}: bf16 error tp=2 {err:.3e}, tp=1 {tp1_err:.3e}")
        assert err <= 2 * tp1_err, f"rank {rank}: tp=2 {err:.3e} vs tp=1 {tp1_err:.3e}"
        assert agreement >= 0.95, f"rank {rank}: top-1 agreement {agreement:.3f}"
        assert torch.equal(got["graph_logits"], got["logits"]), "graphed plain call != eager"
        assert torch.equal(got["graph_greedy"], got["greedy"]), "graph decode != eager decode"
        symmetric = real_positions(got["symmetric_logits"]).double()
        err = (symmetric - exact).abs().max() / exact.abs().max()
        assert err <= 2 * tp1_err, f"rank {rank}: one-shot all-reduce {err:.3e}"
    assert_same_results(*results, rank=1)


def load_rank(path, rank: int):
    """One rank's share of a checkpoint, loaded in this process (no process group: the
    row-split projections are built, never called), and the bytes the loader read."""
    import types
    from pathlib import Path

    from convert import hf
    from convert.llama import key_map
    from zoo.models.llama import Llama, LlamaConfig
    from zoo.parallel import RowParallelLinear

    tp = types.SimpleNamespace(shard=Shard(rank, WORLD))
    tp.row_linear = lambda i, o, bias, slot: RowParallelLinear(i, o, bias, tp, slot)
    config = LlamaConfig.from_hf(hf.read_config(Path(path)))
    model = Llama(config, tp=tp).to_empty(device="cpu")
    files = hf.safetensors_files(Path(path))
    read = []
    iter_tensors = hf.iter_tensors

    def counting(files, part_of):
        for key, file, tensor in iter_tensors(files, part_of):
            read.append(tensor.numel() * tensor.element_size())
            yield key, file, tensor

    keys = key_map(config, tp.shard)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hf, "iter_tensors", counting)
        hf.load_state(model, files, keys)
    return model, sum(read)


@pytest.mark.parametrize("rank", range(WORLD))
def test_a_rank_reads_only_its_share(checkpoints, rank):
    """The llama3 checkpoint (sharded, untied head): every byte read lands in exactly one
    parameter of the rank, and the parameters are the slices of the checkpoint's tensors."""
    from safetensors.torch import load_file

    path = checkpoints["llama3"]
    model, read = load_rank(path, rank)
    assert read == sum(p.numel() * p.element_size() for p in model.parameters())
    full = {}
    for file in sorted(path.glob("*.safetensors")):
        full |= load_file(file)
    d, hq, hkv, inter = 16, 2, 1, 36  # head_dim; per rank: q heads, kv heads, MLP rows
    q = slice(rank * hq * d, (rank + 1) * hq * d)
    kv = slice(rank * hkv * d, (rank + 1) * hkv * d)
    i = slice(rank * inter, (rank + 1) * inter)
    layer = "model.layers.1."
    expected = {
        "layers.1.attn.qkv.weight": torch.cat(
            [
                full[layer + f"self_attn.{p}_proj.weight"][s]
                for p, s in (("q", q), ("k", kv), ("v", kv))
            ]
        ),
        "layers.1.attn.out.weight": full[layer + "self_attn.o_proj.weight"][:, q],
        "layers.1.mlp.gate_up.weight": torch.cat(
            [full[layer + f"mlp.{p}_proj.weight"][i] for p in ("gate", "up")]
        ),
        "layers.1.mlp.down.weight": full[layer + "mlp.down_proj.weight"][:, i],
        "lm_head.weight": full["lm_head.weight"][rank * 51 : (rank + 1) * 51],
        "embed.weight": full["model.embed_tokens.weight"],
    }
    params = dict(model.named_parameters())
    for name, value in expected.items():
        assert torch.equal(params[name], value), name
