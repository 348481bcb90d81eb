"""Overview stage: a quick look at a result, ``overview.png`` beside the label map.

Row 1: the reference sequence in three orthogonal planes (axial, coronal, sagittal) through the
centre of the largest tumour component (the volume's centre when nothing was found), each label's
outline in its own colour. One more row for every sequence that was moved onto the reference grid
(registered or placed by scanner coordinates): the same planes of that sequence, with the
reference's edges drawn over it in cyan, so that a registration that went wrong shows at a glance.
When the brain was extracted, the brain mask's outline is drawn in white on the reference row.

Pure core (``render``: arrays in, an RGB array out); ``png_bytes`` encodes it. Planes are shown
in the radiological convention (patient's right on the image's left, anterior and superior up) at
about 1 mm per pixel, whatever the grid's orientation and voxel size.
"""
from __future__ import annotations

import io

import numpy as np
from nibabel.orientations import io_orientation
from scipy import ndimage as ndi

from ..labels import LabelScheme
from ..scan import voxel_spacing

EDGE_COLOUR = (0, 255, 255)
#: The brain mask's outline on the reference row, when the brain was extracted.
BRAIN_COLOUR = (255, 255, 255)
#: Pixel size of the panels, mm, and the largest panel side, pixels.
PIXEL_MM = 1.0
MAX_SIDE = 320


def window(array: np.ndarray) -> np.ndarray:
    """``array`` as uint8 grey levels: its 1st to 99.5th percentile of non-background voxels."""
    foreground = array != array.flat[0]
    values = array[foreground] if foreground.any() else array
    sample = values[:: max(1, values.size // 200_000)]
    lo, hi = np.percentile(sample, [1.0, 99.5]) if sample.size else (0.0, 1.0)
    if hi - lo < 1e-6:  # flat tissue: the whole range, background to tissue
        lo, hi = float(array.min()), float(array.max())
    scaled = (array.astype(np.float32) - lo) / max(float(hi - lo), 1e-6)
    return np.clip(np.rint(scaled * 255), 0, 255).astype(np.uint8)


def centre_of_largest(labels: np.ndarray) -> tuple[int, int, int]:
    """The voxel at the centre of the largest connected tumour component (or of the volume)."""
    import cc3d

    tumour = labels > 0
    if not tumour.any():
        return tuple(int(n // 2) for n in labels.shape)  # type: ignore[return-value]
    components = cc3d.connected_components(tumour, connectivity=26)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    centre = ndi.center_of_mass(components == int(np.argmax(sizes)))
    return tuple(int(round(c)) for c in centre)  # type: ignore[return-value]


def render(volumes: dict[str, np.ndarray], reference: str, labels: np.ndarray, affine: np.ndarray,
           scheme: LabelScheme, brain_mask: np.ndarray | None = None) -> np.ndarray:
    """The overview as an RGB array (H, W, 3) uint8. ``volumes``: uint8 grey volumes on the
    label map's grid (``window``), the reference first, then each moved sequence. ``brain_mask``:
    its outline in white on the reference row (drawn under the labels' outlines)."""
    ornt = io_orientation(affine).astype(int)
    spacing = voxel_spacing(affine)
    centre = centre_of_largest(labels)
    ras_centre, ras_spacing = np.zeros(3, dtype=int), np.zeros(3)
    for axis, (out_axis, flip) in enumerate(ornt):
        ras_centre[out_axis] = centre[axis] if flip == 1 else labels.shape[axis] - 1 - centre[axis]
        ras_spacing[out_axis] = spacing[axis]

    def to_ras(array: np.ndarray) -> np.ndarray:
        return np.transpose(_flip(array, ornt), np.argsort(ornt[:, 0]))

    ras_labels = to_ras(labels)
    ras_brain = None if brain_mask is None else to_ras(brain_mask.astype(np.uint8))
    reference_ras = to_ras(volumes[reference])
    rows = []
    for name, volume in volumes.items():
        grey = to_ras(volume)
        panels = []
        for plane in range(3):
            image = _plane(grey, plane, ras_centre, ras_spacing, order=1)
            rgb = np.repeat(image[..., None], 3, axis=2)
            if name == reference:
                if ras_brain is not None:
                    rgb[_outline(_plane(ras_brain, plane, ras_centre, ras_spacing, order=0) > 0)] = BRAIN_COLOUR
                lab = _plane(ras_labels, plane, ras_centre, ras_spacing, order=0)
                for label in scheme.labels:
                    rgb[_outline(lab == label.value)] = label.color
            else:
                rgb[_edges(_plane(reference_ras, plane, ras_centre, ras_spacing, order=1))] = EDGE_COLOUR
            panels.append(rgb)
        rows.append(_row(panels))
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)


def png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(out, format="PNG")
    return out.getvalue()


def _flip(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    for axis, (_, flip) in enumerate(ornt):
        if flip == -1:
            array = np.flip(array, axis=axis)
    return array


def _plane(ras: np.ndarray, plane: int, centre: np.ndarray, spacing: np.ndarray, order: int) -> np.ndarray:
    """One plane through ``centre`` of a RAS-ordered volume, radiological, at about PIXEL_MM."""
    if plane == 0:  # axial: rows anterior to posterior, columns patient right to left
        image, (sr, sc) = ras[::-1, ::-1, centre[2]].T, (spacing[1], spacing[0])
    elif plane == 1:  # coronal: rows superior to inferior, columns right to left
        image, (sr, sc) = ras[::-1, centre[1], ::-1].T, (spacing[2], spacing[0])
    else:  # sagittal: rows superior to inferior, columns anterior to posterior
        image, (sr, sc) = ras[centre[0], ::-1, ::-1].T, (spacing[2], spacing[1])
    zoom = np.array([sr, sc]) / PIXEL_MM
    zoom *= min(1.0, float((MAX_SIDE / (np.array(image.shape) * zoom)).min()))  # one factor: no stretching
    return ndi.zoom(image, zoom, order=order, mode="nearest", grid_mode=True)


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndi.binary_erosion(mask)


def _edges(image: np.ndarray) -> np.ndarray:
    from skimage.feature import canny

    return canny(image.astype(np.float32) / 255.0, sigma=2.0, low_threshold=0.05, high_threshold=0.15)


def _row(panels: list[np.ndarray], gap: int = 4) -> np.ndarray:
    height = max(p.shape[0] for p in panels)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, gap), (0, 0))) for p in panels]
    return np.concatenate(padded, axis=1)
