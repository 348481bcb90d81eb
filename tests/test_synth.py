"""tumorseg.synth: determinism, label anatomy, contrasts, geometry and the Decathlon writer.

One small dataset (3 cases, seed 1: MNI152 skull-stripped, Colin27 skull-stripped and Colin27 with its
real skull, all small grids to keep the module fast) is generated once per module; most tests read it
back from disk, so they also check what the files hold. Generator version 3 needs Colin27 from Debian's
mricron-data: without it those tests skip, saying so, and the MNI152-only tests still run.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from tumorseg import synth
from tumorseg.synth import anatomy as synth_anatomy, dataset as synth_dataset, render, tumour
from tumorseg.errors import ConfigError

CASES, SEED = 3, 1
HAVE_COLIN27 = all((synth_anatomy.COLIN_FOLDER / name).is_file() for name, _ in synth_anatomy.COLIN_FILES.values())
needs_colin27 = pytest.mark.skipif(
    not HAVE_COLIN27, reason=f"Colin27 is not in {synth_anatomy.COLIN_FOLDER}: apt-get install mricron-data")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    if not HAVE_COLIN27:
        pytest.skip(f"generator version 3 needs Colin27 in {synth_anatomy.COLIN_FOLDER}: apt-get install mricron-data")
    return synth.write_synth_dataset(tmp_path_factory.mktemp("synth") / "Task01_Synth", CASES, SEED)


@pytest.fixture(scope="module")
def loaded(dataset):
    """[(image (I, J, K, 4) float32, labels uint8, image affine, label affine, image header)] per case."""
    out = []
    for i in range(CASES):
        image = nib.load(str(dataset / "imagesTr" / f"synth_{i:04d}.nii.gz"))
        label = nib.load(str(dataset / "labelsTr" / f"synth_{i:04d}.nii.gz"))
        out.append((np.asanyarray(image.dataobj), np.asanyarray(label.dataobj), image.affine, label.affine,
                    image.header, label.header))
    return out


def _ring(labels: np.ndarray, affine: np.ndarray, inner: float, outer: float) -> np.ndarray:
    """Label-0 voxels between ``inner`` and ``outer`` mm from the whole tumour (anisotropic voxels)."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    dist = ndi.distance_transform_edt(labels == 0, sampling=spacing)
    return (dist > inner) & (dist <= outer)


def test_dataset_json_lists_every_case(dataset):
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert meta["labels"] == {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
    assert meta["numTraining"] == CASES == len(meta["training"])
    for key in ("name", "description", "licence"):
        assert meta[key]
    for i, entry in enumerate(meta["training"]):
        assert entry == {"image": f"./imagesTr/synth_{i:04d}.nii.gz", "label": f"./labelsTr/synth_{i:04d}.nii.gz"}
        assert (dataset / entry["image"]).is_file() and (dataset / entry["label"]).is_file()
    record = meta["tumorseg_synth"]
    assert record["seed"] == SEED and record["cases"] == CASES
    assert record["case_seeds"] == synth_dataset.case_seeds(SEED, CASES)
    assert len(set(record["case_seeds"])) == CASES
    assert record["case_anatomies"] == ["mni152", "colin27", "colin27"]
    assert [t["name"].split()[0] for t in record["templates"]] == ["MNI", "Colin27"]
    assert "McGill" in record["templates"][0]["licence"] and "BSD-3" in record["templates"][1]["licence"]
    assert not list(dataset.rglob("*.partial*")), "temporary files left behind"


def test_files_share_one_grid(loaded):
    for image, labels, image_affine, label_affine, image_header, label_header in loaded:
        assert image.dtype == np.float32 and labels.dtype == np.uint8
        assert image.ndim == 4 and image.shape[3] == 4 and image.shape[:3] == labels.shape
        assert max(labels.shape) <= 256
        np.testing.assert_array_equal(image_affine, label_affine)
        for header in (image_header, label_header):
            assert int(header["qform_code"]) == 1 and int(header["sform_code"]) == 1
            np.testing.assert_allclose(header.get_qform(), header.get_sform(), atol=1e-4)
        assert set(np.unique(labels)) <= {0, 1, 2, 3}
        assert np.isfinite(image).all() and (image >= 0).all()


def test_same_seed_gives_identical_case_and_world_positions_survive(loaded):
    seed = synth_dataset.case_seeds(SEED, CASES)[0]
    case, scene, geometry = synth_dataset.synthesise(seed)
    image, labels, affine = loaded[0][0], loaded[0][1], loaded[0][2]
    # The file was written by an earlier, separate call: byte-identical arrays.
    assert case.image.dtype == np.float32 and case.labels.dtype == np.uint8 and case.affine.dtype == np.float64
    np.testing.assert_array_equal(np.moveaxis(case.image, 0, -1), image)
    np.testing.assert_array_equal(case.labels, labels)
    np.testing.assert_allclose(case.affine, affine, atol=1e-4)
    # Each compartment sits at the same world position before and after acquisition.
    anatomy = synth_anatomy.load_anatomy(scene.anatomy)
    for value in (1, 2, 3):
        before = np.argwhere(scene.labels == value).mean(axis=0)
        world_before = (geometry.head_pose @ anatomy.affine @ np.r_[before, 1.0])[:3]
        after = np.argwhere(case.labels == value).mean(axis=0)
        world_after = (affine @ np.r_[after, 1.0])[:3]
        assert np.linalg.norm(world_before - world_after) < 1.0, value


def test_different_seeds_differ(loaded):
    (a, la, *_), (b, lb, *_) = loaded[0], loaded[1]
    assert a.shape != b.shape or not np.array_equal(a, b)
    assert la.shape != lb.shape or not np.array_equal(la, lb)
    assert not np.allclose(loaded[0][2], loaded[1][2])


def test_three_compartments_and_plausible_volumes(loaded):
    complete = 0
    for _, labels, affine, *_ in loaded:
        present = set(np.unique(labels)) - {0}
        assert {1, 2} <= present  # edema and core always; the enhancing rim is absent in ~10 %
        complete += present == {1, 2, 3}
        whole_ml = (labels > 0).sum() * abs(np.linalg.det(affine[:3, :3])) / 1000
        assert 5 < whole_ml < 200, whole_ml
    assert complete >= 2


def test_edema_surrounds_the_core(loaded):
    for _, labels, affine, *_ in loaded:
        core = labels >= 2
        edema = labels == 1
        assert (ndi.binary_dilation(core, iterations=2) & edema).any(), "edema does not touch the core"
        centre = np.argwhere(core).mean(axis=0)
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        core_r = np.linalg.norm((np.argwhere(core) - centre) * spacing, axis=1)
        edema_r = np.linalg.norm((np.argwhere(edema) - centre) * spacing, axis=1)
        assert np.median(edema_r) > np.median(core_r) + 3


def test_sequence_contrasts(loaded):
    flair, t1, t1gd, t2 = range(4)
    for image, labels, affine, *_ in loaded:
        ring = _ring(labels, affine, 3.0, 12.0) & (image[..., t1] > 0)
        normal = {c: np.median(image[..., c][ring]) for c in range(4)}
        edema, enhancing = labels == 1, labels == 3
        assert image[..., flair][edema].mean() > 1.2 * normal[flair]
        assert image[..., t2][edema].mean() > 1.2 * normal[t2]
        # "slightly dark on T1": darker than the white matter around it (the ring's brighter part)
        assert image[..., t1][edema].mean() < np.percentile(image[..., t1][ring], 75)
        if enhancing.any():
            assert image[..., t1gd][enhancing].mean() > 1.2 * normal[t1gd]
            # enhancement is a T1gd effect: on plain T1 the rim is not brighter than brain
            assert image[..., t1][enhancing].mean() < normal[t1]
        necrosis = (labels == 2) & (ndi.distance_transform_edt(labels == 2) > 2)
        if necrosis.any():
            assert image[..., t1gd][necrosis].mean() < normal[t1gd]


def test_skull_and_skull_stripped_backgrounds(loaded):
    kinds = []
    for image, labels, *_ in loaded:
        zero = (image == 0).all(axis=3)
        corners = [image[i, j, k] for i in (0, -1) for j in (0, -1) for k in (0, -1)]
        if zero.mean() > 0.3:  # skull-stripped: exact zeros outside the brain, the tumour inside
            kinds.append("stripped")
            assert all((c == 0).all() for c in corners)
            assert not zero[labels > 0].any()
        else:  # skull kept: noise everywhere, a bright scalp outside the dark skull
            kinds.append("skull")
            assert zero.mean() < 0.01
            assert all((c > 0).all() for c in corners)
    assert sorted(set(kinds)) == ["skull", "stripped"], kinds


@pytest.mark.parametrize("name", ["mni152", pytest.param("colin27", marks=needs_colin27)])
def test_scans_with_skull_have_dark_bone_between_the_brain_and_a_bright_scalp(name):
    """MNI152 gets a drawn shell; Colin27 keeps its own scalp, skull and face, exactly as scanned on T1."""
    anatomy = synth_anatomy.load_anatomy(name)
    rng = np.random.default_rng(np.random.SeedSequence(4))
    scene = tumour.build_scene(rng, anatomy, tumour.plan_tumour(rng, anatomy))
    look = dataclasses.replace(render.draw_look(rng, 3), skull=True, vessels=False)
    channels = render.render(rng, anatomy, scene, look)
    d = anatomy.band_dist
    for c in (0, 1):  # FLAIR, T1
        outside = channels[c].ravel()[anatomy.band]
        assert np.median(outside[(d > 3) & (d < 5)]) < 0.5 * np.percentile(outside[d > 6], 90), c
    if anatomy.head is not None:
        clear = d > 3  # the tumour's partial-volume blur cannot reach here
        np.testing.assert_allclose(channels[1].ravel()[anatomy.band][clear],
                                   look.means["wm"][1] * anatomy.head[clear], rtol=1e-5)


@needs_colin27
def test_colin27_tissue_maps_fit_the_mni152_brain():
    """Colin27's grey and white matter come from its own T1 histogram: they must split the brain as
    MNI152's probability maps do, on a brain outline that lies where MNI152's does (both in MNI space)."""
    colin, mni = synth_anatomy.load_anatomy("colin27"), synth_anatomy.load_anatomy("mni152")
    for anatomy in (colin, mni):
        assert 0.45 < anatomy.gm[anatomy.mask].mean() < 0.6 and 0.3 < anatomy.wm[anatomy.mask].mean() < 0.45
    # Both grids are 1 mm with aligned axes: Colin27 voxel i is MNI152 voxel i + offset.
    offset = np.round(np.linalg.solve(mni.affine, colin.affine)[:3, 3]).astype(int)
    lo = np.maximum(offset, 0)
    hi = np.minimum(offset + colin.mask.shape, mni.mask.shape)
    on_mni = tuple(slice(a, b) for a, b in zip(lo, hi))
    on_colin = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offset))
    both = (colin.mask[on_colin] & mni.mask[on_mni]).sum()
    assert 2 * both / (colin.mask.sum() + mni.mask.sum()) > 0.85
    # A different brain, so overlap, not identity: Colin27's white matter is mostly MNI152's too.
    assert mni.wm[on_mni][colin.wm[on_colin] > 0.9].mean() > 0.6
    assert mni.wm[on_mni][colin.gm[on_colin] > 0.9].mean() < 0.4


@pytest.mark.parametrize("name", ["mni152", pytest.param("colin27", marks=needs_colin27)])
def test_mass_effect_and_white_matter_edema(name):
    anatomy = synth_anatomy.load_anatomy(name)
    rng = np.random.default_rng(np.random.SeedSequence(3))
    plan = tumour.plan_tumour(rng, anatomy)
    scene = tumour.build_scene(rng, anatomy, plan)
    moved = np.abs(scene.wm - anatomy.wm)
    outside = np.ones(anatomy.mask.shape, bool)
    outside[scene.box] = False
    assert moved[outside].max() == 0 and moved[scene.box].max() > 0.3
    # Edema follows white matter: more WM under it than in the brain at the same distances.
    local = scene.labels[scene.box]
    dist = ndi.distance_transform_edt(local < 2)
    edema = local == 1
    reach = (dist > 0) & (dist <= np.percentile(dist[edema], 90)) & anatomy.mask[scene.box]
    assert scene.wm[scene.box][edema].mean() > scene.wm[scene.box][reach].mean() + 0.1


def test_enhancing_normal_structures_are_bright_on_t1gd_and_stay_background(monkeypatch):
    """The sinuses and choroid plexus enhance like tumour on T1gd but are not tumour: the model
    must learn to leave them out, so they are painted with label 0."""
    anatomy = synth_anatomy.load_anatomy()
    rng = np.random.default_rng(np.random.SeedSequence(5))
    plan = tumour.plan_tumour(rng, anatomy)
    scene = tumour.build_scene(rng, anatomy, plan)
    look = render.draw_look(rng, version=2)
    painted = []
    real_vessels = render.vessel_weights
    monkeypatch.setattr(render, "vessel_weights", lambda *a: painted.append(real_vessels(*a)) or painted[-1])
    channels = render.render(rng, anatomy, scene, look)
    vessels = painted[0] > 0.9
    paths = synth_anatomy.vessel_paths()
    sss_x = paths["sss"][:, 0]
    assert np.ptp(sss_x) == 0 and abs(anatomy.affine[0, 0] * sss_x[0] + anatomy.affine[0, 3]) < 1  # midline
    visible = vessels & anatomy.mask & (scene.labels == 0)
    assert visible.sum() > 2000  # mL-sized, as on real scans
    white = (scene.wm > 0.9) & (scene.labels == 0)
    t1gd, t1 = channels[2], channels[1]
    assert t1gd[visible].mean() > 1.15 * t1gd[white].mean()
    assert t1[visible].mean() < t1[white].mean()  # enhancement, not a T1-bright structure


def test_a_folder_of_another_generator_version_is_refused(dataset, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(dataset, copy)
    description = json.loads((copy / "dataset.json").read_text())
    assert description["tumorseg_synth"]["generator_version"] == synth.GENERATOR_VERSION
    del description["tumorseg_synth"]["generator_version"]  # as version 1 wrote it
    (copy / "dataset.json").write_text(json.dumps(description))
    with pytest.raises(ConfigError, match="generator version 1, not 3"):
        synth.write_synth_dataset(copy, CASES + 1, SEED)
    assert not (copy / "labelsTr" / f"synth_{CASES:04d}.nii.gz").exists()


def test_generator_version_1_still_makes_the_default_models_training_data(monkeypatch):
    """Case 0 of `tumorseg synth --cases 240 --seed 1000 --generator-version 1`, the data the default
    model was trained on (its card's command): the checksums of the files written then."""
    import hashlib

    monkeypatch.setattr(render, "vessel_weights", lambda *a: pytest.fail("version 1 paints no vessels"))
    case = synth.synth_case(synth_dataset.case_seeds(1000, 1)[0], version=1)
    assert hashlib.sha256(case.image.tobytes()).hexdigest() == \
        "85c7a1966ad558d6495fe32ef483ccf74aa2d6707a1e94c0c00cc44333321e07"
    assert hashlib.sha256(case.labels.tobytes()).hexdigest() == \
        "5d00f1f7d98d054247b8c7e40d8f2eaaa6507394a1449d581b5e6e9b57892d50"


def test_a_version_1_folder_is_extended_only_as_version_1(dataset, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(dataset, copy)
    description = json.loads((copy / "dataset.json").read_text())
    description["tumorseg_synth"]["generator_version"] = 1
    (copy / "dataset.json").write_text(json.dumps(description))
    with pytest.raises(ConfigError, match="--generator-version 1"):
        synth.write_synth_dataset(copy, CASES, SEED)
    synth.write_synth_dataset(copy, CASES, SEED, version=1)  # every case there: nothing regenerated
    assert json.loads((copy / "dataset.json").read_text())["tumorseg_synth"]["generator_version"] == 1
    with pytest.raises(ConfigError, match=r"one of \[1, 2, 3\]"):
        synth.write_synth_dataset(tmp_path / "new", 1, SEED, version=4)


def test_rerun_skips_existing_and_resumes_missing(dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    files = sorted(copy.rglob("synth_*.nii.gz"))
    before = {f: f.stat().st_mtime_ns for f in files}
    synth.write_synth_dataset(copy, CASES, SEED)
    assert {f: f.stat().st_mtime_ns for f in files} == before
    # An interrupted run left case 2's image but not its label: only that case is redone.
    missing = copy / "labelsTr" / "synth_0002.nii.gz"
    missing.unlink()
    synth.write_synth_dataset(copy, CASES, SEED)
    assert missing.is_file()
    for f in files:
        if f.name != "synth_0002.nii.gz":
            assert f.stat().st_mtime_ns == before[f], f
    original = np.asanyarray(nib.load(str(dataset / "labelsTr" / "synth_0002.nii.gz")).dataobj)
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(missing)).dataobj), original)
    # Another seed into the same folder would mix two datasets: refused before touching anything.
    with pytest.raises(ConfigError, match=f"seed {SEED}"):
        synth.write_synth_dataset(copy, CASES + 1, SEED + 1)
    assert not (copy / "labelsTr" / f"synth_{CASES:04d}.nii.gz").exists()


def test_an_interrupted_folder_is_resumed_only_with_its_own_seed(dataset, tmp_path):
    # An interrupted run has written cases but not dataset.json (written last).
    copy = tmp_path / "interrupted"
    shutil.copytree(dataset, copy)
    (copy / "dataset.json").unlink()
    with pytest.raises(ConfigError, match=f"seed {SEED}, not {SEED + 1}") as refused:
        synth.write_synth_dataset(copy, CASES, SEED + 1)
    assert Path(refused.value.path).name == synth.STARTED_MARKER
    with pytest.raises(ConfigError, match="generator version 3, not 2"):
        synth.write_synth_dataset(copy, CASES, SEED, version=2)
    assert not (copy / "dataset.json").exists()
    synth.write_synth_dataset(copy, CASES, SEED)  # its own seed: resumed (every case is there)
    assert json.loads((copy / "dataset.json").read_text())["tumorseg_synth"]["seed"] == SEED
    # Case files with no record of their seed are not adopted.
    (copy / "dataset.json").unlink()
    (copy / synth.STARTED_MARKER).unlink()
    with pytest.raises(ConfigError, match="no dataset.json"):
        synth.write_synth_dataset(copy, CASES, SEED)


def test_invalid_arguments_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="-1"):
        synth.synth_case(-1)
    with pytest.raises(ConfigError, match="0"):
        synth.write_synth_dataset(tmp_path, 0, 1)
    with pytest.raises(ConfigError, match="seed"):
        synth.write_synth_dataset(tmp_path, 2, -3)
    assert not list(tmp_path.iterdir())


def test_missing_nilearn_is_named(monkeypatch, tmp_path):
    real_find_spec = synth_anatomy.importlib.util.find_spec
    monkeypatch.setattr(synth_anatomy.importlib.util, "find_spec",
                        lambda name, *a: None if name == "nilearn" else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install nilearn"):
        synth_anatomy.template_paths()
    with pytest.raises(ModuleNotFoundError, match="nilearn"):
        synth.write_synth_dataset(tmp_path / "out", 1, 0)
    assert not (tmp_path / "out").exists()


def test_missing_colin27_is_named_and_version_2_needs_none(monkeypatch, tmp_path):
    monkeypatch.setattr(synth_anatomy, "COLIN_FOLDER", tmp_path / "no-mricron")
    with pytest.raises(ConfigError, match="apt-get install mricron-data") as error:
        synth.write_synth_dataset(tmp_path / "out", 1, 0)
    assert "ch2.nii.gz" in str(error.value)
    assert not (tmp_path / "out").exists()
    written = synth.write_synth_dataset(tmp_path / "v2", 1, 0, version=2)
    record = json.loads((written / "dataset.json").read_text())["tumorseg_synth"]
    assert record["case_anatomies"] == ["mni152"] and len(record["templates"]) == 1


@needs_colin27
def test_other_colin27_voxels_are_refused(monkeypatch):
    """A seed promises the same case: Colin27 files whose voxels differ would break that silently."""
    files = dict(synth_anatomy.COLIN_FILES, brain=("ch2bet.nii.gz", "0" * 64))
    monkeypatch.setattr(synth_anatomy, "COLIN_FILES", files)
    synth_anatomy.load_anatomy.cache_clear()
    try:
        with pytest.raises(ConfigError, match="voxels differ"):
            synth_anatomy.load_anatomy("colin27")
    finally:
        synth_anatomy.load_anatomy.cache_clear()


def test_workers_write_the_same_files(dataset, tmp_path):
    parallel = synth.write_synth_dataset(tmp_path / "parallel", CASES, SEED, workers=2)
    for f in sorted(dataset.rglob("*")):
        if f.is_file():
            assert (parallel / f.relative_to(dataset)).read_bytes() == f.read_bytes(), f
