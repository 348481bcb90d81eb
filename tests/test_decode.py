"""The decode stage: argmax, or calibrated regions grown past the argmax inside its large lesions."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import save_nifti, brain_phantom
from tumorseg.cli import main
from tumorseg.errors import ModelError
from tumorseg.labels import get_scheme
from tumorseg.model import Decoding, load_card, write_card
from tumorseg.stages.decode import decode
from tumorseg.stages.geometry import plan_transform
from tumorseg.scan import Scan, SourceGeometry

MSD = get_scheme("msd")  # 1 edema, 2 non-enhancing / necrosis, 3 enhancing


def probabilities(shape, cells):
    """(4, *shape) class probabilities: background 1 except where ``cells`` ((mask, [p0, p1, p2, p3]), ...) say."""
    probs = np.zeros((4,) + shape, dtype=np.float32)
    probs[0] = 1.0
    for mask, p in cells:
        probs[:, mask] = np.asarray(p, dtype=np.float32)[:, None]
    return probs


def ball(shape, centre, radius):
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def test_without_decoding_it_is_the_argmax():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=(9, 8, 7)).transpose(3, 0, 1, 2).astype(np.float32)
    labels = decode(probs, MSD, None, 1.0)
    assert labels.dtype == np.uint8
    assert np.array_equal(labels, MSD.class_values[np.argmax(probs, axis=0)])
    assert np.array_equal(decode(probs, MSD, Decoding({}), 1.0), labels)


def test_a_lesion_grows_into_its_likely_rim_and_no_island_appears():
    shape = (40, 40, 40)
    core = ball(shape, (20, 20, 20), 7)
    rim = ball(shape, (20, 20, 20), 10) & ~core
    lone = ball(shape, (5, 5, 5), 2)  # likely enough to pass the threshold, but no argmax voxel of its own
    probs = probabilities(shape, [(core, [0.05, 0.15, 0.7, 0.1]), (rim, [0.6, 0.35, 0.05, 0.0]),
                                  (lone, [0.55, 0.45, 0.0, 0.0])])
    argmax = decode(probs, MSD, None, 1.0)
    assert not argmax[rim].any() and (argmax[core] == 2).all()
    grown = decode(probs, MSD, Decoding({"WT": 0.3}), 0.001)  # voxels of 1 mm^3: the core is 1.4 mL
    assert (grown[rim] == 1).all(), "the rim (P(tumour) 0.4 > 0.3) joins as edema, the likeliest label there"
    assert (grown[core] == 2).all(), "the argmax's own voxels keep their labels"
    assert not grown[lone].any(), "no island without an argmax component appears"
    assert np.array_equal(grown[~rim], argmax[~rim])


def test_small_argmax_islands_do_not_grow():
    shape = (30, 30, 30)
    speck = ball(shape, (15, 15, 15), 1)  # 7 voxels
    halo = ball(shape, (15, 15, 15), 4) & ~speck
    probs = probabilities(shape, [(speck, [0.2, 0.8, 0.0, 0.0]), (halo, [0.6, 0.4, 0.0, 0.0])])
    small = decode(probs, MSD, Decoding({"WT": 0.3}, grow_from_ml=0.01), 0.001)  # 10 voxels needed
    assert np.array_equal(small, decode(probs, MSD, None, 0.001))
    large = decode(probs, MSD, Decoding({"WT": 0.3}, grow_from_ml=0.005), 0.001)
    assert (large[halo] == 1).all()


def test_the_lesion_size_decides_what_grows_not_the_regions_own_component():
    """Two lesions, each with a 7-voxel core speck in a halo likely to be core: with grow_from_ml between
    their sizes, the large lesion's core grows (its speck is far smaller than the gate) and the small
    lesion's stays as drawn."""
    shape = (40, 40, 60)
    cells = []
    for centre, radius in (((20, 20, 15), 9), ((20, 20, 45), 5)):  # lesions of 3.1 and 0.5 mL
        speck = ball(shape, centre, 1)
        halo = ball(shape, centre, 3) & ~speck
        edema = ball(shape, centre, radius) & ~speck & ~halo
        cells += [(edema, [0.1, 0.8, 0.1, 0.0]), (halo, [0.1, 0.6, 0.3, 0.0]), (speck, [0.0, 0.2, 0.8, 0.0])]
    probs = probabilities(shape, cells)
    labels = decode(probs, MSD, Decoding({"TC": 0.25}, grow_from_ml=1.0), 0.001)
    large, small = ball(shape, (20, 20, 15), 3), ball(shape, (20, 20, 45), 3)
    assert (labels[large] == 2).all(), "the large lesion's core grows into its halo (P(core) 0.3 > 0.25)"
    assert (labels[small] == decode(probs, MSD, None, 0.001)[small]).all() and (labels[small] == 1).sum() > 100


def test_core_grows_only_inside_the_whole_tumour_and_unlisted_regions_stay():
    shape = (30, 30, 30)
    enhancing = ball(shape, (15, 15, 15), 3)
    core = ball(shape, (15, 15, 15), 6) & ~enhancing
    shell = ball(shape, (15, 15, 15), 8) & ~core & ~enhancing
    outside = ball(shape, (15, 15, 15), 10) & ~shell & ~core & ~enhancing
    probs = probabilities(shape, [(enhancing, [0.0, 0.1, 0.2, 0.7]), (core, [0.05, 0.15, 0.8, 0.0]),
                                  (shell, [0.1, 0.7, 0.2, 0.0]),  # edema by argmax, core likely at 0.2
                                  (outside, [0.8, 0.0, 0.2, 0.0])])  # core likely at 0.2, but no tumour (WT 0.2)
    labels = decode(probs, MSD, Decoding({"WT": 0.5, "TC": 0.15}, grow_from_ml=0.5), 0.001)  # the lesion: 2.1 mL
    assert (labels[shell] == 2).all(), "core grows into the shell: P(core) 0.2 > 0.15 inside the whole tumour"
    assert not labels[outside].any(), "never past the whole tumour"
    assert (labels[enhancing] == 3).all() and not (labels[core | shell] == 3).any(), "ET is the argmax's"


def test_the_card_checks_its_decoding(tmp_path, tiny_model):
    with pytest.raises(ValueError, match="unknown region"):
        Decoding({"XX": 0.3})
    with pytest.raises(ValueError, match="between 0 and 1"):
        Decoding({"WT": 1.0})
    with pytest.raises(ValueError, match="grow_from_ml"):
        Decoding({"WT": 0.3}, grow_from_ml=-1.0)
    card = dataclasses.replace(load_card(tiny_model), decoding=Decoding({"WT": 0.3, "TC": 0.15}, 2.0, {"note": "n"}))
    write_card(tmp_path, card)
    assert load_card(tmp_path).decoding == card.decoding
    text = (tmp_path / "model.toml").read_text().replace("WT = 0.3", "WT = 1.5")
    (tmp_path / "model.toml").write_text(text)
    with pytest.raises(ModelError, match="between 0 and 1"):
        load_card(tmp_path)


def test_plan_transform_records_the_input_voxel_volume():
    affine = np.diag([0.9, 1.1, 2.5, 1.0])
    scan = Scan(np.ones((1, 10, 12, 8), np.float32), affine, ("flair",), SourceGeometry((10, 12, 8), affine))
    assert plan_transform(scan, (1.5, 1.5, 1.5)).input_voxel_ml == pytest.approx(0.9 * 1.1 * 2.5 / 1000)


def test_predict_decodes_with_the_cards_thresholds(tmp_path, tiny_model):
    """The same network and scan: the card's decoding grows the tiny random network's tumour (437 ->
    459 mL when written) and the report names the thresholds."""
    import shutil

    calibrated = tmp_path / "model"
    shutil.copytree(tiny_model, calibrated)
    card = load_card(calibrated)
    write_card(calibrated, dataclasses.replace(card, decoding=Decoding({"WT": 0.05}, grow_from_ml=0.0)))
    scan = save_nifti(tmp_path / "flair.nii.gz", brain_phantom(), np.diag([2.0, 2.0, 2.0, 1.0]))
    volumes = {}
    for name, model in (("argmax", tiny_model), ("calibrated", calibrated)):
        out = tmp_path / name
        result = CliRunner().invoke(main, ["predict", str(scan), "--model", str(model), "-o", str(out), "-q",
                                           "--no-tta"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        report = json.loads((out / "report.json").read_text())
        volumes[name] = report["results"]["regions"]["WT"]["volume_ml"]
        assert report["model"].get("decoding") == ({"thresholds": {"WT": 0.05}, "grow_from_ml": 0.0}
                                                   if name == "calibrated" else None)
    assert volumes["calibrated"] > volumes["argmax"]


def test_the_labels_are_numpys_argmax_ties_to_the_first_class():
    """decode takes the argmax class by class (no transposed copy of the probabilities): the
    same labels as np.argmax, ties included."""
    import numpy as np

    from tumorseg.labels import get_scheme
    from tumorseg.stages import decode

    probs = np.random.default_rng(1).random((4, 20, 18, 16)).astype(np.float32)
    probs[2, :5] = probs[1, :5]
    probs[3, :, :3] = probs[0, :, :3]
    msd = get_scheme("msd")
    np.testing.assert_array_equal(decode.decode(probs, msd, None, 0.001), msd.class_values[np.argmax(probs, axis=0)])
