"""Write stage: the label map as uint8 NIfTI on the input's exact grid, written atomically.

When the reference input was NIfTI (version 1 or 2) its header is copied, so shape, qform, sform
and their codes are the input's bit for bit (its free-text fields are blanked); otherwise (NRRD,
MHA) qform and sform are both set to the affine with code 1 (scanner), or, for a sheared affine (a
tilted acquisition) that no qform can hold, the sform alone: a reader then places every voxel
exactly or, as ITK does, refuses the file, never placing it by an approximation.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from ..atomic import atomic_path
from ..scan import LabelMap, SourceGeometry


#: Header text fields copied from the input that are blanked (``descrip`` is overwritten); they may
#: hold what a scanner or a user wrote about the patient. NIfTI-2 has no ``db_name`` or ``data_type``.
FREE_TEXT_FIELDS = ("aux_file", "db_name", "intent_name", "data_type")
#: Voxel axes this far from perpendicular (cosine of their angle) make an affine sheared.
SHEAR_TOLERANCE = 1e-4


def label_map_image(labels: LabelMap) -> nib.Nifti1Image | nib.Nifti2Image:
    if labels.array.shape != labels.source.shape:
        raise ValueError(f"label map {labels.array.shape} is not on the input grid {labels.source.shape}")
    return _on_source_grid(np.asarray(labels.array, dtype=np.uint8), labels.source, b"tumorseg label map",
                           label_max=float(labels.scheme.max_label))


def _on_source_grid(array: np.ndarray, source: SourceGeometry, descrip: bytes,
                    label_max: float | None = None) -> nib.Nifti1Image | nib.Nifti2Image:
    """``array`` as a NIfTI image with the reference input's header (or its affine); a label map
    when ``label_max`` is given (intent label, display range 0 to it)."""
    if source.nifti_header is not None:
        # The input's NIfTI version too: a NIfTI-2 header is 540 bytes, NIfTI-1's 348.
        nifti2 = len(source.nifti_header) == nib.Nifti2Header.sizeof_hdr
        header = (nib.Nifti2Header if nifti2 else nib.Nifti1Header)(source.nifti_header)
        header.set_data_dtype(array.dtype)
        header.set_data_shape(array.shape)
        header["scl_slope"], header["scl_inter"] = 1.0, 0.0
        header["cal_min"], header["cal_max"] = (0.0, label_max) if label_max is not None else (0.0, 0.0)
        header["intent_code"] = 1002 if label_max is not None else 0  # NIFTI_INTENT_LABEL
        header["descrip"] = descrip
        for field in FREE_TEXT_FIELDS:  # may hold what a scanner or a user wrote about the patient
            if field in header:
                header[field] = b""
        image = (nib.Nifti2Image if nifti2 else nib.Nifti1Image)(array, None, header=header)
    else:
        image = nib.Nifti1Image(array, source.affine)
        if is_sheared(source.affine):
            image.header.set_qform(None, code=0)
        else:
            image.header.set_qform(source.affine, code=1)
        image.header.set_sform(source.affine, code=1)
        if label_max is not None:
            image.header.set_intent("label")
    return image


def is_sheared(affine: np.ndarray) -> bool:
    """The affine's voxel axes are not perpendicular: no qform (a rotation and voxel sizes) holds it."""
    axes = np.asarray(affine, dtype=np.float64)[:3, :3]
    axes = axes / np.linalg.norm(axes, axis=0)
    off_diagonal = axes.T @ axes - np.eye(3)
    return bool(np.abs(off_diagonal).max() > SHEAR_TOLERANCE)


def write_label_map(labels: LabelMap, path: Path) -> Path:
    """Write ``labels`` to ``path`` (.nii or .nii.gz) atomically and return the path."""
    image = label_map_image(labels)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return path


def write_on_source_grid(array: np.ndarray, source: SourceGeometry, path: Path, description: str,
                         mask: bool = False) -> Path:
    """Write (I, J, K) ``array`` on the reference input's grid to ``path`` atomically, with the
    reference's header as the label map: float32 (a registered sequence, for checking in a viewer),
    or with ``mask`` uint8 0/1 marked as a label map (the brain mask)."""
    if array.shape != source.shape:
        raise ValueError(f"image {array.shape} is not on the input grid {source.shape}")
    values = np.asarray(array, dtype=np.uint8 if mask else np.float32)
    image = _on_source_grid(values, source, description.encode()[:79], label_max=1.0 if mask else None)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return path
