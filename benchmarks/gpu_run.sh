#!/usr/bin/env bash
# One device call: the test suite on the GPU (fp32, fp16, bf16), a smoke run of the real
# Llama-3-8B architecture, then the decode benchmark. Logs and JSON go to $OUT.
#   TESTS="tests/test_llama.py ..." MODEL=llama3-8b SHAPES=1x128x128 bash benchmarks/gpu_run.sh
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout "${TEST_TIMEOUT:-300}" python -m pytest -q -rs ${TESTS:-tests} -s -p no:cacheprovider 2>&1 \
  | grep -v "Writing model shards" > "$OUT/pytest.log"
grep -E "passed|failed|error|bf16 relative" "$OUT/pytest.log" | tail -15
timeout "${SMOKE_TIMEOUT:-150}" python - <<'PY' 2>&1 | tee "$OUT/smoke.log"
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
timeout "${BENCH_TIMEOUT:-200}" python benchmarks/bench_decoder.py --model "${MODEL:-llama3-8b}" \
  --shapes "${SHAPES:-1x128x128,2x512x256}" --out "$OUT/bench_${MODEL:-llama3-8b}.json" 2>&1 | tee "$OUT/bench.log"
