#!/usr/bin/env bash
# Leave-one-out folds of the default model's recipe (benchmarks/leave_one_out.py) on a lent GPU
# machine, in one run of at most about 9.5 minutes. The synthetic data (13 GB) is made there.
#
#   bash benchmarks/loo_gpu.sh --prepare        # here: fills device-carry/loo (wheels, brats2015-dev)
#   device tool: run(command="bash benchmarks/loo_gpu.sh brats_2013_pat0004_1 ...", carry=["device-carry/loo"], timeout_s=600)
#
# Each fold comes back as one file, $OUT/CASE.tar (a device run returns at most 8): CASE/CASE.json (the
# held-out scores), CASE/CASE.log, and each step's card, weights and training log (whatever
# finished). For a dry run on a CPU:
#   SYNTH=existing-synth-train DEVICE=cpu DEADLINE=3600 LOO_ARGS="--epochs 1 --iterations 2" OUT=/tmp/o \
#       bash benchmarks/loo_gpu.sh CASE
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=device-carry/loo

if [ "${1:-}" = "--prepare" ]; then  # run inside the project's venv, with ../shared/data
    set -e
    # What the GPU image lacks for training, scoring and tumorseg synth (the MNI template ships in nilearn).
    bash benchmarks/fetch_device_wheels.sh "$CARRY/whl" monai nibabel pydicom connected-components-3d tomli-w nilearn
    for case in ../shared/data/brats2015-dev/*/; do  # the images, truth and licence; not the brain masks
        mkdir -p "$CARRY/brats2015-dev/$(basename "$case")"
        cp "$case"/Flair_* "$case"/T1c_* "$case"/OTMultiClass* "$case"/License* "$CARRY/brats2015-dev/$(basename "$case")/"
    done
    du -sh "$CARRY"
    exit 0
fi

for case in "$@"; do  # before any device time is spent
    grep -q "\"$case\"" benchmarks/leave_one_out.py || { echo "$case: not one of leave_one_out.IN_TRAINING"; exit 2; }
done
[ $# -ge 1 ] || { echo "usage: bash benchmarks/loo_gpu.sh CASE... (or --prepare)"; exit 2; }
DEADLINE=${DEADLINE:-540}  # seconds from the start by which the folds are stopped, so the tars still come back
OUT=${OUT:-loo-gpu-results}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
python3 -c "import monai, nibabel, pydicom, cc3d, tomli_w, nilearn" 2>/dev/null ||
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$CARRY"/whl/*.whl || exit 1
cores=$(nproc)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "$cores cores; folds: $*"
# A few seconds of the same training and scoring first, so that a failure costs little device time.
smoke=(--dataset "$CARRY/brats2015-dev" --label-scheme brats2015 -o /tmp/smoke --epochs 1 --iterations 3
       --patch-size 64,64,64 --spacing 1.5,1.5,1.5 --filters 16,32,64,128 --validation-fraction 0.25 -q)
case=$(ls "$CARRY/brats2015-dev" | head -1)
rm -rf /tmp/smoke /tmp/smoke-out
timeout 120 python3 -m tumorseg.cli train "${smoke[@]}" --device "${DEVICE:-cuda}" --workers 2 &&
    timeout 60 python3 -m tumorseg.cli predict --model /tmp/smoke --device "${DEVICE:-cuda}" -o /tmp/smoke-out -q \
        --flair "$CARRY/brats2015-dev/$case"/Flair_*.nii.gz --t1gd "$CARRY/brats2015-dev/$case"/T1c_*.nii.gz ||
    { echo "smoke test failed"; exit 1; }
started=$SECONDS
SYNTH=${SYNTH:-/tmp/synth}  # an existing complete set is only checked
timeout 200 python3 -m tumorseg.cli synth -o "$SYNTH" --cases 240 --seed 1000 --generator-version 1 \
    --workers "$cores" -q || exit 1
echo "synthetic data: $((SECONDS - started)) s"
left=$(( DEADLINE - SECONDS ))
[ "$left" -ge 60 ] || { echo "only $left s left before DEADLINE for the folds"; exit 1; }
started=$SECONDS
# Every fold at once, each with its share of the cores; folds after the second at low priority, so
# that the first two finish in time even where the cores are slower than expected.
workers=$(( cores / ($# < 2 ? 1 : 2) - 1 ))
i=0
for case in "$@"; do
    priority=$(( i++ < 2 ? 0 : 19 ))
    mkdir -p "/tmp/loo/$case"
    timeout "$left" nice -n $priority python3 benchmarks/leave_one_out.py --synth "$SYNTH" --brats "$CARRY/brats2015-dev" \
        -o /tmp/loo --case "$case" --json "/tmp/loo/$case/$case.json" --device "${DEVICE:-cuda}" --workers "$workers" \
        ${LOO_ARGS:-} >"/tmp/loo/$case/$case.log" 2>&1 &
done
wait
echo "folds: $((SECONDS - started)) s"
for case in "$@"; do
    (cd /tmp/loo && ls -d "$case/$case".{json,log} "$case"/step*/{model.toml,model.safetensors,training.json} 2>/dev/null |
        tar -cf "$OUT/$case.tar" -T -)  # whatever finished
    grep -a "held out\|Error\|error" "/tmp/loo/$case/$case.log" | tail -3
done
ls -la "$OUT"
