#!/usr/bin/env bash
# One-shot GPU benchmark: `guess-optim bench --suite full --device cuda`, for a machine lent with one GPU.
#
#   OUT=/some/dir bash benchmarks/run_gpu.sh          # writes bench_cuda.json, BENCHMARKS_cuda.md, plots/, log.txt
#
# Installs nothing: it uses the first Python that imports torch with CUDA ($PYTHON, .venv/bin/python, python3;
# scripts/setup.sh makes .venv where a package registry is reachable). torchzero and transformers are optional: the
# benchmark skips the torchzero peer or the ViT configurations, with a message in the report, when they are missing.
# What it measures (see guess_optim/bench/suite.py): the whole 36-point MLP grid with the core runners, every runner on
# the 6x1024 MLP and the ConvNet, ViT-B/16 prompt tuning at batch 8 and 32; steps are timed between
# torch.cuda.synchronize() calls, memory in-process from torch.cuda.max_memory_allocated().
# Budget: under 8 minutes on one H200; `timeout` stops it at 7.5 minutes, and a partial run still leaves its log and
# the results of the cases it finished. Never asserts speed: read the ratios in the report.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out-gpu}
mkdir -p "$OUT"

PY=""
for candidate in "${PYTHON:-}" .venv/bin/python python3 python; do
  [ -n "$candidate" ] || continue
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch; assert torch.cuda.is_available()" \
      >/dev/null 2>&1; then
    PY=$candidate
    break
  fi
done
if [ -z "$PY" ]; then
  echo "run_gpu.sh: no Python with CUDA-enabled torch found (set PYTHON=..., or run scripts/setup.sh first)" >&2
  exit 2
fi
# A checkout that is not pip-installed still runs: the repository root is on the path (guess_optim/).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  echo "python: $PY"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv 2>/dev/null || true
} | tee "$OUT/log.txt"

timeout 450 "$PY" -m guess_optim.bench --suite full --device cuda \
  --out "$OUT/bench_cuda.json" --markdown "$OUT/BENCHMARKS_cuda.md" --plot-dir "$OUT/plots" 2>&1 | tee -a "$OUT/log.txt"
status=${PIPESTATUS[0]}
echo "exit status: $status" | tee -a "$OUT/log.txt"
exit "$status"
