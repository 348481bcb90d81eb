#!/usr/bin/env bash
# Wheels that a lent GPU machine lacks (its image has torch, scipy, scikit-image, matplotlib,
# safetensors, click and tqdm, but not these), for its Python 3.12, into device-carry/whl
# (ignored by git; carry it). SimpleITK (50 MB) is left out: only NRRD, MHA and DICOM reading
# need it, and the GPU checks read NIfTI. --no-deps: the image's torch (2.11) must satisfy monai's
# own requirement (torch >= 2.8 for monai 1.6). Run on a machine with PyPI access, inside the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
version() {  # the version installed here, so the GPU machine runs what the tests ran
    local v
    v=$(python3 -m pip show "$1" 2>/dev/null | awk '/^Version/{print $2}')
    [ -n "$v" ] || { echo "$1 is not installed here: run this inside the project's venv" >&2; exit 1; }
    echo "$v"
}
mkdir -p device-carry/whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d device-carry/whl "monai==$(version monai)" "nibabel==$(version nibabel)" "pydicom==$(version pydicom)" \
    "highdicom==$(version highdicom)" "connected-components-3d==$(version connected-components-3d)" \
    "tomli-w==$(version tomli_w)" "pyjpegls==$(version pyjpegls)"
du -sh device-carry/whl
