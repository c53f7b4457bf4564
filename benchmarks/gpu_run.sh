#!/usr/bin/env bash
# One device call: the whole test suite on the GPU (fp32, fp16, bf16), a smoke run of the real
# Llama-3-8B architecture, then the decode benchmark. Logs and JSON go to $OUT.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
python -m pytest -q -x ${PYTEST_ARGS:-tests} -s 2>&1 | grep -v "^Writing\|it/s" | tee "$OUT/pytest.log" | tail -40
python - <<'PY' 2>&1 | tee "$OUT/smoke.log"
import torch, zoo
m = zoo.load("llama3-8b", pretrained=False)
print("params", sum(p.numel() for p in m.parameters()), m.embed.weight.dtype, m.embed.weight.device)
ids = torch.randint(0, m.config.vocab_size, (2, 20), device="cuda")
out = m.generate(ids, max_new_tokens=32, eos_token_id=[])
print("smoke generate", tuple(out.shape), out[:, 20:28].tolist())
eager = m.generate(ids, max_new_tokens=32, eos_token_id=[], cuda_graph=False)
print("graph == eager:", torch.equal(out, eager))
PY
python benchmarks/bench_decoder.py --model ${MODEL:-llama3-8b} --out "$OUT/bench_${MODEL:-llama3-8b}.json" 2>&1 | tee "$OUT/bench.log"
