#!/usr/bin/env bash
# Every GPU check of issue 6 in one run on a lent H100/H200 (at most about 9 minutes), results in $OUT:
#   device tool: run(command="bash benchmarks/gpu_session.sh", carry=["device-carry"], timeout_s=600)
# after benchmarks/fetch_device_wheels.sh has filled device-carry/whl. Each step is bounded by
# `timeout` (570 s together, leaving room for the install inside 600 s); each log lands in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-session-results}
mkdir -p "$OUT"
if compgen -G "device-carry/whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        device-carry/whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...
    local name=$1 seconds=$2; shift 2
    echo "== $name: $*"
    timeout "$seconds" "$@" 2>&1 | tee "$OUT/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]}"
}
step device 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step inference 220 python3 benchmarks/gpu_inference.py --repeats 5 --compile --profile
step memory 90 python3 benchmarks/gpu_inference.py --shape 512,512,400 --memory-budget-gb 24 --tumorseg-only --repeats 1
step transfer 20 python3 benchmarks/batch_transfer.py
step throughput-default 60 python3 benchmarks/pipeline_throughput.py --cases 20 --workers 12 --device cuda
nnunet=(--random-model 32,64,128,256,320,320 --windows-per-batch 18)
step throughput-nnunet 80 python3 benchmarks/pipeline_throughput.py --cases 20 --workers 12 --device cuda "${nnunet[@]}"
step throughput-nnunet-tta 80 python3 benchmarks/pipeline_throughput.py --cases 20 --workers 12 --device cuda "${nnunet[@]}" --tta
