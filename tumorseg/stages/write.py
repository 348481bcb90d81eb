"""Write stage: the label map as uint8 NIfTI on the input's exact grid, written atomically.

When the reference input was NIfTI (version 1 or 2) its header is copied, so shape, qform, sform
and their codes are the input's bit for bit (its free-text fields are blanked); otherwise (NRRD,
MHA) qform and sform are both set to the affine with code 1 (scanner).
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from ..atomic import atomic_path
from ..scan import LabelMap


#: Header text fields copied from the input that are blanked (``descrip`` is overwritten).
#: NIfTI-2 has no ``db_name``.
FREE_TEXT_FIELDS = ("aux_file", "db_name", "intent_name")


def label_map_image(labels: LabelMap) -> nib.Nifti1Image | nib.Nifti2Image:
    array = np.asarray(labels.array, dtype=np.uint8)
    source = labels.source
    if array.shape != source.shape:
        raise ValueError(f"label map {array.shape} is not on the input grid {source.shape}")
    if source.nifti_header is not None:
        # The input's NIfTI version too: a NIfTI-2 header is 540 bytes, NIfTI-1's 348.
        nifti2 = len(source.nifti_header) == nib.Nifti2Header.sizeof_hdr
        header = (nib.Nifti2Header if nifti2 else nib.Nifti1Header)(source.nifti_header)
        header.set_data_dtype(np.uint8)
        header.set_data_shape(array.shape)
        header["scl_slope"], header["scl_inter"] = 1.0, 0.0
        header["cal_min"], header["cal_max"] = 0.0, float(labels.scheme.max_label)
        header["intent_code"] = 1002  # NIFTI_INTENT_LABEL
        header["descrip"] = b"tumorseg label map"
        for field in FREE_TEXT_FIELDS:  # may hold what a scanner or a user wrote about the patient
            if field in header:
                header[field] = b""
        image = (nib.Nifti2Image if nifti2 else nib.Nifti1Image)(array, None, header=header)
    else:
        image = nib.Nifti1Image(array, source.affine)
        image.header.set_qform(source.affine, code=1)
        image.header.set_sform(source.affine, code=1)
        image.header.set_intent("label")
    return image


def write_label_map(labels: LabelMap, path: Path) -> Path:
    """Write ``labels`` to ``path`` (.nii or .nii.gz) atomically and return the path."""
    image = label_map_image(labels)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return path
