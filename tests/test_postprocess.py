"""Postprocess stage (clean-up of the label map) and report stage (volumes, centroids)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from tumorseg.config import LabelPostprocess, PostprocessConfig
from tumorseg.labels import get_scheme
from tumorseg.scan import LabelMap, SourceGeometry
from tumorseg.stages import postprocess as pp
from tumorseg.stages.report import summarize

MSD = get_scheme("msd")  # 1 edema, 2 non_enhancing_tumour, 3 enhancing_tumour
EDEMA, CORE, ENH = 1, 2, 3


def run(labels, spacing=(1.0, 1.0, 1.0), tumour_ml=0.0, **per_label):
    config = PostprocessConfig(tumour_min_component_ml=tumour_ml, labels=per_label)
    return pp.postprocess(labels, np.diag([*map(float, spacing), 1.0]), config, MSD)


def blobs_map():
    """Three separate cubes of edema: 4x4x4 (64), 4x4x5 (80) and 5x5x5 (125 voxels)."""
    labels = np.zeros((30, 12, 12), np.uint8)
    labels[1:5, 1:5, 1:5] = EDEMA
    labels[9:13, 1:5, 1:6] = EDEMA
    labels[18:23, 1:6, 1:6] = EDEMA
    boxes = [(slice(1, 5), slice(1, 5), slice(1, 5)),
             (slice(9, 13), slice(1, 5), slice(1, 6)),
             (slice(18, 23), slice(1, 6), slice(1, 6))]
    return labels, boxes, [64, 80, 125]


# Voxel volumes: 1.5, 1.0 and 4.0 mm^3. With a threshold of 0.1 mL no component lies within
# 5 % of it, so the expected result depends only on using the true voxel volume.
SPACINGS = [(0.5, 0.5, 6.0), (0.5, 0.5, 4.0), (1.0, 1.0, 4.0)]


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("where", ["tumour", "label"])
def test_small_component_removal_uses_ml_and_spacing(spacing, where):
    labels, boxes, sizes = blobs_map()
    threshold_ml = 0.1
    if where == "tumour":
        out = run(labels, spacing, tumour_ml=threshold_ml)
    else:
        out = run(labels, spacing, edema=LabelPostprocess(min_component_ml=threshold_ml))
    voxel_mm3 = spacing[0] * spacing[1] * spacing[2]
    for box, n in zip(boxes, sizes):
        volume_ml = n * voxel_mm3 / 1000.0
        expected = EDEMA if volume_ml >= threshold_ml else 0
        assert np.all(out[box] == expected), (spacing, n, volume_ml)
    assert not out[labels == 0].any()


def test_spacing_changes_which_components_survive():
    labels, _, _ = blobs_map()
    kept = [int((run(labels, s, tumour_ml=0.1) > 0).sum()) for s in SPACINGS]
    assert kept == [80 + 125, 125, 64 + 80 + 125]


def test_tumour_components_count_all_labels_together():
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[2:6, 2:6, 2:6] = EDEMA     # 64 voxels
    labels[2:6, 2:6, 6:9] = ENH       # 48 voxels touching the edema
    out = run(labels, tumour_ml=0.1)  # 1 mm voxels: each part alone < 0.1 mL, together 0.112
    np.testing.assert_array_equal(out, labels)
    out = run(labels, tumour_ml=0.12)
    assert not out.any()


def test_keep_largest_only_touches_its_label():
    labels = np.zeros((20, 10, 10), np.uint8)
    labels[1:4, 1:4, 1:4] = EDEMA        # 27 voxels
    labels[8:12, 1:5, 1:5] = EDEMA       # 64 voxels: the largest
    labels[15:17, 1:3, 1:3] = ENH        # small, another label
    out = run(labels, edema=LabelPostprocess(keep_largest=True))
    assert not out[1:4, 1:4, 1:4].any()
    assert np.all(out[8:12, 1:5, 1:5] == EDEMA)
    assert np.all(out[15:17, 1:3, 1:3] == ENH)
    assert int((out == EDEMA).sum()) == 64


def test_26_connected_diagonal_counts_as_one_component():
    mask = np.zeros((6, 6, 6), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True
    assert pp.count_components(mask) == 1
    assert pp.largest_component(mask).sum() == 2
    mask[4, 4, 4] = True  # two voxels apart: separate
    assert pp.count_components(mask) == 2
    assert pp.count_components(np.zeros((3, 3, 3), bool)) == 0


def enhancing_ring():
    """A closed shell of enhancing tumour; inside, half core (necrosis) and half background."""
    labels = np.zeros((13, 13, 13), np.uint8)
    labels[2:11, 2:11, 2:11] = ENH
    labels[3:10, 3:10, 3:10] = 0
    labels[3:10, 3:10, 3:6] = CORE
    return labels


def test_fill_holes_fills_only_background():
    labels = enhancing_ring()
    out = run(labels, enhancing_tumour=LabelPostprocess(fill_holes=True))
    inside = np.zeros_like(labels, bool)
    inside[3:10, 3:10, 3:10] = True
    # necrosis inside the ring stays
    np.testing.assert_array_equal(out[labels == CORE], CORE)
    # background enclosed by the ring becomes enhancing
    assert np.all(out[inside & (labels == 0)] == ENH)
    # background outside stays background; the ring itself is unchanged
    assert not out[~inside & (labels == 0)].any()
    assert np.all(out[labels == ENH] == ENH)


def test_fill_holes_ignores_open_cavity():
    labels = enhancing_ring()
    labels[6, 6, 10] = 0  # a hole through the shell opens the cavity to the outside
    out = run(labels, enhancing_tumour=LabelPostprocess(fill_holes=True))
    np.testing.assert_array_equal(out, labels)


def test_an_enhancing_speck_removed_inside_the_core_leaves_no_hole():
    """The default pipeline: the core's holes were filled before the enhancing label lost its
    small components, so a speck removed inside the core became background enclosed by it."""
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:18, 2:18, 2:18] = EDEMA
    labels[5:15, 5:15, 5:15] = CORE
    labels[9:11, 9:11, 9:11] = ENH  # 8 voxels: 0.008 mL, under the 0.02 mL threshold
    out = run(labels, enhancing_tumour=LabelPostprocess(min_component_ml=0.02),
              non_enhancing_tumour=LabelPostprocess(fill_holes=True))
    assert not (out == ENH).any()
    assert (out[5:15, 5:15, 5:15] == CORE).all()  # the speck's place is core, not a hole


def test_a_component_of_exactly_the_threshold_volume_stays():
    """0.1 mL of 1 x 1 x 5 mm voxels is 20 voxels; the determinant's rounding made the threshold
    20.000000000000004, and the component was removed although the report calls it 0.1 mL."""
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[2:6, 2:7, 4] = EDEMA  # 20 voxels of 5 mm^3
    np.testing.assert_array_equal(run(labels, (1.0, 1.0, 5.0), tumour_ml=0.1), labels)
    np.testing.assert_array_equal(run(labels, (1.0, 1.0, 5.0), edema=LabelPostprocess(min_component_ml=0.1)), labels)
    assert not run(labels, (1.0, 1.0, 5.0), tumour_ml=0.1001).any()


def test_fill_holes_of_core_does_not_take_edema():
    labels = np.zeros((11, 11, 11), np.uint8)
    labels[2:9, 2:9, 2:9] = CORE
    labels[4:7, 4:7, 4:7] = EDEMA
    labels[5, 5, 5] = 0  # background inside edema inside core
    out = run(labels, non_enhancing_tumour=LabelPostprocess(fill_holes=True))
    assert np.all(out[4:7, 4:7, 4:7][labels[4:7, 4:7, 4:7] == EDEMA] == EDEMA)
    assert out[5, 5, 5] == CORE  # enclosed background (through the edema) is claimed by core


def test_smoothing_removes_one_voxel_spur():
    labels = np.zeros((15, 15, 15), np.uint8)
    labels[3:12, 3:12, 3:12] = EDEMA
    labels[7, 7, 12] = EDEMA  # a one-voxel spur on a face
    labels[0:2, 0:2, 0:2] = ENH
    # 1.5 mm on a 1 mm grid: the 18-neighbourhood. (With 1 mm, the 6-neighbour cross, a spur on
    # a face survives the opening: the spur plus its base's face neighbours form a whole cross.)
    out = run(labels, edema=LabelPostprocess(smoothing_radius_mm=1.5))
    assert out[7, 7, 12] == 0
    assert np.all(out[4:11, 4:11, 4:11] == EDEMA)  # the body stays
    np.testing.assert_array_equal(out[labels == ENH], ENH)  # other labels untouched
    assert not out[labels == 0].any()  # nothing grows


def test_smoothing_keeps_tumour_that_reaches_the_edge_of_the_view():
    """A lesion cut by the first slice keeps its edge slices (a closing never removes voxels; the
    image's edge is not the lesion's)."""
    labels = np.zeros((50, 50, 12), np.uint8)
    labels[5:45, 5:45, 0:8] = EDEMA  # 40 x 40 x 8 voxels: larger than either ball
    for spacing, radius in (((1.0, 1.0, 1.0), 2.0), ((0.8, 0.8, 6.5), 6.5)):
        out = run(labels, spacing=spacing, edema=LabelPostprocess(smoothing_radius_mm=radius))
        assert np.all(out[15:35, 15:35, 0] == EDEMA), (spacing, radius)  # the cut face stays
        assert not out[labels == 0].any()


def test_smoothing_never_claims_other_labels():
    labels = np.zeros((15, 15, 15), np.uint8)
    labels[3:12, 3:12, 3:12] = EDEMA
    labels[7, 7, 3:6] = ENH  # enhancing voxels in a narrow groove in the edema
    labels[7, 7, 6] = 0
    out = run(labels, edema=LabelPostprocess(smoothing_radius_mm=1.5))
    np.testing.assert_array_equal(out[labels == ENH], ENH)


def test_input_array_is_not_modified():
    rng = np.random.default_rng(3)
    labels = enhancing_ring()
    labels[rng.random(labels.shape) < 0.02] = EDEMA
    before = labels.copy()
    out = run(
        labels, tumour_ml=0.005,
        edema=LabelPostprocess(smoothing_radius_mm=1.0, min_component_ml=0.002, keep_largest=True),
        enhancing_tumour=LabelPostprocess(fill_holes=True),
    )
    np.testing.assert_array_equal(labels, before)
    assert not np.shares_memory(out, labels)
    assert out.dtype == np.uint8 and out.shape == labels.shape
    assert not np.array_equal(out, labels)  # something was cleaned


def test_label_order_does_not_depend_on_file_order():
    labels = np.zeros((30, 20, 20), np.uint8)
    labels[2:11, 2:11, 2:11] = CORE
    labels[3:10, 3:10, 3:10] = 0
    labels[6, 6, 6] = ENH               # a speck of enhancing inside a closed core shell
    labels[15:25, 5:15, 5:15] = ENH     # the large enhancing component
    fill = LabelPostprocess(fill_holes=True)
    largest = LabelPostprocess(keep_largest=True)
    in_label_order = run(labels, non_enhancing_tumour=fill, enhancing_tumour=largest)
    reversed_order = run(labels, enhancing_tumour=largest, non_enhancing_tumour=fill)
    np.testing.assert_array_equal(in_label_order, reversed_order)


@pytest.mark.parametrize(
    "radius, spacing",
    [(2.0, (0.5, 0.5, 2.0)), (1.0, (0.5, 0.5, 4.0)), (3.0, (1.0, 1.5, 0.7)), (1.0, (1.0, 1.0, 1.0))],
)
def test_ellipsoid_for_anisotropic_spacing(radius, spacing):
    ball = pp.ellipsoid(radius, np.asarray(spacing))
    half = [int(np.floor(radius / s)) for s in spacing]
    assert ball.shape == tuple(2 * h + 1 for h in half)
    assert ball.dtype == bool
    for index in itertools.product(*[range(n) for n in ball.shape]):
        offset_mm = [(i - h) * s for i, h, s in zip(index, half, spacing)]
        inside = sum(o * o for o in offset_mm) <= radius * radius + 1e-9
        assert ball[index] == inside, index
    # symmetric, and reaches the radius along each axis
    np.testing.assert_array_equal(ball, ball[::-1, ::-1, ::-1])
    centre = tuple(half)
    for axis in range(3):
        tip = list(centre)
        tip[axis] = 0
        assert ball[tuple(tip)]


# --- report.summarize --------------------------------------------------------------------

def label_map(array, affine):
    return LabelMap(array, affine, MSD, SourceGeometry(array.shape, affine))


def oblique_affine():
    a, b = np.deg2rad(20.0), np.deg2rad(-35.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([0.8, 1.2, 2.5])
    affine[:3, 3] = [-91.0, 37.5, -12.25]
    return affine


@pytest.mark.parametrize(
    "affine",
    [np.diag([0.5, 2.0, 3.0, 1.0]), np.diag([-1.0, -1.0, 2.0, 1.0]), oblique_affine()],
    ids=["scaled", "flipped", "oblique"],
)
def test_summary_volumes_in_ml(affine):
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[1:4, 1:4, 1:4] = EDEMA     # 27
    labels[5:9, 5:9, 5:7] = CORE      # 32
    labels[5:8, 1:3, 1:2] = ENH       # 6
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    summary = summarize(label_map(labels, affine))
    assert summary["label_scheme"] == "msd"
    assert summary["voxel_volume_ml"] == pytest.approx(voxel_ml)
    counts = {"edema": 27, "non_enhancing_tumour": 32, "enhancing_tumour": 6}
    for name, n in counts.items():
        assert summary["labels"][name]["voxels"] == n
        assert summary["labels"][name]["volume_ml"] == pytest.approx(n * voxel_ml, abs=1e-4)
    for region, n in {"WT": 65, "TC": 38, "ET": 6}.items():
        assert summary["regions"][region]["voxels"] == n
        assert summary["regions"][region]["volume_ml"] == pytest.approx(n * voxel_ml, abs=1e-4)


def test_summary_centroid_in_world_mm_for_oblique_affine():
    affine = oblique_affine()
    labels = np.zeros((12, 10, 8), np.uint8)
    labels[1:5, 2:4, 1:3] = EDEMA
    labels[7:11, 6:9, 4:7] = ENH
    labels[8, 1, 6] = ENH
    summary = summarize(label_map(labels, affine))

    def world_centroid(mask):
        ijk = np.argwhere(mask).astype(float)
        homogeneous = np.c_[ijk, np.ones(len(ijk))]
        return (homogeneous @ affine.T)[:, :3].mean(axis=0)

    for name, value in [("edema", EDEMA), ("enhancing_tumour", ENH)]:
        ras = world_centroid(labels == value)
        got = summary["labels"][name]
        assert got["centroid_ras_mm"] == pytest.approx(ras, abs=0.006)
        assert got["centroid_lps_mm"] == pytest.approx(ras * [-1, -1, 1], abs=0.006)
    wt = world_centroid(labels > 0)
    assert summary["regions"]["WT"]["centroid_ras_mm"] == pytest.approx(wt, abs=0.006)


def test_summary_components_and_empty_label():
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    labels = np.zeros((16, 8, 8), np.uint8)
    labels[1:3, 1:3, 1:3] = EDEMA
    labels[6:8, 1:3, 1:3] = EDEMA
    labels[11:13, 1:3, 1:3] = EDEMA
    labels[3, 3, 3] = CORE  # touches the first edema cube diagonally
    summary = summarize(label_map(labels, affine))
    assert summary["labels"]["edema"]["components"] == 3
    assert summary["labels"]["non_enhancing_tumour"]["components"] == 1
    assert summary["regions"]["WT"]["components"] == 3
    empty = summary["labels"]["enhancing_tumour"]
    assert empty["voxels"] == 0 and empty["volume_ml"] == 0 and empty["components"] == 0
    assert empty["centroid_ras_mm"] is None and empty["centroid_lps_mm"] is None
    assert summary["regions"]["ET"]["voxels"] == 0


def test_small_component_threshold_uses_the_reports_voxel_volume_on_a_sheared_grid():
    # Columns (1,0,0), (0.75,1,0), (0,0,1): voxel spacing 1 x 1.25 x 1 mm but 1 mm^3 per voxel.
    # A 100-voxel blob is 0.100 mL (as the report says), not 0.125: below a 0.11 mL threshold.
    affine = np.eye(4)
    affine[0, 1] = 0.75
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[1:6, 1:6, 1:5] = EDEMA  # 100 voxels
    config = PostprocessConfig(tumour_min_component_ml=0.11, labels={})
    assert summarize(label_map(labels, affine))["regions"]["WT"]["volume_ml"] == pytest.approx(0.1)
    assert not pp.postprocess(labels, affine, config, MSD).any()
    assert pp.postprocess(labels, np.diag([1.0, 1.25, 1.0, 1.0]), config, MSD).sum() == 100 * EDEMA
