#!/usr/bin/env bash
# The GPU checks of qlinear on an NVIDIA machine, in one call, from the repository root:
#   bash benchmarks/device_check.sh                  # logs, JSON and summary.txt in $OUT
#   ONLY=bench,wgsl bash benchmarks/device_check.sh  # some steps again (names as below)
#   QLINEAR_COMMIT=<sha> ...                         # the commit, where .git did not travel
# Steps, most valuable first, each under its own time limit (the limits add up to 540 s):
# facts, the shared suite on the cuda backend with the default GEMM (every activation
# scheme included), a first short run of the Hopper wgmma GEMM (if it fails or hangs, the
# later steps leave their wgmma cases out), the same backend with it switched on (the
# shared tests whose shapes take it, then every dtype with every scheme in
# sanitize_cases.py),
# compute-sanitizer memcheck and racecheck (asymmetric-scheme and wgmma cases among them),
# the CUDA benchmark (--quick; the wgmma plan timed beside the default one), then WGSL on
# the NVIDIA Vulkan adapter when wgpu is there or its wheels were carried in .whl/ (Vulkan
# loader .debs in .gl/ where none is installed). A failed or timed-out step does not stop
# the run: the summary at the end (also $OUT/summary.txt, written as each step ends) gives
# every step's status and time, and which GEMM ran where that matters (wgmma on or off).
# Each step's whole log goes to $OUT with tee; the console gets its tail. At most 8 files
# land in $OUT, which is all the GPU machine sends back.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-/tmp/qlinear-device}"
# Compiled kernels stay out of $OUT (only 8 files come back); the steps share them.
export QLINEAR_CACHE_DIR="${QLINEAR_CACHE_DIR:-/tmp/qlinear-kcache}"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/qlinear-device.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
export OUT WORK PY="${PYTHON:-python3}" SITE=/tmp/qlinear-site SKIP="$WORK/wgsl-skip"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
NV_ICD=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [[ -z "${VK_DRIVER_FILES:-}" && -f "$NV_ICD" ]]; then export VK_DRIVER_FILES="$NV_ICD"; fi
export SUITE="tests/test_linear.py tests/test_quantize.py tests/test_schemes.py
  tests/test_scheme_args.py tests/test_bad_inputs.py tests/test_api.py tests/test_inputs_everywhere.py tests/test_layer_build.py
  tests/test_layer_io.py tests/test_cuda_backend.py tests/test_bench_peers.py
  tests/test_plugin.py tests/test_torch_module.py
  tests/test_torch_swap.py tests/test_torch_fidelity.py tests/test_torch_compile.py"
# The shared tests with linear shapes that take the wgmma GEMM when it is on (M > 64,
# K % 16 == 0): the prefill shapes of test_linear.py and test_schemes.py (every dtype and
# scheme, odd edges, the largest K at M = 80), an encoder at M = 128 and 512 and a layer at
# M = 100; sanitize_cases.py --wgmma-sweep runs every dtype x scheme at larger shapes after.
export WGMMA_TESTS="tests/test_linear.py tests/test_schemes.py tests/test_torch_fidelity.py
  tests/test_torch_module.py"
export WGMMA_K="prefill or 130-272-136 or 65-48-5 or test_torch_fidelity or test_torch_module"
export WGSL_TESTS="tests/test_linear.py tests/test_wgpu_backend.py tests/test_wgpu_numerics.py
  tests/test_wgpu_probe.py tests/test_wgpu_streams.py tests/test_wgpu_limits.py"
mkdir -p "$OUT" "$QLINEAR_CACHE_DIR"
rm -f "$OUT/summary.txt" "$OUT"/{facts,suite-cuda,sanitize,cuda_bench,wgsl}.log \
  "$OUT"/{cuda_bench,wgpu_bench}.json

facts() {
  local failed="" gpu commit
  nvidia-smi --format=csv --query-gpu=name,driver_version,memory.total,compute_cap,\
clocks.sm,clocks.max.sm,power.limit,temperature.gpu || failed+=" nvidia-smi"
  gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)
  # As qlinear.bench.git_commit reads it: a named commit first, then the repository.
  commit=${QLINEAR_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
  if [[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
    commit+=" with uncommitted changes"
  fi
  # The summary comes back whatever else does: it names the machine and the code.
  echo "gpu: ${gpu:-none (nvidia-smi failed)}; commit: $commit; $(date -u +%FT%TZ)" |
    tee -a "$OUT/summary.txt"
  "$PY" - <<'EOF' || failed+=" versions"
import importlib.metadata as md
import platform

print("python", platform.python_version())
for name in ("cuda-core", "cuda-bindings", "cuda-pathfinder", "nvidia-cuda-nvrtc", "cupy-cuda13x",
             "torch", "numpy", "ml-dtypes", "pytest", "pytest-xdist", "hypothesis"):
    try:
        print(f"{name:18} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name:18} -")
try:
    from cuda.bindings import nvrtc
    _, major, minor = nvrtc.nvrtcVersion()
    import cuda.pathfinder as pf
    print(f"NVRTC {major}.{minor} from {pf.load_nvidia_dynamic_lib('nvrtc').abs_path}")
    print("CUDA headers (cuda.pathfinder):", pf.find_nvidia_header_directory("cudart"))
except Exception as e:  # a fact too: the backend will say the same
    print("NVRTC / cuda.pathfinder:", type(e).__name__, e)
EOF
  "$PY" -m qlinear info >"$WORK/info.txt" || failed+=" qlinear-info"
  # The cuda section last, where the console's tail shows it.
  awk '/^\[/ { s = /^\[cuda\]/ } !s' "$WORK/info.txt"
  awk '/^\[/ { s = /^\[cuda\]/ } s' "$WORK/info.txt"
  for tool in nvcc compute-sanitizer ncu; do
    printf '%s: ' "$tool"
    command -v "$tool" >/dev/null && "$tool" --version | grep -m 1 -i 'release\|version' || echo -
  done
  # The last line names what failed, for the summary.
  [[ -z "$failed" ]] || { echo "facts that failed:$failed"; return 1; }
}

# A step's remark for its summary row, e.g. which GEMM ran ($NOTE is set per step).
note() { echo "$*" >>"$NOTE"; }

# Runs "$@" with its output shown, and copies its last "gemm: ..." line to the remark.
gemm_note() {
  "$@" | tee "$WORK/gemm.out"
  local rc=${PIPESTATUS[0]}
  grep '^gemm: ' "$WORK/gemm.out" | sed -n '$p' | cut -c 7- >>"$NOTE"
  return "$rc"
}

suite() {
  local par=()
  # 16 cores: a worker per few of them; per-test limits turn a hang into a failure.
  "$PY" -c "import xdist" 2>/dev/null && par+=(-n 8)
  "$PY" -c "import pytest_timeout" 2>/dev/null && par+=(--timeout=120)
  note "wgmma off"
  # shellcheck disable=SC2086
  QLINEAR_CUDA_WGMMA=0 "$PY" -m pytest -q -p no:cacheprovider --qlinear-backend=cuda \
    --qlinear-require --maxfail=20 --durations=15 "${par[@]}" $SUITE
}

# The first look at the wgmma GEMM, under a short limit: a kernel that never finishes
# hangs its process, so only a pass here lets the later steps run it ($WORK/wgmma-ok).
wgmma_smoke() {
  export QLINEAR_CUDA_WGMMA=1
  note "wgmma on"
  gemm_note "$PY" benchmarks/sanitize_cases.py --wgmma-smoke && touch "$WORK/wgmma-ok"
}

# Set by the main script when the smoke test ran and failed: the wgmma cases are left out.
no_wgmma() {
  [[ -n "${NO_WGMMA:-}" ]] || return 1
  note "wgmma cases left out: its smoke test failed"
}

suite_wgmma() {
  local par=() rc=0
  if [[ -n "${NO_WGMMA:-}" ]]; then
    echo "the wgmma GEMM failed its smoke test" >"$WORK/skip.suite-wgmma"
    echo "SKIP: the wgmma GEMM failed its smoke test"; exit 77
  fi
  "$PY" -c "import xdist" 2>/dev/null && par+=(-n 4)
  "$PY" -c "import pytest_timeout" 2>/dev/null && par+=(--timeout=60)
  export QLINEAR_CUDA_WGMMA=1
  note "wgmma on"
  # Which GEMM the tests' linear shapes take here (the tests themselves do not say).
  gemm_note "$PY" - <<'EOF' || rc=1
import qlinear as ql

try:
    be = ql.backend("cuda")
except ql.BackendUnavailable as e:
    raise SystemExit(f"the cuda backend is unavailable here: {e.reason}")
shapes = [(65, 48, 5, ql.f16), (130, 272, 136, ql.bf16), (80, 132096, 2, ql.f32),
          (128, 384, 384, ql.bf16), (128, 384, 1536, ql.bf16), (512, 1536, 384, ql.f32),
          (100, 64, 32, ql.f32)]
took = 0
for m, k, n, dt in shapes:
    sku = ql.QuantizedLinearPlan.select(be, ql.QuantizedLinearDescriptor(m, n, k, dt)).sku
    took += "+gemm_wgmma" in sku
    print(f"wgmma on: M={m} K={k} N={n} {dt.name} -> {sku}")
print(f"gemm: the tests' shapes take it at {took} of {len(shapes)}")
EOF
  # shellcheck disable=SC2086
  "$PY" -m pytest -q -p no:cacheprovider --qlinear-backend=cuda --qlinear-require \
    --maxfail=20 --durations=5 "${par[@]}" -k "$WGMMA_K" $WGMMA_TESTS || rc=1
  gemm_note "$PY" benchmarks/sanitize_cases.py --wgmma-sweep || rc=1
  return $rc
}

memcheck() {
  local off=()
  no_wgmma && off=(--no-wgmma)
  gemm_note compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 20 \
    "$PY" benchmarks/sanitize_cases.py "${off[@]}"
}

racecheck() {
  local off=()
  no_wgmma && off=(--no-wgmma)
  gemm_note compute-sanitizer --tool racecheck --error-exitcode 3 --print-limit 20 \
    "$PY" benchmarks/sanitize_cases.py --quick --no-interop "${off[@]}"
}

bench() {
  local off=()
  no_wgmma && off=(--no-wgmma)
  gemm_note "$PY" benchmarks/cuda_bench.py --quick --json "$OUT/cuda_bench.json" "${off[@]}"
}

skip() { echo "$1" >"$SKIP"; echo "SKIP: $1"; exit 77; }

wgsl() {
  if ! "$PY" -c "import wgpu" 2>/dev/null; then
    ls .whl/wgpu-*.whl >/dev/null 2>&1 || skip "wgpu is not installed and no .whl/wgpu-*.whl was carried"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl || skip "the carried wheels in .whl/ did not install"
  fi
  if ! ldconfig -p | grep -q 'libvulkan\.so\.1'; then
    ls .gl/*.deb >/dev/null 2>&1 || skip "no Vulkan loader (libvulkan.so.1) and no .gl/*.deb"
    # Unpacking into / is for the bare GPU machine only, never a developer's own.
    command -v nvidia-smi >/dev/null || skip "no Vulkan loader (libvulkan.so.1) and no NVIDIA driver"
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
  fi
  echo "VK_DRIVER_FILES=${VK_DRIVER_FILES:-}"
  # Exit 3: no NVIDIA adapter to test on (a skip, with the reason); anything else is a fault.
  PYTHONPATH="$PYTHONPATH:$SITE" "$PY" - <<'EOF'
import os
import sys

import wgpu

import qlinear as ql


def fail(why):
    with open(os.environ["SKIP"], "w") as f:
        f.write(why + "\n")
    sys.exit(3)


found = [a.info for a in wgpu.gpu.enumerate_adapters_sync()]
for info in found:
    print(f"adapter: {info.get('device')} | {info.get('adapter_type')} | "
          f"{info.get('backend_type')} | vendor 0x{int(info.get('vendor_id') or 0):04x}")
nvidia = [i for i in found if i.get("vendor_id") == 0x10DE or "nvidia" in str(i).lower()]
if not nvidia:
    names = sorted({f"{i.get('device')} ({i.get('backend_type')})" for i in found})
    fail(f"no NVIDIA adapter (found: {', '.join(names) or 'none'})")
try:
    name = ql.backend("wgpu").device_name
except ql.BackendUnavailable as e:
    fail(f"an NVIDIA adapter is there, but the wgpu backend is unavailable: {e.reason}")
if "nvidia" not in name.lower():
    fail(f"an NVIDIA adapter is there, but the wgpu backend chose {name!r}")
print(f"NVIDIA adapter in use: {name}")
EOF
  local rc=$?
  [[ $rc == 3 ]] && { echo "SKIP: $(cat "$SKIP")"; exit 77; }
  [[ $rc == 0 ]] || echo "the adapter check failed (exit $rc)" >"$SKIP"
  return $rc
}

wgsl_tests() {
  [[ -f "$SKIP" ]] && { echo "SKIP: $(cat "$SKIP")"; exit 77; }
  # shellcheck disable=SC2086
  PYTHONPATH="$PYTHONPATH:$SITE" "$PY" -m pytest -q -p no:cacheprovider \
    --qlinear-backend=wgpu --qlinear-require --maxfail=20 --durations=10 $WGSL_TESTS
}

wgsl_bench() {
  [[ -f "$SKIP" ]] && { echo "SKIP: $(cat "$SKIP")"; exit 77; }
  PYTHONPATH="$PYTHONPATH:$SITE" "$PY" benchmarks/wgpu_bench.py --full --no-cpu \
    --json "$OUT/wgpu_bench.json"
}

export -f note gemm_note facts suite wgmma_smoke no_wgmma suite_wgmma memcheck racecheck bench skip wgsl wgsl_tests wgsl_bench

TOTAL=0
row() { printf '%-11s %4ss of %3ss  %s\n' "$@" | tee -a "$OUT/summary.txt"; }
# step NAME LIMIT LOG FUNCTION: FUNCTION under a LIMIT-second timeout, logged whole to
# $OUT/LOG. ONLY=a,b runs the steps named a or b (and a's sub-steps a-*) alone. What the
# function writes to $NOTE (which GEMM ran) follows its status in the summary.
step() {
  local name=$1 limit=$2 log=$3 fn=$4 t0 rc status lines last
  if [[ -n "${ONLY:-}" && ",$ONLY," != *",$name,"* && ",$ONLY," != *",${name%%-*},"* ]]; then
    row "$name" 0 "$limit" "not run (ONLY=$ONLY)"; return
  fi
  echo; echo "=== $name (at most ${limit}s; log $OUT/$log)"
  export NOTE="$WORK/note.$name"
  lines=$(cat "$OUT/$log" 2>/dev/null | wc -l)
  t0=$SECONDS
  timeout -k 5 "$limit" bash -c "$fn" 2>&1 | tee -a "$OUT/$log" | tail -n 25
  rc=${PIPESTATUS[0]}
  # A failure's row quotes the step's last words (pytest's tally, the sanitizer's count).
  last=$(sed -n "$((lines + 1)),\$p" "$OUT/$log" | grep -v '^[[:space:]]*$' | sed -n '$p' |
    cut -c 1-100)
  case $rc in
    0) status=ok ;;
    77) status="skipped: $(cat "$WORK/skip.$name" 2>/dev/null || cat "$SKIP" 2>/dev/null)" ;;
    124|137) status="TIMED OUT (exit $rc): $last" ;;
    *) status="FAILED (exit $rc): $last" ;;
  esac
  [[ -s "$NOTE" ]] && status+=" -- $(paste -sd ';' "$NOTE" | sed 's/;/; /g')"
  TOTAL=$((TOTAL + SECONDS - t0))
  row "$name" $((SECONDS - t0)) "$limit" "$status"
}

step facts        15 facts.log      facts
step suite       160 suite-cuda.log suite
step wgmma-smoke  20 suite-cuda.log wgmma_smoke
# A smoke test that ran and failed (or hung) keeps the wgmma cases out of the steps after.
if [[ ! -f "$WORK/wgmma-ok" && ( -z "${ONLY:-}" || ",$ONLY," == *",wgmma-smoke,"* ||
      ",$ONLY," == *",wgmma,"* ) ]]; then
  export NO_WGMMA=1
fi
step suite-wgmma  55 suite-cuda.log suite_wgmma
step memcheck     65 sanitize.log   memcheck
step racecheck    45 sanitize.log   racecheck
step bench       100 cuda_bench.log bench
step wgsl         15 wgsl.log       wgsl
step wgsl-tests   35 wgsl.log       wgsl_tests
step wgsl-bench   30 wgsl.log       wgsl_bench

echo; echo "=== summary ($OUT/summary.txt; logs and JSON beside it)"
echo "total ${TOTAL}s" >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
ls "$OUT"
