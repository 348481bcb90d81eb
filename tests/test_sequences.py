"""Unit tests of tumorseg.sequences: file-name recognition and mapping inputs to sequences."""
from __future__ import annotations

from pathlib import Path

import pytest

from tumorseg.errors import SequenceError
from tumorseg.sequences import (
    SEQUENCES,
    StudyInputs,
    assign_sequences,
    parse_sequence,
    sequence_from_filename,
)

from conftest import shared_data


def never_4d(path: Path) -> bool:
    return False


@pytest.mark.parametrize(
    "name, expected",
    [
        # BraTS 2023
        ("BraTS-GLI-00001-000-t2f.nii.gz", "flair"),
        ("BraTS-GLI-00001-000-t1n.nii.gz", "t1"),
        ("BraTS-GLI-00001-000-t1c.nii.gz", "t1gd"),
        ("BraTS-GLI-00001-000-t2w.nii.gz", "t2"),
        # BraTS 2018-2021
        ("x_flair.nii.gz", "flair"),
        ("x_t1.nii.gz", "t1"),
        ("x_t1ce.nii.gz", "t1gd"),
        ("x_t2.nii.gz", "t2"),
        ("BraTS2021_00000_flair.nii", "flair"),
        # BraTS 2015 (DeepMedic examples)
        ("Flair_subtrMeanDivStd.nii.gz", "flair"),
        ("T1c_subtrMeanDivStd.nii.gz", "t1gd"),
        # other suffixes and case
        ("case-t1c.nrrd", "t1gd"),
        ("case_T2.NRRD", "t2"),
        ("case_flair.nhdr", "flair"),
        ("case_t1gd.mha", "t1gd"),
        ("X_FLAIR.NII.GZ", "flair"),
    ],
)
def test_recognised_names(name, expected):
    assert sequence_from_filename(Path("/data/some dir") / name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "scan.nii.gz",
        "brain1_image.nrrd",
        "patient_0001.nii.gz",  # nnU-Net channel suffixes are not read
        "brainmask.nii.gz",
        "OTMultiClass.nii.gz",
        "t1000.nii.gz",  # 't1' must be a whole token
    ],
)
def test_unrecognised_names_give_none(name):
    assert sequence_from_filename(Path(name)) is None


def test_directory_part_is_not_read():
    assert sequence_from_filename(Path("/data/flair/scan.nii.gz")) is None


@pytest.mark.parametrize("name, found", [
    ("x_t1_t2.nii.gz", ("t1", "t2")),
    ("flair-t1c.nii.gz", ("flair", "t1gd")),
])
def test_ambiguous_names_are_refused(name, found):
    with pytest.raises(SequenceError) as info:
        sequence_from_filename(Path(name))
    message = str(info.value)
    assert name in message
    assert "several sequences" in message
    for seq in found:
        assert f"--{seq}" in message


def test_bids_contrast_enhanced_t1w_is_not_native_t1():
    try:
        seq = sequence_from_filename(Path("sub-01_ce-gadolinium_T1w.nii.gz"))
    except SequenceError:
        return  # refusing is also acceptable
    assert seq == "t1gd"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("flair", "flair"), ("FLAIR", "flair"), ("t2f", "flair"), (" T2FLAIR ", "flair"),
        ("t1", "t1"), ("t1n", "t1"), ("T1w", "t1"),
        ("t1gd", "t1gd"), ("t1c", "t1gd"), ("t1ce", "t1gd"), ("T1post", "t1gd"),
        ("t2", "t2"), ("t2w", "t2"),
    ],
)
def test_parse_sequence_aliases(name, expected):
    assert parse_sequence(name) == expected


@pytest.mark.parametrize("name", ["dwi", "t3", "", "adc"])
def test_parse_sequence_unknown(name):
    with pytest.raises(SequenceError) as info:
        parse_sequence(name)
    assert repr(name) in str(info.value)
    for seq in SEQUENCES:
        assert seq in str(info.value)


def touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def test_assign_folder(tmp_path):
    files = {s: touch(tmp_path / f"case-{a}.nii.gz") for s, a in
             [("flair", "t2f"), ("t1", "t1n"), ("t1gd", "t1c"), ("t2", "t2w")]}
    (tmp_path / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    (tmp_path / "._case-t2f.nii.gz").write_bytes(b"macOS resource fork")  # ignored: hidden
    study = assign_sequences([tmp_path], {}, never_4d)
    assert study.decathlon_4d is None
    assert dict(study.files) == files
    assert study.sequences == ("flair", "t1", "t1gd", "t2")


def test_assign_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SequenceError, match="holds no"):
        assign_sequences([tmp_path], {}, never_4d)


def test_assign_orders_by_sequence_not_argument(tmp_path):
    t2 = touch(tmp_path / "a_t2.nii.gz")
    flair = touch(tmp_path / "b_flair.nii.gz")
    study = assign_sequences([t2, flair], {}, never_4d)
    assert study.files == (("flair", flair), ("t2", t2))


def test_assign_explicit_and_positional(tmp_path):
    unnamed = touch(tmp_path / "scan1.nii.gz")
    t1 = touch(tmp_path / "x_t1.nii.gz")
    study = assign_sequences([t1], {"t1gd": unnamed}, never_4d)
    assert study.files == (("t1", t1), ("t1gd", unnamed))


def test_assign_explicit_same_file_as_positional_is_fine(tmp_path):
    flair = touch(tmp_path / "x_flair.nii.gz")
    study = assign_sequences([flair], {"flair": flair}, never_4d)
    assert study.files == (("flair", flair),)


def test_assign_duplicate_positional(tmp_path):
    a = touch(tmp_path / "a_flair.nii.gz")
    b = touch(tmp_path / "b-t2f.nii.gz")
    with pytest.raises(SequenceError) as info:
        assign_sequences([a, b], {}, never_4d)
    assert "two inputs for flair" in str(info.value)
    assert str(a) in str(info.value) and str(b) in str(info.value)


def test_assign_duplicate_explicit_and_positional(tmp_path):
    a = touch(tmp_path / "a.nii.gz")
    b = touch(tmp_path / "b-t2f.nii.gz")
    with pytest.raises(SequenceError, match="two inputs for flair"):
        assign_sequences([b], {"flair": a}, never_4d)


def test_assign_unknown_name_lists_options(tmp_path):
    scan = touch(tmp_path / "scan.nii.gz")
    with pytest.raises(SequenceError) as info:
        assign_sequences([scan], {}, never_4d)
    for option in ("--flair", "--t1", "--t1gd", "--t2"):
        assert option in str(info.value)
    assert str(scan) in str(info.value)


def test_assign_single_4d_file_is_decathlon(tmp_path):
    study_file = touch(tmp_path / "BRATS_001.nii.gz")
    study = assign_sequences([study_file], {}, lambda p: True)
    assert study == StudyInputs(decathlon_4d=study_file)
    assert study.sequences == ("flair", "t1", "t1gd", "t2")


def test_assign_4d_file_among_others_refused(tmp_path):
    four = touch(tmp_path / "four.nii.gz")
    flair = touch(tmp_path / "x_flair.nii.gz")
    with pytest.raises(SequenceError, match="only input"):
        assign_sequences([flair, four], {}, lambda p: p == four)


def test_assign_4d_with_explicit_is_not_decathlon(tmp_path):
    four = touch(tmp_path / "four.nii.gz")
    flair = touch(tmp_path / "x_flair.nii.gz")
    with pytest.raises(SequenceError, match="only input"):
        assign_sequences([four], {"flair": flair}, lambda p: p == four)


def test_assign_nothing():
    with pytest.raises(SequenceError, match="no input"):
        assign_sequences([], {}, never_4d)


def test_real_brats2023_folder_maps_to_all_four_sequences():
    from tumorseg.stages.read import volume_count

    folder = shared_data("brats-gli-00001-000")
    study = assign_sequences([folder], {}, lambda p: volume_count(p) > 1)
    assert study.decathlon_4d is None
    assert study.sequences == ("flair", "t1", "t1gd", "t2")
    names = {seq: path.name for seq, path in study.files}
    assert names == {
        "flair": "BraTS-GLI-00001-000-t2f.nii.gz",
        "t1": "BraTS-GLI-00001-000-t1n.nii.gz",
        "t1gd": "BraTS-GLI-00001-000-t1c.nii.gz",
        "t2": "BraTS-GLI-00001-000-t2w.nii.gz",
    }


@pytest.mark.parametrize("name", ["AX_T2_FLAIR.nii.gz", "t2-flair.nii.gz", "case_T2FLAIR.nrrd"])
def test_t2_flair_names_are_flair(name):
    assert sequence_from_filename(Path(name)) == "flair"


@pytest.mark.parametrize("name, expected", [
    ("T1+C.nii.gz", "t1gd"), ("T1_MPRAGE_+C.nii.gz", "t1gd"), ("T1 MPRAGE C+.nii.gz", "t1gd"),
    ("t1_postgad.nii.gz", "t1gd"), ("t1_post_contrast.nii.gz", "t1gd"),
    ("t1_pre.nii.gz", "t1"), ("t1_native.nii.gz", "t1"), ("t1_post_op.nii.gz", "t1"),
    ("sub-01_ses-post_T1w.nii.gz", "t1"),  # a session named post, not contrast
    ("T2_TIRM.nii.gz", "flair"), ("dark-fluid_t2.nii.gz", "flair"), ("t2_spc_da-fl_sag.nii.gz", "flair"),
    ("c-t1c.nii.gz", "t1gd"),  # a case named c: its T1c is still T1gd
    # after treatment or at follow-up, not after contrast
    ("pt_post_RT_t1.nii.gz", "t1"), ("t1_post_treatment.nii.gz", "t1"), ("t1_post_chemo.nii.gz", "t1"),
    ("t1_post_resection.nii.gz", "t1"), ("t1_post_gd.nii.gz", "t1gd"),
    # BIDS acq- values say contrast as ce- does; other entities' values are not read
    ("sub-01_acq-gd_T1w.nii.gz", "t1gd"), ("sub-01_acq-postcontrast_T1w.nii.gz", "t1gd"),
    ("sub-01_acq-mprage_T1w.nii.gz", "t1"), ("sub-01_part-mag_T1w.nii.gz", "t1"),
])
def test_contrast_and_flair_spellings(name, expected):
    assert sequence_from_filename(Path(name)) == expected


@pytest.mark.parametrize("name, needle", [
    # A T1 whose name says both contrast and no contrast is not read either way.
    ("t1_no_contrast.nii.gz", "had contrast"), ("t1_pre_gd.nii.gz", "had contrast"),
    ("t1_without_gd.nii.gz", "had contrast"), ("sub-01_ce-none_T1w.nii.gz", "had contrast"),
    ("T1-C.nii.gz", "had contrast"),
    # Not one of the four anatomical sequences, or derived from one.
    ("T2_star.nii.gz", "star"), ("t2_swi.nii.gz", "swi"), ("adc_t2.nii.gz", "adc"), ("pd_t2.nii.gz", "pd"),
    ("t2_tirm_cor_stir.nii.gz", "stir"), ("AX_T2_MERGE.nii.gz", "merge"),  # a STIR, a T2* gradient echo
    ("t1_map.nii.gz", "map"), ("localizer_t1.nii.gz", "localizer"), ("T1_CE_subtraction.nii.gz", "subtraction"),
    ("flair_mask.nii.gz", "mask"), ("t1ce_segmentation.nii.gz", "segmentation"), ("flair_pred.nii.gz", "pred"),
    # label maps, masks and maps derived from a sequence, as other tools name them
    ("pt_t2_lesion.nii.gz", "lesion"), ("t1ce_roi.nii.gz", "roi"), ("flair_tumor.nii.gz", "tumor"),
    ("flair_labelmap.nii.gz", "labelmap"), ("t1ce_segmented.nii.gz", "segmented"), ("flair_probs.nii.gz", "probs"),
    ("t1_pve_0.nii.gz", "pve"), ("T1_brain_pveseg.nii.gz", "pveseg"), ("t1_aseg.nii.gz", "aseg"),
    ("t1ce_uncertainty.nii.gz", "uncertainty"), ("sub-01_part-phase_T1w.nii.gz", "phase"),
])
def test_names_that_could_be_misread_are_refused(name, needle):
    with pytest.raises(SequenceError, match=needle):
        sequence_from_filename(Path(name))


def test_a_folder_with_its_ground_truth_and_brain_mask_is_read(tmp_path):
    flair = touch(tmp_path / "case-t2f.nii.gz")
    touch(tmp_path / "case-seg.nii.gz")
    touch(tmp_path / "brainmask.nii.gz")
    assert assign_sequences([tmp_path], {}, never_4d).files == (("flair", flair),)


def test_a_folder_leaves_out_a_lesion_outline_named_after_its_sequence(tmp_path, caplog):
    """Before, pt_t2_lesion was read as the T2 (a binary outline segmented as a scan)."""
    flair = touch(tmp_path / "pt_flair.nii.gz")
    touch(tmp_path / "pt_t2_lesion.nii.gz")
    with caplog.at_level("INFO"):
        assert assign_sequences([tmp_path], {}, never_4d).files == (("flair", flair),)
    assert "left out 1" in caplog.text and tmp_path.name not in caplog.text  # the folder may name the patient


@pytest.mark.parametrize("name", ["pt_dwi.nii.gz", "pt_perfusion_dsc.nii.gz", "pt_softmax.nii.gz", "pt_seg.nii.gz"])
def test_a_multi_volume_file_named_as_no_study_is_refused(tmp_path, name):
    """A 4-volume diffusion, perfusion, softmax or one-hot label file is not a Decathlon study."""
    with pytest.raises(SequenceError, match="marks it as"):
        assign_sequences([touch(tmp_path / name)], {}, lambda p: True)


def test_a_multi_volume_file_named_as_one_sequence_is_refused(tmp_path):
    dce = touch(tmp_path / "t1ce_4vols.nii.gz")
    with pytest.raises(SequenceError, match="name says t1gd"):
        assign_sequences([dce], {}, lambda p: True)


def test_one_file_for_two_sequences_is_refused(tmp_path):
    t1 = touch(tmp_path / "x_t1.nii.gz")
    with pytest.raises(SequenceError, match="one file given as t1 and t1gd"):
        assign_sequences([t1], {"t1gd": t1}, never_4d)
