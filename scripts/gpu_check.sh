#!/usr/bin/env bash
# GPU check of the fused Triton kernels, for a 10-minute slot on a CUDA machine:
#   scripts/gpu_check.sh OUT_DIR
# 1. the kernel tests on CUDA (tests/test_triton_kernels.py: the interpreter suite on the
#    GPU, the real-size suite and equality with the engine and flex paths) -> tests.json
# 2. the GPU benchmark (benchmarks/attention_cuda.py: causal, 2-D, decode), one JSON per
#    section, each with its own time budget so a slow section cannot starve the others.
# 3. the verification record (krause.kernels.verify: device, versions, max error against
#    the reference, speed beside the engine) -> verification.json, and, when the tests
#    passed, added to the records krause.dispatch reads (KRAUSE_GPU_VERIFICATION or
#    ~/.cache/krause/gpu_verification.json): from then on impl="auto" picks the kernels
#    on this GPU model with this Triton version. Copy the record to
#    krause/kernels/gpu_verification.json to ship it with the package.
# Worst case 200 + 120 + 180 + 110 + 85 s of timeouts: inside 12 minutes.
# Uses only what is installed (python with torch + triton; pytest for step 1): the
# project goes on PYTHONPATH, nothing is installed or downloaded. PYTHON overrides the
# interpreter. Exit status: 0 when every test passed, 1 otherwise (benchmarks still run).
set -u
if [ $# -ne 1 ]; then
    echo "usage: scripts/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
out=$1
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
py=${PYTHON:-python3}
cd "$root"

"$py" - "$out/environment.json" <<'EOF'
import json, sys, torch
info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda}
try:
    import triton
    info["triton"] = triton.__version__
except Exception as exc:
    info["triton_error"] = repr(exc)
if torch.cuda.is_available():
    info["gpu"] = torch.cuda.get_device_name()
    info["capability"] = list(torch.cuda.get_device_capability())
from krause.kernels import triton_available
info["triton_available"] = list(triton_available())
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info))
EOF

if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device here (see $out/environment.json)" >&2
    exit 2
fi

status=0
if "$py" -c "import pytest" 2>/dev/null; then
    timeout 200 "$py" -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py \
        --junitxml "$out/tests.xml" -o junit_family=xunit1 2>&1 | tee "$out/tests.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    "$py" - "$out/tests.xml" "$out/tests.json" <<'EOF' || status=1
import json, sys, xml.etree.ElementTree as ET
cases = []
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    outcome = "passed"
    for tag in ("failure", "error", "skipped"):
        node = case.find(tag)
        if node is not None:
            outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
            message = (node.get("message") or "")[:500]
            break
    else:
        message = ""
    cases.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)), "message": message})
summary = {o: sum(c["outcome"] == o for c in cases) for o in ("passed", "failed", "error", "skipped")}
json.dump({"summary": summary, "cases": cases}, open(sys.argv[2], "w"), indent=2)
print("tests:", summary)
sys.exit(0 if summary["failed"] == 0 and summary["error"] == 0 and summary["passed"] > 0 else 1)
EOF
else
    echo '{"summary": "pytest is not installed on this machine"}' > "$out/tests.json"
    status=1
fi

passed=$((1 - status))
install=""
[ "$passed" -eq 1 ] && install="--install"
timeout 120 "$py" -m krause.kernels.verify --out "$out/verification.json" --tests-passed "$passed" $install \
    2>&1 | tee "$out/verification.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

bench() {  # SECTION BUDGET_S EXTRA_ARGS...
    local section=$1 budget=$2
    shift 2
    timeout $((budget + 60)) "$py" -m benchmarks.attention_cuda --only "$section" --repeats 3 \
        --budget-s "$budget" --out "$out/attention_cuda_$section.json" "$@" 2>&1 | tee "$out/bench_$section.log"
}
bench causal 120 --causal-tokens 16384 4096 65536 8192 32768
bench 2d 50
bench decode 25
echo "gpu_check: wrote $out (tests status $status)"
exit $status
