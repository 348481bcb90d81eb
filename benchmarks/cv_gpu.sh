#!/usr/bin/env bash
# Cross-validation folds of benchmarks/cross_validation.py trained on a lent GPU machine, in one run
# of under 10 minutes; the scoring runs afterwards here, on the original files (--no-train).
#
#   bash benchmarks/cv_gpu.sh --prepare   # here, venv active, with ../shared/data: fills device-carry/cv
#   device tool: run(command="bash benchmarks/cv_gpu.sh 0 1 2", carry=["device-carry/cv"], timeout_s=600)
#   here: mkdir -p cv && cat FILES_AT/cv-gpu.tar.* | tar -x -C cv
#         python benchmarks/cross_validation.py --dataset ../shared/data/brats2018-train:brats2021 \
#             --dataset ../shared/data/brats2015-dev:brats2015 -o cv --fold 0 --fold 1 --fold 2 --no-train
#
# The carry (64 MiB in all) holds the wheels the GPU image lacks, the folds made here on the original
# files (folds.json; the device run takes them as recorded) and the real cases as training prepares
# them before normalising: on RAS axes at the recipe's 1.5 mm, so that the device's own preparation
# resamples nothing (the lossless originals take 110 MB even cropped to the brain and xz-compressed). Training there sees what a run here would, up to the rounding of interpolated
# scanner values to integers. Arguments: fold numbers, or `final` for the model trained on every case.
# What comes back: OUT/cv-gpu.tar, split into 15 MiB parts (a device run returns at most 8 files of
# 16 MiB): each fold's card, weights and training log when finished, else its checkpoint (weights and
# AdamW state, about 68 MB) while the parts stay within 8, to resume here (cross_validation.py resumes
# it). The scoring on the cropped grid that cross_validation.py does there is a quick look only.
# For a dry run on a CPU:
#   DEVICE=cpu CV_ARGS="--epochs 1 --iterations 2" DEADLINE=1800 OUT=/tmp/o bash benchmarks/cv_gpu.sh 0
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=device-carry/cv

if [ "${1:-}" = "--prepare" ]; then
    set -e
    rm -rf "$CARRY" && mkdir -p "$CARRY"
    bash benchmarks/fetch_device_wheels.sh "$CARRY/whl" monai nibabel pydicom connected-components-3d tomli-w
    python3 - "$CARRY" <<'EOF'
import sys, tarfile, tempfile
from pathlib import Path
import nibabel as nib
import numpy as np
sys.path.insert(0, "benchmarks")
import cross_validation as cv
from tumorseg.stages import geometry, read
from tumorseg.datasets import discover_cases
carry, data = Path(sys.argv[1]), Path("../shared/data")
spacing = tuple(float(v) for v in cv.RECIPE[cv.RECIPE.index("--spacing") + 1].split(","))
with tempfile.TemporaryDirectory() as tmp, tarfile.open(carry / "cases.tar.xz", "w:xz", preset=9) as tar:
    for name, scheme in (("brats2018-train", "brats2021"), ("brats2015-dev", "brats2015")):
        for case in discover_cases(data / name, scheme):
            # On RAS axes at the recipe's spacing, so that the device's own preparation resamples
            # nothing; the whole field of view, so that it finds the same background and brain.
            scan = read.read_study(case.inputs)
            transform = geometry.plan_transform(scan, spacing)
            on_grid = geometry.to_model_grid(scan, transform)
            truth = np.rint(np.asarray(nib.load(str(case.label_path)).dataobj)).astype(np.uint8)
            outputs = {path.name: on_grid.array[i] for i, (_, path) in enumerate(case.inputs.files)}
            outputs[case.label_path.name] = geometry.labels_to_model_grid(truth, transform)
            for filename, array in outputs.items():
                if name == "brats2018-train" and array.dtype != np.uint8:
                    array = np.rint(array).astype(np.int16)  # scanner integers, interpolated
                out = Path(tmp, name, case.case_id, filename.removesuffix(".gz"))  # xz packs .nii better
                out.parent.mkdir(parents=True, exist_ok=True)
                nib.save(nib.Nifti1Image(array, on_grid.affine), str(out))
                tar.add(out, arcname=str(out.relative_to(tmp)))
    for licence in sorted((data / "brats2015-dev").glob("*/License*")):
        tar.add(licence, arcname=str(Path("brats2015-dev", licence.parent.name, licence.name)))
EOF
    # The folds, made on the original files; the device run refuses to train others.
    rm -rf /tmp/cv-plan && python3 -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path
import cross_validation as cv
cv.fold_plan([(Path('../shared/data/brats2018-train'), 'brats2021'), (Path('../shared/data/brats2015-dev'), 'brats2015')], 5, 0, Path('/tmp/cv-plan'))"
    cp /tmp/cv-plan/folds.json "$CARRY/folds.json"
    du -sh "$CARRY"/* "$CARRY"
    exit 0
fi

[ $# -ge 1 ] || { echo "usage: bash benchmarks/cv_gpu.sh FOLD... (0-4 or final), or --prepare"; exit 2; }
for fold in "$@"; do
    [[ "$fold" =~ ^([0-4]|final)$ ]] || { echo "$fold: give a fold number 0-4 or final"; exit 2; }
done
[ -f "$CARRY/cases.tar.xz" ] || { echo "no $CARRY/cases.tar.xz: run bash benchmarks/cv_gpu.sh --prepare first"; exit 2; }
DEADLINE=${DEADLINE:-520}  # seconds from the start by which training stops, so the parts still come back
OUT=${OUT:-cv-gpu-results}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-/tmp/cv-gpu}
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
python3 -c "import monai, nibabel, pydicom, cc3d, tomli_w" 2>/dev/null ||
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$CARRY"/whl/*.whl || exit 1
rm -rf "$WORK/data" && mkdir -p "$WORK/data" "$WORK/cv" && tar -xJf "$CARRY/cases.tar.xz" -C "$WORK/data" || exit 1
cp "$CARRY/folds.json" "$WORK/cv/folds.json"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
cores=$(nproc)
echo "$cores cores; folds: $*; data: $(du -sh "$WORK/data" | cut -f1)"
started=$SECONDS
workers=$(( cores / $# - 1 ))
[ "$workers" -ge 1 ] || workers=1
for fold in "$@"; do
    timeout $(( DEADLINE - SECONDS )) python3 benchmarks/cross_validation.py \
        --dataset "$WORK/data/brats2018-train:brats2021" --dataset "$WORK/data/brats2015-dev:brats2015" -o "$WORK/cv" \
        --fold "$fold" --no-subsets --no-tta --device "${DEVICE:-cuda}" --workers "$workers" ${CV_ARGS:-} \
        >"$WORK/cv/fold-$fold.log" 2>&1 &
done
wait
echo "training: $((SECONDS - started)) s"
# Finished folds first (card, weights, log), then checkpoints of unfinished ones while 8 parts hold them.
cd "$WORK/cv"
list=(folds.json fold-*.log)
budget=$(( 8 * 15 * 1024 * 1024 ))
used=0
for fold in "$@"; do
    dir=$([ "$fold" = final ] && echo final || echo "fold$fold")
    if [ -f "$dir/model.toml" ]; then
        list+=("$dir/model.toml" "$dir/model.safetensors" "$dir/training.json")
        used=$(( used + $(stat -c %s "$dir/model.safetensors") ))
    fi
done
for fold in "$@"; do
    dir=$([ "$fold" = final ] && echo final || echo "fold$fold")
    if [ ! -f "$dir/model.toml" ] && [ -f "$dir/checkpoint.pt" ]; then
        size=$(stat -c %s "$dir/checkpoint.pt")
        if [ $(( used + size )) -lt "$budget" ]; then list+=("$dir/checkpoint.pt"); used=$(( used + size )); else
            echo "$dir: checkpoint left out (the parts would exceed 8 files of 16 MiB)"; fi
    fi
    tail -2 "fold-$fold.log"
done
tar -cf - "${list[@]}" 2>/dev/null | split -b 15M -d - "$OUT/cv-gpu.tar."
ls -la "$OUT"
