#!/usr/bin/env bash
# GPU runs, one stage per argument (a device call runs at most 10 minutes: pick stages to fit).
#   tests     the whole test suite on the GPU (kernels in fp32/fp16/bf16, every family's parity),
#             spread over 8 pytest-xdist workers per GPU (TESTS=... picks files or node ids)
#   smoke     Llama-3-8B (random weights): load, generate 32 tokens for a batch of 2, graph == eager
#   accuracy  bf16 error against HF fp32 at real sizes, ours vs HF bf16 (benchmarks/accuracy.py)
#   profile   the GPU kernels of a Llama-3-8B prefill and decode step: all matmuls/attention ours
#   checks    tests, and beside them smoke, accuracy and profile (none of these is timed)
#   llama     decode/prefill benchmark of Llama-3-8B (add PEERS=1 to measure HF peers again)
#   gpt2      the same for GPT-2 (124M)
#   bert      Bert-base forward at the 7 shapes of the targets: the plain call as a user makes it,
#             beside a hand-captured graph replay (BERT_SHAPES=1x16,... picks shapes; BERT_PEER_SHAPES limits which shapes
#             PEERS=1 measures; the others come from the stored peers)
#   embed     Bert-base sentence embeddings of 2048 texts of 8..256 tokens in batches of 32, each
#             padded to its longest: texts/s, first pass and steady state (PEERS=1: HF eager and
#             torch.compile(dynamic=True) again)
#   ttft      Llama-3-8B time to first token, generate(max_new_tokens=1) at prompts 16, 128, 512
#             and 2048, and the plain forward, each beside its GPU time in a torch.profiler trace
#             (PEERS=1: HF eager and static cache + compile at those prompts)
#   gpt2-prefill  GPT-2 plain forward of 1 x 1024 tokens (and its TTFT) vs its GPU time and HF eager
#   launch    the host cost of kernel launches (benchmarks/bench_launch.py, where present)
#   plain-profile  where a Bert plain call's time beyond its GPU work goes: synced wall time and a
#             torch.profiler table of host ops and GPU kernels (benchmarks/profile_plain_call.py)
#   t5        T5-base generation benchmark, input 256, 64 new tokens
#   kernels   our matmul and attention alone vs cuBLAS and SDPA at the models' shapes
#   tma-split the projections where the persistent matmul may split K, tuned with and without it
#             (the unsplit configs include the tiles with a column tail)
#   speed     the kernel options measured (benchmarks/bench_options.py: epilogue variants of the
#             large-M matmul + activation vs cuBLAS, decode tables at Llama-3-8B's batch 1..128),
#             then under the winning options (or SPEED_OPTIONS="..." given as ZOO_KERNELS):
#             Llama-3-8B decode at batch 1/8/32/64/128 (prompt 512, 64 new) with the 1x2048
#             prefill, and Bert-base at 8x512 and 32x512, each with its roofline line
#   targets   every figure of the serving-speed targets in one call: the large-M matmuls with an
#             activation (today's epilogue) against cuBLAS, Llama-3-8B decode at batch 1/8/32/64/128
#             (prompt 512, 64 new) with the 1x2048 prefill, and Bert-base 8x512 / 32x512, each with
#             its roofline and the stored HF peers (no option measured, unlike speed)
#   tp        tensor parallel over every GPU of the host (torchrun, benchmarks/bench_tp.py):
#             Llama-3-8B decode at tp=N vs tp=1, Llama-3-70B decode (% of the bandwidth limit),
#             prefill 1x2048 and batch-32 decode
#   tp-tests  the tensor-parallel tests (two ranks on two GPUs, fp32 and bf16)
#   fp8       Llama-3-8B with FP8 weights vs bf16 in one process: decode batch 1 (prompt 128, 128
#             new) and batch 32 (prompt 512, 64 new), prefill 1 x 2048 (CUDA graphs only)
#   fp8-accuracy  the FP8 dot's accumulation error at Llama-3-8B's K (benchmarks/fp8_accumulation.py),
#             then FP8 weights at real size: error against HF fp32 and top-1 beside bf16's, and
#             against the fp32 model with the same FP8 weights dequantized (benchmarks/accuracy.py)
#   fp8-profile   the kernels of an FP8 Llama-3-8B prefill and decode step: matmuls all ours
#   sweeps    the decode kernels' launch choices one by one (benchmarks/sweep_decode.py:
#             attention blocks and splits, FP8 matrix-vector configs, the split-K epilogue's grid)
#   timeline  each kernel's exclusive share of a CUDA-graph decode step, bf16 batch 1 and 32,
#             FP8 batch 1 (benchmarks/sweep_decode.py timeline)
# Each stage is meant to fit in one 10-minute device call on its own (PEERS=1 stages: one per
# call); every stage prints its duration.
# Logs and JSON go to $OUT (the benchmarks' tables to $OUT/bench.log); with PEERS=1 the HF peer
# files are read from and written to $OUT too.
#   e.g.  bash benchmarks/gpu_run.sh checks      PEERS=1 bash benchmarks/gpu_run.sh t5 gpt2
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
peers=${PEERS:+--peers}
# measured peers land in $OUT (stored ones are copied there first); otherwise the stored ones are read
[ -n "$peers" ] && export BENCH_RESULTS=$OUT
gpu=$(python -c "import sys; sys.path.insert(0, 'benchmarks'); from common import gpu_tag; print(gpu_tag())")
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"

stored_peers() {  # with PEERS=1: the stored HF peer numbers of this GPU kind for a model into $OUT
  [ -n "$peers" ] && cp "benchmarks/results/${gpu}_$1_hf_peers.json" "$OUT/" 2>/dev/null || true
}

run_tests() {  # the whole suite; with pytest-xdist, 8 workers per GPU (conftest.py spreads them;
  # loadgroup: a module marked xdist_group stays on one worker)
  local workers
  if python -c "import xdist" 2>/dev/null; then
    workers=(-n "${TEST_WORKERS:-$((8 * $(nvidia-smi -L | wc -l)))}" --dist loadgroup)
  else
    workers=()
  fi
  python -c "import pytest_timeout" 2>/dev/null && workers+=(--timeout 300)  # no test hangs the run
  # failures land in $OUT/failures.log as they happen (conftest.py): a run cut short keeps them
  : >"$OUT/failures.log"; : >"$OUT/progress.log"
  # TEST_TIME_S: interrupt pytest then (it still prints its summary and durations)
  ZOO_FAILURE_LOG="$OUT/failures.log" ZOO_PROGRESS_LOG="$OUT/progress.log" \
    ${TEST_TIME_S:+timeout --signal=INT --kill-after=30 "$TEST_TIME_S"} \
    python -m pytest -q -rfEs --tb=short --durations 25 -p no:cacheprovider "${workers[@]}" \
    ${TESTS:-tests} 2>&1 |
    grep --line-buffered -v "Writing model shards" >"$OUT/pytest.log"
  grep -E "passed|failed|^FAILED|^ERROR" "$OUT/pytest.log" | tail -40
  grep "^==== " "$OUT/failures.log" | head -40
  progress_summary "$OUT/progress.log"
}

progress_summary() {  # from conftest.py's progress log: tests started but not ended, the slowest
  echo "-- still running at the end:"
  awk '$1 == "start" {run[$3] = $2} $1 == "end" {delete run[$4]} END {for (t in run) print run[t], t}' "$1"
  echo "-- slowest (seconds, setup and teardown included):"
  awk '$1 == "end" {print $3, $2, $4}' "$1" | sort -rn | head -25
}

smoke() {
  python - <<'PY' 2>&1 | tee "$OUT/smoke.log"
import time, torch, zoo
start = time.perf_counter()
m = zoo.load("llama3-8b", pretrained=False)
print("llama3-8b random init", f"{time.perf_counter() - start:.1f}s", sum(p.numel() for p in m.parameters()), m.embed.weight.dtype)
ids = torch.randint(0, m.config.vocab_size, (2, 20), device="cuda")
out = m.generate(ids, max_new_tokens=32, eos_token_id=[])
print("smoke generate batch 2 -> shape", tuple(out.shape))
eager = m.generate(ids, max_new_tokens=32, eos_token_id=[], cuda_graph=False)
print("cuda graph tokens == eager tokens:", torch.equal(out, eager))
PY
}

accuracy() { python benchmarks/accuracy.py --out "$OUT/accuracy.json" 2>&1 | grep -v "Writing model shards" | tee "$OUT/accuracy.log"; }
profile() { python benchmarks/profile_kernels.py --model llama3-8b 2>&1 | tee "$OUT/profile.log"; }

for stage in "$@"; do
  echo "== $stage"
  SECONDS=0
  case "$stage" in
    tests) run_tests ;;
    smoke) smoke ;;
    accuracy) accuracy ;;
    profile) profile ;;
    checks)
      (smoke >/dev/null; accuracy >/dev/null; profile >/dev/null) &
      run_tests
      wait
      cat "$OUT/smoke.log"; grep -E "^\||within" "$OUT/accuracy.log"; tail -3 "$OUT/profile.log" ;;
    llama)
      stored_peers llama3-8b
      python benchmarks/bench_decoder.py --model llama3-8b --shapes 1x128x128,2x512x256 $peers --out "$OUT/bench_llama3-8b.json" 2>&1 | tee -a "$OUT/bench.log" ;;
    gpt2)
      stored_peers gpt2
      python benchmarks/bench_decoder.py --model gpt2 --shapes 1x128x128 --prefill 1024 $peers --out "$OUT/bench_gpt2.json" 2>&1 | tee -a "$OUT/bench.log" ;;
    bert)
      stored_peers bert-base-uncased
      python benchmarks/bench_bert.py --model bert-base-uncased $peers ${BERT_SHAPES:+--shapes $BERT_SHAPES} ${BERT_PEER_SHAPES:+--peer-shapes $BERT_PEER_SHAPES} --out "$OUT/bench_bert.json" 2>&1 | tee -a "$OUT/bench.log" ;;
    t5)
      stored_peers t5-base
      python benchmarks/bench_t5.py --model t5-base --input 256 --new 64 $peers --out "$OUT/bench_t5.json" 2>&1 | tee -a "$OUT/bench.log" ;;
    fp8)
      python benchmarks/bench_decoder.py --model llama3-8b --quantize fp8 --versus-bf16 --graph-only --shapes 1x128x128,32x512x64 --out "$OUT/bench_llama3-8b_fp8.json" 2>&1 | tee -a "$OUT/bench.log" ;;
    fp8-accuracy)
      python benchmarks/fp8_accumulation.py --out "$OUT/fp8_accumulation.json" 2>&1 | tee "$OUT/fp8_accumulation.log"
      python benchmarks/accuracy.py --models llama3-8b,gpt2 --fp8 --out "$OUT/accuracy_fp8.json" 2>&1 | grep -v "Writing model shards" | tee "$OUT/accuracy_fp8.log" ;;
    fp8-profile)
      python benchmarks/profile_kernels.py --model llama3-8b --quantize fp8 2>&1 | tee "$OUT/profile_fp8.log" ;;
    sweeps)
      for what in attention matvec epilogue; do
        python benchmarks/sweep_decode.py "$what" 2>&1 | tee "$OUT/sweep_$what.log"
      done ;;
    timeline)
      python benchmarks/sweep_decode.py timeline --batches 1,32 2>&1 | tee "$OUT/timeline.log"
      python benchmarks/sweep_decode.py timeline --quantize fp8 --batches 1 2>&1 | tee -a "$OUT/timeline.log" ;;
    kernels)
      python benchmarks/bench_kernels.py --out "$OUT/bench_kernels.json" 2>&1 | tee -a "$OUT/bench.log" ;;
    tma-split)
      python benchmarks/bench_kernels.py --tma-split --configs --out "$OUT/bench_tma_split.json" 2>&1 | tee -a "$OUT/bench.log" ;;
    speed)
      python benchmarks/bench_options.py --out "$OUT/bench_options.json" --options-out "$OUT/kernel_options.txt" 2>&1 | tee -a "$OUT/bench.log"
      echo "== options measured at ${SECONDS}s"
      opts=${SPEED_OPTIONS-$(cat "$OUT/kernel_options.txt" 2>/dev/null)}
      echo "ZOO_KERNELS=$opts" | tee -a "$OUT/bench.log"
      ZOO_KERNELS=$opts python benchmarks/bench_decoder.py --model llama3-8b --shapes 1x512x64,8x512x64,32x512x64,64x512x64,128x512x64 --graph-only --out "$OUT/bench_decode_batches.json" 2>&1 | tee -a "$OUT/bench.log"
      echo "== decode measured at ${SECONDS}s"
      ZOO_KERNELS=$opts python benchmarks/bench_bert.py --model bert-base-uncased --shapes 8x512,32x512 --out "$OUT/bench_bert_speed.json" 2>&1 | tee -a "$OUT/bench.log" ;;
    targets)
      python benchmarks/bench_options.py --skip-decode --variants default --out "$OUT/bench_epilogues.json" 2>&1 | tee -a "$OUT/bench.log"
      echo "== matmul + activation measured at ${SECONDS}s"
      python benchmarks/bench_decoder.py --model llama3-8b --shapes 1x512x64,8x512x64,32x512x64,64x512x64,128x512x64 --graph-only --out "$OUT/bench_decode_batches.json" 2>&1 | tee -a "$OUT/bench.log"
      echo "== decode measured at ${SECONDS}s"
      python benchmarks/bench_bert.py --model bert-base-uncased --shapes 8x512,32x512 --out "$OUT/bench_bert_speed.json" 2>&1 | tee -a "$OUT/bench.log" ;;
    embed)
      stored_peers embed
      python benchmarks/bench_embed.py --model bert-base-uncased $peers --out "$OUT/bench_embed.json" 2>&1 | tee -a "$OUT/bench.log" ;;
    ttft)
      stored_peers llama3-8b
      python benchmarks/bench_ttft.py --model llama3-8b --prompts 16,128,512,2048 $peers --out "$OUT/bench_ttft_llama3-8b.json" 2>&1 | tee -a "$OUT/bench.log" ;;
    gpt2-prefill)
      stored_peers gpt2
      python benchmarks/bench_ttft.py --model gpt2 --prompts 1024 $peers --out "$OUT/bench_ttft_gpt2.json" 2>&1 | tee -a "$OUT/bench.log" ;;
    launch)
      if [ -f benchmarks/bench_launch.py ]; then
        # its JSON into $OUT where it takes --out
        launch_out=()
        grep -q -- "\"--out\"" benchmarks/bench_launch.py && launch_out=(--out "$OUT/bench_launch.json")
        python benchmarks/bench_launch.py "${launch_out[@]}" 2>&1 | tee -a "$OUT/bench.log"
      else
        echo "benchmarks/bench_launch.py is absent: launch skipped"
      fi ;;
    plain-profile)
      python benchmarks/profile_plain_call.py 2>&1 | tee "$OUT/plain_call_profile.log" ;;
    tp)
      gpus=$(nvidia-smi -L | wc -l)
      # TP_ARGS="--skip-large" / "--skip-tp1 --skip-small" split it over two calls if need be
      # shellcheck disable=SC2086
      torchrun --nproc-per-node "$gpus" benchmarks/bench_tp.py ${TP_ARGS:-} --out "$OUT/bench_tp.json" 2>&1 | tee -a "$OUT/bench.log" ;;
    tp-tests)
      : >"$OUT/failures_tp.log"
      ZOO_FAILURE_LOG="$OUT/failures_tp.log" python -m pytest -v -rs -s -p no:cacheprovider \
        tests/test_tensor_parallel.py 2>&1 | grep --line-buffered -v "Writing model shards" |
        tee "$OUT/pytest_tp.log" | tail -30 ;;
    *) echo "unknown stage $stage" ;;
  esac
  echo "== $stage took ${SECONDS}s"
done
