"""overview.png: planes through the largest tumour, label outlines in their colours, radiological
orientation, and the reference's edges over moved sequences; read back from the PNG."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from tumorseg.labels import get_scheme
from tumorseg.stages import overview

SCHEME = get_scheme("msd")
COLOURS = {label.value: tuple(label.color) for label in SCHEME.labels}


def phantom(shape=(60, 70, 50)):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    head = np.linalg.norm((grid - np.array(shape) / 2) / (np.array(shape) / 2.4), axis=-1) < 1
    image = np.where(head, 100.0, 0.0).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    r = np.linalg.norm(grid - (40, 30, 25), axis=-1)  # the large tumour, right of the midline (+x = right)
    labels[r < 9], labels[r < 6], labels[r < 3] = 1, 2, 3
    labels[np.linalg.norm(grid - (15, 50, 25), axis=-1) < 2] = 1  # a small second lesion
    return image, labels


def colours_in(rgb: np.ndarray) -> set[tuple[int, int, int]]:
    return {tuple(int(v) for v in c) for c in np.unique(rgb.reshape(-1, 3), axis=0)}


def test_planes_cross_the_largest_tumour_with_each_label_outlined():
    image, labels = phantom()
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    assert overview.centre_of_largest(labels) == (40, 30, 25)
    rgb = overview.render({"t1gd": overview.window(image)}, "t1gd", labels, affine, SCHEME)
    png = Image.open(io.BytesIO(overview.png_bytes(rgb)))
    assert png.mode == "RGB" and np.array_equal(np.asarray(png), rgb)
    assert {COLOURS[1], COLOURS[2], COLOURS[3]} <= colours_in(rgb)
    # Axial panel (first, 70 x 60 at 1 mm): radiological, so the tumour at +x (the patient's
    # right) lies in the image's left half, and at y = 30 of 70 (posterior half) in its lower half.
    axial = rgb[:70, :60]
    rows, cols = np.nonzero(np.all(axial == COLOURS[3], axis=-1))
    assert cols.mean() < 30 and rows.mean() > 35
    assert overview.EDGE_COLOUR not in colours_in(rgb)  # no moved sequence: no edge row


def test_a_moved_sequence_gets_a_row_with_the_reference_edges():
    image, labels = phantom()
    affine = np.diag([-1.2, 1.0, 3.0, 1.0])  # LAS, thick slices: shown radiological, about 1 mm a pixel
    moved = overview.window(np.roll(image, 6, axis=0))
    rgb = overview.render({"t1gd": overview.window(image), "flair": moved}, "t1gd", labels, affine, SCHEME)
    height = 70  # the axial panel: 70 voxels of 1 mm along y
    assert rgb.shape[0] >= 2 * height
    lower = rgb[rgb.shape[0] // 2:]
    assert overview.EDGE_COLOUR in colours_in(lower) and COLOURS[3] not in colours_in(lower)
    # The sagittal panel spans 50 slices of 3 mm: about 150 pixels high, not 50.
    assert rgb.shape[0] >= 2 * 140


def test_no_tumour_shows_the_centre():
    image, _ = phantom()
    empty = np.zeros(image.shape, np.uint8)
    assert overview.centre_of_largest(empty) == (30, 35, 25)
    rgb = overview.render({"t1": overview.window(image)}, "t1", empty, np.eye(4), SCHEME)
    assert not ({COLOURS[1], COLOURS[2], COLOURS[3]} & colours_in(rgb))


def test_a_field_of_view_over_the_panel_limit_is_shrunk_without_stretching():
    """Each axis was capped on its own at MAX_SIDE pixels: a 40 mm sphere in a 400 mm tall view was
    drawn 41 pixels wide but 33 tall in the coronal and sagittal panels."""
    shape = (200, 256, 400)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    sphere = np.linalg.norm(grid - np.array(shape) / 2, axis=-1) < 20
    for plane in (1, 2):  # coronal, sagittal: rows along the 400 mm axis
        drawn = overview._plane(sphere.astype(np.float32), plane, np.array(shape) // 2, np.ones(3), 0) > 0.5
        rows, cols = np.nonzero(drawn)
        assert max(drawn.shape) <= overview.MAX_SIDE
        assert abs((rows.max() - rows.min()) - (cols.max() - cols.min())) <= 1, plane
