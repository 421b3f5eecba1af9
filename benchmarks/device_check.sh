#!/usr/bin/env bash
# The GPU checks of qlinear on an NVIDIA machine, in one call from the repository root:
#   bash benchmarks/device_check.sh            # logs and JSON in $OUT (default /tmp/qlinear-device)
# Order: device facts, the shared suite on the cuda backend, compute-sanitizer (memcheck,
# racecheck), the CUDA benchmark, then WGSL on the NVIDIA Vulkan adapter when a wgpu wheel
# (.whl/) and the Vulkan loader packages (.gl/*.deb) sit in the repository root. Each step
# logs to $OUT and the script goes on after a failure, so one run reports every step.
set -uo pipefail
OUT="${OUT:-/tmp/qlinear-device}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 QLINEAR_CACHE_DIR="$OUT/kcache"
step() { echo; echo "=== $1"; }

step facts
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import cuda.core, cuda.bindings; print('cuda.core', cuda.core.__version__)"
python3 -m qlinear info | tee "$OUT/info.txt"

step "suite on cuda"
timeout 300 python3 -m pytest -q -x -p no:cacheprovider --qlinear-backend=cuda \
  tests/test_linear.py tests/test_quantize.py tests/test_bad_inputs.py tests/test_api.py \
  tests/test_torch_*.py tests/test_bench_peers.py tests/test_cuda_backend.py 2>&1 | tail -n 40 | tee "$OUT/pytest-cuda.txt"

step "compute-sanitizer memcheck"
timeout 240 compute-sanitizer --tool memcheck --error-exitcode 3 \
  python3 benchmarks/sanitize_cases.py 2>&1 | tail -n 30 | tee "$OUT/memcheck.txt"
step "compute-sanitizer racecheck"
timeout 240 compute-sanitizer --tool racecheck --error-exitcode 3 \
  python3 benchmarks/sanitize_cases.py --quick 2>&1 | tail -n 20 | tee "$OUT/racecheck.txt"

step "cuda benchmark"
timeout 420 python3 benchmarks/cuda_bench.py --json "$OUT/cuda_bench.json" 2>&1 | tee "$OUT/cuda_bench.txt"

if ls .whl/wgpu-*.whl >/dev/null 2>&1; then
  step "wgpu on the NVIDIA Vulkan adapter"
  for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
  export VK_DRIVER_FILES="${VK_DRIVER_FILES:-/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json}"
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider --qlinear-backend=wgpu \
    tests/test_linear.py tests/test_wgpu_*.py 2>&1 | tail -n 20 | tee "$OUT/pytest-wgpu.txt"
  timeout 300 python3 benchmarks/wgpu_bench.py --full --no-cpu --json "$OUT/wgpu_bench.json" \
    2>&1 | tee "$OUT/wgpu_bench.txt"
fi
echo; echo "=== done; files in $OUT"
