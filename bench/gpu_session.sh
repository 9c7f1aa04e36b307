#!/usr/bin/env bash
# One call on the GPU machine: build in place, run the whole test suite, run the benchmarks.
# Logs go to $OUT (default ./gpu_out). Usage: bash bench/gpu_session.sh [pytest args for tests]
set -uo pipefail
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch; print('torch', torch.__version__, torch.version.cuda)" >> "$OUT/gpu.txt"
cat "$OUT/gpu.txt"
start=$(date +%s)
GRADGEOM_PTXAS_VERBOSE=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"; grep -A1 "Compiling entry" "$OUT/build.log" | grep -oE "(_Z[A-Za-z0-9_]+|Used [0-9]+ registers.*)" | paste - - | sed "s/^_Z[0-9]*//" | cut -c1-160
python -m pytest tests -q -x -rs "$@" 2>&1 | tee "$OUT/tests.log" | tail -25
for b in ${GG_BENCHES:-bench/bench_group_moments.py}; do
  echo "== $b"; timeout 300 python "$b" 2>&1 | tee -a "$OUT/bench.log" | tail -30
done
