#!/usr/bin/env bash
# Wheels that a lent GPU machine lacks (its image has torch, scipy, scikit-image, matplotlib,
# safetensors, click and tqdm, but not these), for its Python 3.12, into device-carry/whl
# (ignored by git; carry it), or into DEST with only the PACKAGEs named:
#   bash benchmarks/fetch_device_wheels.sh [DEST PACKAGE...]
# SimpleITK (50 MB) is left out: only NRRD, MHA and DICOM reading need it, and the GPU checks read
# NIfTI. --no-deps: the image's torch (2.11) must satisfy monai's
# own requirement (torch >= 2.8 for monai 1.6). Run on a machine with PyPI access, inside the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
version() {  # the version installed here, so the GPU machine runs what the tests ran
    local v
    v=$(python3 -m pip show "$1" 2>/dev/null | awk '/^Version/{print $2}')
    [ -n "$v" ] || { echo "$1 is not installed here: run this inside the project's venv" >&2; exit 1; }
    echo "$v"
}
dest=${1:-device-carry/whl}
shift $(( $# > 0 ))
packages=("$@")
[ $# -gt 0 ] || packages=(monai nibabel pydicom highdicom connected-components-3d tomli-w pyjpegls)
pins=()
for package in "${packages[@]}"; do pins+=("$package==$(version "$package")"); done
mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" "${pins[@]}"
du -sh "$dest"
