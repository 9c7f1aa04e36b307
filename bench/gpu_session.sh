#!/usr/bin/env bash
# One call on a GPU machine: build in place, then run the test suite (one pytest process per
# file, so that one crash cannot hide the other files' results) and/or the benchmarks.
#
#   bash bench/gpu_session.sh tests          # build + every test file
#   bash bench/gpu_session.sh bench          # build + every benchmark
#   bash bench/gpu_session.sh tests bench    # both
#
# Logs are packed into $OUT/logs.tar.gz ($OUT defaults to ./gpu_out).
set -uo pipefail
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
WORK=$(mktemp -d); LOGS="$WORK/logs"; mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; date -u; } > "$LOGS/machine.txt" 2>&1
cat "$LOGS/machine.txt"

start=$(date +%s)
GRADGEOM_PTXAS_VERBOSE=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
  python setup.py build_ext --inplace > "$LOGS/build.log" 2>&1 || { tail -40 "$LOGS/build.log"; tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs; exit 1; }
echo "build: $(( $(date +%s) - start )) s; ptxas spills: $(grep -c ' [1-9][0-9]* bytes spill stores' "$LOGS/build.log")"

for what in "$@"; do
  case "$what" in
    tests)
      for f in tests/test_*.py; do
        name=$(basename "$f" .py)
        timeout 300 python -m pytest "$f" -q -rs -p no:cacheprovider > "$LOGS/$name.log" 2>&1
        rc=$?
        echo "$name rc=$rc $(grep -E '(passed|failed|error)' "$LOGS/$name.log" | tail -1)"
      done | tee "$LOGS/tests_summary.txt"
      echo "files with failures: $(grep -vc ' rc=0 ' "$LOGS/tests_summary.txt")"
      grep -h -E "^(FAILED|ERROR) " "$LOGS"/test_*.log | head -30
      ;;
    bench)
      timeout 120 python bench/bench_group_moments.py > "$LOGS/bench_group_moments.log" 2>&1; cat "$LOGS/bench_group_moments.log"
      timeout 150 python -m pytest bench/bench_sketch_moments.py -q -s --benchmark-disable -p no:cacheprovider > "$LOGS/bench_sketch_moments.log" 2>&1
      grep -E "GB/s" "$LOGS/bench_sketch_moments.log" | head -12
      timeout 200 python -m pytest bench/bench_estimator.py -q -s --benchmark-disable -p no:cacheprovider > "$LOGS/bench_estimator.log" 2>&1
      grep -E "ms/step|profiler|Llama" "$LOGS/bench_estimator.log"
      timeout 200 python bench/bench_lora.py > "$LOGS/bench_lora.log" 2>&1; grep -E "^#|gradgeom|torch|multiply" "$LOGS/bench_lora.log" | head -60
      ;;
  esac
done
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs
