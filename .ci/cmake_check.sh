#!/usr/bin/env bash
# Builds the CMake project (same source list as setup.py) against the installed libtorch, with
# the CUDA kernels when nvcc is present, and runs its C++ smoke test.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')
args=(-DCMAKE_PREFIX_PATH="$prefix")
if command -v nvcc >/dev/null && python -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
  top=$(nvcc --dryrun -c x.cu -o x.o 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
  cuda_home=$(cd "$top" && pwd -P)
  nvrtc=$(python - <<'PY'
import glob, os
try:
    import nvidia
    hits = sorted(glob.glob(os.path.join(os.path.dirname(nvidia.__path__[0]), "nvidia", "*", "lib", "libnvrtc.so*")))
except ImportError:
    hits = []
print(next((h for h in hits if "builtins" not in h and ".alt." not in h), ""))
PY
)
  args+=(-DGRADGEOM_WITH_CUDA=ON -DCUDA_TOOLKIT_ROOT_DIR="$cuda_home" -DCMAKE_CUDA_COMPILER="$cuda_home/bin/nvcc")
  [ -n "$nvrtc" ] && args+=(-DCUDA_nvrtc_LIBRARY="$nvrtc")
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
fi
rm -rf build/cmake
cmake -S . -B build/cmake "${args[@]}"
cmake --build build/cmake -j"$(nproc)"
ctest --test-dir build/cmake --output-on-failure
