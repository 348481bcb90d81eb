#!/usr/bin/env bash
# Wheels that a lent GPU machine lacks (its image has torch, scipy, scikit-image, matplotlib,
# safetensors, click and tqdm, but not these), for its Python 3.12, into device-carry/whl
# (ignored by git; carry it). SimpleITK (50 MB) is left out: only NRRD, MHA and DICOM reading
# need it, and the GPU checks read NIfTI. Run on a machine with PyPI access, inside the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
version() { python3 -m pip show "$1" | awk '/^Version/{print $2}'; }
mkdir -p device-carry/whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d device-carry/whl "monai==$(version monai)" "nibabel==$(version nibabel)" "pydicom==$(version pydicom)" \
    "highdicom==$(version highdicom)" "connected-components-3d==$(version connected-components-3d)" \
    "tomli-w==$(version tomli_w)" "pyjpegls==$(version pyjpegls)" pillow-jpls
du -sh device-carry/whl
