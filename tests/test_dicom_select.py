"""DICOM series selection by vendor naming (tumorseg.dicom.select), the [dicom] rules from
configuration, and stacking tolerances (stack.py): names and headers real scanners write that the
default rules once got wrong."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tumorseg.dicom.select import SelectionRules, classify_series, select_series
from tumorseg.dicom.series import PatientStudy, SeriesInfo
from tumorseg.errors import ConfigError, SequenceError


def _info(description: str, protocol: str | None = None, **changes) -> SeriesInfo:
    base = SeriesInfo(series_uid="1.2.3", study_uid="1.2", frame_of_reference_uid="1.2.4",
                      sop_class_uid="1.2.840.10008.5.1.4.1.1.4", modality="MR", series_number=1,
                      series_description=description,
                      protocol_name=description if protocol is None else protocol,
                      image_type=("ORIGINAL", "PRIMARY", "M", "ND"), contrast_agent="", sequence_name="",
                      paths=(Path("x"),), patient=PatientStudy(*[""] * 9))
    return replace(base, **changes)


@pytest.mark.parametrize("description, expected", [
    # Siemens SPACE FLAIR ("da-fl" = dark fluid) is a FLAIR, not a T2.
    ("t2_spc_da-fl_sag_p2_iso", "flair"), ("t2_spc_da-fl_irprep_sag_p2_iso", "flair"),
    # A Siemens TIRM named as a STIR (or fat-suppressed) is not a FLAIR, nor a T2; a bare TIRM is FLAIR.
    ("t2_tirm_cor", "flair"), ("t2_tirm_cor_stir", None), ("t2_tirm_tra_fs", None), ("T2_STIR_COR", None),
    ("t2_tirm_tra_dark-fluid_fs", "flair"),
    # T2*-weighted gradient echo (Philips FFE, GE MERGE) is not a T2.
    ("T2W_FFE", None), ("T2_FFE", None), ("AX T2 MERGE", None),
])
def test_sequence_is_not_swapped(description, expected):
    assert classify_series(_info(description))[0] == expected


@pytest.mark.parametrize("description, expected", [
    # MPRAGE named "mpr" (Siemens t1_mpr_ns, HCP/ABCD T1w_MPR) is an acquisition, not a reformat.
    ("t1_mpr_ns_sag_p2_iso", "t1"), ("T1w_MPR", "t1"), ("ABCD_T1w_MPR_vNav", "t1"), ("T1_MPR_SAG_POST", "t1gd"),
    # Philips and GE 3D T1.
    ("sT1W_3D_TFE", "t1"), ("sT1W_3D_TFE_Gd", "t1gd"), ("Ax 3D FSPGR", "t1"), ("Sag FSPGR 3D +C", "t1gd"),
    # A flip angle is not fractional anisotropy.
    ("t1_vibe_fa12", "t1"), ("T1 3D FSPGR FA12", "t1"),
])
def test_common_anatomical_series_are_recognised(description, expected):
    assert classify_series(_info(description))[0] == expected


@pytest.mark.parametrize("description", ["T1 prae KM", "T1 prä KM", "T1 v. KM", "t1_se_tra_prae_KM"])
def test_german_pre_contrast_is_not_contrast(description):
    assert classify_series(_info(description))[0] == "t1"


@pytest.mark.parametrize("agent", ["NONE", "None", "No", "N", "NO CONTRAST", "n/a"])
def test_contrast_agent_that_says_none_is_no_contrast(agent):
    assert classify_series(_info("AX T1 SE", contrast_agent=agent))[0] == "t1"


@pytest.mark.parametrize("protocol", ["BRAIN W WO CONTRAST", "MRI BRAIN W/ & W/O CONTRAST", "BRAIN PRE/POST",
                                      "BRAIN TUMOR PERFUSION", "BRAIN TUMOR W/WO + DTI", "BRAIN SWAN"])
def test_ge_exam_protocol_name_does_not_decide(protocol):
    """GE's ProtocolName is the exam's protocol (the same for every series; the user cannot edit it);
    the series is told by its SeriesDescription."""
    assert classify_series(_info("AX T1 POST", protocol))[0] == "t1gd"
    assert classify_series(_info("AX T1", protocol))[0] == "t1"
    assert classify_series(_info("Ax T2 FLAIR", protocol))[0] == "flair"


@pytest.mark.parametrize("data", [
    {"contrast_patterns": "GADO"},                                              # a string, not a list
    {"rules": [{"sequence": "flair", "include": "FLAIR"}]},                     # a string, not a list
    {"rules": [{"sequence": "t1gd", "include": ["T1"], "contrast": "yes"}]},    # not a bool
    {"rules": [{"sequence": "flair", "include": ["FLAIR"], "excludes": ["X"]}]},  # unknown key
    {"rules": [{"sequence": "flair", "include": [1]}]},                         # not text
    {"skip_derived": "false"},
])
def test_malformed_rules_are_refused(data):
    with pytest.raises(ConfigError):
        SelectionRules.from_mapping(data)


def test_one_series_named_for_two_sequences_is_refused():
    a, b = _info("t2_tirm_tra_dark-fluid", series_uid="1.1", series_number=2), _info("t1_se", series_uid="1.2",
                                                                                       series_number=3)
    with pytest.raises(SequenceError):
        select_series([a, b], explicit={"flair": 2, "t2": 2})


def test_oblique_series_with_cosines_to_four_decimals_is_not_called_tilted(tmp_path):
    """The decubitus series turned 25 degrees about (0, 1, 1), IOP and IPP written to 4 decimals (as
    test_oblique_cosines_stored_to_four_decimals_are_read does for another rotation): refused as
    gantry tilt of '0.00 degrees' (0.014 mm off the normal); dcm2niix converts it."""
    import pydicom
    from conftest import shared_data
    from tumorseg.dicom.volume import read_series

    axis = np.array([0.0, 1.0, 1.0]) / np.sqrt(2)
    a = np.radians(25)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k
    src = shared_data("dicom", "decubitus-t1", "HFS")
    for p in sorted(src.iterdir()):
        ds = pydicom.dcmread(p)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient]).reshape(2, 3) @ rot.T
        ds.ImageOrientationPatient = [f"{v:.4f}" for v in iop.ravel()]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in rot @ [float(v) for v in ds.ImagePositionPatient]]
        ds.save_as(tmp_path / p.name)
    read_series(tmp_path)


def test_a_series_found_in_two_given_folders_is_one_candidate(tmp_path, monkeypatch):
    """read_dicom_study([study, study/s2]): the same series twice must not be 'two candidates' that
    no SeriesInstanceUID can tell apart."""
    import tumorseg.dicom.study as study

    a = _info("t2_tirm_tra_dark-fluid", series_uid="1.1", series_number=2,
              paths=(tmp_path / "s2" / "IM1", tmp_path / "s2" / "IM2"))
    b = replace(a, paths=(tmp_path / "s2" / "IM1",))
    merged = study._merge_same_series([a, b])
    assert len(merged) == 1 and len(merged[0].paths) == 2
    assert select_series(merged)["flair"].series_uid == "1.1"
