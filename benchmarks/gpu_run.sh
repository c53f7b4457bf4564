#!/usr/bin/env bash
# GPU runs, one stage per argument (a device call runs at most 10 minutes: pick stages to fit).
#   tests    the whole test suite on the GPU (kernels in fp32/fp16/bf16, every family's parity)
#   smoke    Llama-3-8B (random weights): load, generate 32 tokens for a batch of 2, graph == eager
#   llama    decode/prefill benchmark of Llama-3-8B (add PEERS=1 to measure HF peers again)
#   gpt2     the same for GPT-2 (124M)
#   bert     Bert-base forward benchmark at the 7 shapes of the targets
#   t5       T5-base generation benchmark, input 256, 64 new tokens
#   profile  the GPU kernels of a Llama-3-8B prefill and decode step: all matmuls/attention ours
# Logs and JSON go to $OUT.   e.g.  bash benchmarks/gpu_run.sh tests smoke
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
peers=${PEERS:+--peers}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
for stage in "$@"; do
  echo "== $stage"
  case "$stage" in
    tests)
      python -m pytest -q -rs -s -p no:cacheprovider tests 2>&1 | grep -v "Writing model shards" > "$OUT/pytest.log"
      grep -E "passed|failed|FAILED|Error|relative error" "$OUT/pytest.log" | tail -30 ;;
    smoke)
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
      ;;
    llama) python benchmarks/bench_decoder.py --model llama3-8b --shapes 1x128x128,2x512x256 $peers --out "$OUT/bench_llama3-8b.json" 2>&1 | tee "$OUT/bench_llama.log" ;;
    gpt2) python benchmarks/bench_decoder.py --model gpt2 --shapes 1x128x128 --prefill 1024 $peers --out "$OUT/bench_gpt2.json" 2>&1 | tee "$OUT/bench_gpt2.log" ;;
    bert) python benchmarks/bench_bert.py --model bert-base-uncased $peers --out "$OUT/bench_bert.json" 2>&1 | tee "$OUT/bench_bert.log" ;;
    t5) python benchmarks/bench_t5.py --model t5-base --input 256 --new 64 $peers --out "$OUT/bench_t5.json" 2>&1 | tee "$OUT/bench_t5.log" ;;
    profile) python benchmarks/profile_kernels.py --model llama3-8b 2>&1 | tee "$OUT/profile.log" ;;
    *) echo "unknown stage $stage" ;;
  esac
done
cp benchmarks/results/*hf_peers.json "$OUT/" 2>/dev/null || true
