"""The validation report: overlays show the tumour where it is, the HTML page stands alone.

The overlay tests paint a tumour at a known point in world space (patient's right, anterior,
superior) into volumes stored in RAS, LPS and permuted voxel orders with anisotropic voxels: the
same anatomy must come out on the same side of every panel, at true proportions.
"""
from __future__ import annotations

import base64
import io
import math
import os
import re
import shutil
import subprocess
import sys

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest

from conftest import shared_data
from tumorseg.validation_report import (
    REGION_COLOURS,
    boxplot_values,
    dice_boxplot_png,
    overlay_figure,
    overlay_png,
    overlay_views,
    render_html,
    write_html_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DIRECTIONS = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}
# Field of view along R, A, S (mm), and the tumour: right, anterior and superior of the centre.
FOV_MM = {"R": 130.0, "A": 150.0, "S": 110.0}  # wider than the head: the overlay crops to it
TUMOUR_MM = np.array([28.0, 20.0, 16.0])
TUMOUR_RADIUS_MM = 12.0

ORIENTATIONS = {
    "RAS": (("R", "A", "S"), (1.0, 1.2, 4.0)),
    "LPS": (("L", "P", "S"), (1.5, 1.0, 3.0)),
    "permuted-SPL": (("S", "P", "L"), (3.5, 1.0, 1.25)),
}


def phantom(codes: tuple[str, str, str], spacing: tuple[float, float, float]):
    """A brain with a three-region tumour, on a grid whose voxel axes run along ``codes``.

    The affine centres the grid on world (0, 0, 0), so world x > 0 is the patient's right.
    """
    axes = [next(n for n, d in enumerate("RAS") if DIRECTIONS[c][n] != 0) for c in codes]
    shape = tuple(int(round(FOV_MM["RAS"[a]] / s)) for a, s in zip(axes, spacing))
    affine = np.eye(4)
    affine[:3, :3] = np.column_stack([np.array(DIRECTIONS[c], float) * s for c, s in zip(codes, spacing)])
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    ijk = np.indices(shape).reshape(3, -1)
    world = (affine[:3, :3] @ ijk + affine[:3, 3:]).T.reshape(*shape, 3)
    rng = np.random.default_rng(0)
    brain = ((world / [45.0, 55.0, 38.0]) ** 2).sum(-1) < 1
    image = np.where(brain, 100 + 0.3 * world[..., 1] + rng.normal(0, 4, shape), 0).astype(np.float32)
    distance = np.linalg.norm(world - TUMOUR_MM, axis=-1)
    truth = {"WT": distance < TUMOUR_RADIUS_MM, "TC": distance < 7, "ET": (distance < 7) & (distance > 4)}
    image[truth["WT"]] += 50
    return image, affine, truth


@pytest.fixture(scope="module", params=list(ORIENTATIONS))
def case(request):
    codes, spacing = ORIENTATIONS[request.param]
    image, affine, truth = phantom(codes, spacing)
    assert "".join(nib.aff2axcodes(affine)) == "".join(codes)
    return image, affine, truth


def colour_mask(rgb: np.ndarray, hex_colour: str, tolerance: float = 0.12) -> np.ndarray:
    """Pixels within ``tolerance`` (0-1, per channel) of ``hex_colour``: antialiased edges miss, cores hit."""
    target = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]) / 255
    return (np.abs(rgb[..., :3] - target) < tolerance).all(axis=-1)


def decode_png(data: bytes) -> np.ndarray:
    assert data[:8] == PNG_SIGNATURE
    return mpimg.imread(io.BytesIO(data), format="png")


def test_overlay_views_reorient_to_ras_and_cross_the_tumour(case):
    image, affine, truth = case
    views = overlay_views(image, affine, truth, truth)
    # The reoriented grid is RAS, and the chosen voxel is the tumour's centre in world space.
    assert np.all(np.diag(views.affine)[:3] > 0)
    assert np.allclose(views.affine[:3, :3], np.diag(np.diag(views.affine)[:3]))
    world = views.affine @ [*views.centre, 1]
    assert np.all(np.abs(world[:3] - TUMOUR_MM) <= np.array(views.spacing) / 2 + 1e-6), world
    # Independent reorientation: nibabel's canonical image, cropped and sliced at the same voxel.
    canonical = nib.as_closest_canonical(nib.Nifti1Image(image, affine)).get_fdata()
    box = views.box
    assert np.array_equal(views.panels[0].image, canonical[box][:, :, views.centre[2] - box[2].start].T[::-1, ::-1])
    # The crop keeps the whole head and drops most of the empty border.
    head = np.argwhere(canonical != 0)
    for axis, b in enumerate(box):
        assert b.start <= head[:, axis].min() and head[:, axis].max() < b.stop
    assert np.prod([b.stop - b.start for b in box]) < 0.8 * image.size


@pytest.mark.parametrize("panel_index, letters", [
    (0, ("R", "L", "A", "P")),
    (1, ("R", "L", "S", "I")),
    (2, ("A", "P", "S", "I")),
])
def test_overlay_panels_radiological_and_true_proportions(case, panel_index, letters):
    image, affine, truth = case
    views = overlay_views(image, affine, truth, truth)
    panel = views.panels[panel_index]
    assert panel.letters == letters
    # The tumour is right (axial, coronal) or anterior (sagittal), and anterior or superior:
    # the first letter's side and the top.
    rows, cols = np.nonzero(panel.truth["WT"])
    height, width = panel.image.shape
    assert rows.size > 0, "the slice misses the tumour"
    assert cols.mean() < width / 2 - 5
    assert rows.mean() < height / 2 - 3
    # Drawn height over width equals the shown box's height over width in mm (spacing from nibabel).
    zooms = nib.as_closest_canonical(nib.Nifti1Image(image, affine)).header.get_zooms()
    extent_mm = [(b.stop - b.start) * z for b, z in zip(views.box, zooms)]
    across, down = {0: (0, 1), 1: (0, 2), 2: (1, 2)}[panel_index]
    assert (width, height) == (views.box[across].stop - views.box[across].start,
                               views.box[down].stop - views.box[down].start)
    assert panel.aspect * height / width == pytest.approx(extent_mm[down] / extent_mm[across], rel=1e-6)
    assert panel.aspect == pytest.approx(zooms[down] / zooms[across])


def test_overlay_png_draws_contours_on_the_right_side(case):
    image, affine, truth = case
    pred = {"WT": truth["WT"], "TC": truth["TC"]}
    png = overlay_png(image, affine, pred, truth, title="synth")
    assert len(png) < 60_000
    rgb = decode_png(png)
    assert rgb.shape[:2] == (330, 900)
    figure = overlay_figure(image, affine, pred, truth, title="synth")
    figure.canvas.draw()
    for ax in figure.axes:
        box = ax.get_window_extent()
        x0, x1 = int(box.x0), int(math.ceil(box.x1))
        r0, r1 = rgb.shape[0] - int(math.ceil(box.y1)), rgb.shape[0] - int(box.y0)
        region = rgb[r0:r1, x0:x1]
        rows, cols = np.nonzero(colour_mask(region, REGION_COLOURS["WT"]))
        assert cols.size > 20, f"no WT outline in the {ax.get_label()} panel"
        assert np.nonzero(colour_mask(region, REGION_COLOURS["TC"]))[0].size > 5
        # Right (or anterior in sagittal) on the viewer's left; anterior or superior up.
        assert cols.mean() < region.shape[1] / 2 - 5, ax.get_label()
        assert rows.mean() < region.shape[0] / 2 - 3, ax.get_label()


def test_overlay_centre_falls_back_to_prediction_then_volume_centre():
    image, affine, truth = phantom(("L", "P", "S"), (1.5, 1.0, 3.0))
    views = overlay_views(image, affine, {"WT": truth["WT"]}, None)
    assert np.all(np.abs((views.affine @ [*views.centre, 1])[:3] - TUMOUR_MM) <= 1.5)
    empty = {"WT": np.zeros_like(truth["WT"])}
    views = overlay_views(image, affine, empty, empty)
    assert views.centre == tuple(n // 2 for n in nib.as_closest_canonical(nib.Nifti1Image(image, affine)).shape)
    assert overlay_png(image, affine, empty, None)[:8] == PNG_SIGNATURE
    # Case ids are folder names: '$' must not be parsed as mathtext (it failed the picture).
    assert overlay_png(image, affine, empty, None, title=r"p$\q$")[:8] == PNG_SIGNATURE


def test_overlay_ignores_a_constant_nonzero_background():
    """Z-scored scans (BraTS 2015) keep a constant negative background: not tissue, not content."""
    image, affine, truth = phantom(("L", "P", "S"), (1.5, 1.0, 3.0))
    zscored = np.where(image == 0, -3.2, (image - 100) / 10).astype(np.float32)
    plain, shifted = overlay_views(image, affine, truth, truth), overlay_views(zscored, affine, truth, truth)
    assert shifted.box == plain.box
    assert shifted.window == pytest.approx(tuple((w - 100) / 10 for w in plain.window), rel=1e-4)


def test_overlay_real_case_shows_the_tumour_on_its_side():
    """A real BraTS 2015 case (LPS on disk): its tumour is right, posterior and superior of the brain centre."""
    folder = shared_data("brats2015-dev", "brats_2013_pat0003_1")
    flair = nib.load(folder / "Flair_subtrMeanDivStd.nii.gz")
    labels = np.asarray(nib.load(folder / "OTMultiClass.nii.gz").dataobj)
    brain = np.asarray(nib.load(folder / "brainmask.nii.gz").dataobj) > 0
    truth = {"WT": labels > 0, "TC": np.isin(labels, (1, 3, 4)), "ET": labels == 4}
    offset = (nib.affines.apply_affine(flair.affine, np.argwhere(truth["WT"]).mean(0))
              - nib.affines.apply_affine(flair.affine, np.argwhere(brain).mean(0)))
    assert offset[0] > 10 and offset[1] < -10 and offset[2] > 10  # what the checks below rely on
    image = np.asarray(flair.dataobj, dtype=np.float32)
    rgb = decode_png(overlay_png(image, flair.affine, truth, truth))
    figure = overlay_figure(image, flair.affine, truth, truth)
    figure.canvas.draw()
    expected = {"axial": ("left", "bottom"), "coronal": ("left", "top"), "sagittal": ("right", "top")}
    for ax in figure.axes:
        box = ax.get_window_extent()
        region = rgb[rgb.shape[0] - int(math.ceil(box.y1)):rgb.shape[0] - int(box.y0),
                     int(box.x0):int(math.ceil(box.x1))]
        rows, cols = np.nonzero(colour_mask(region, REGION_COLOURS["WT"]))
        horizontal, vertical = expected[ax.get_label()]
        assert (cols.mean() < region.shape[1] / 2) == (horizontal == "left"), ax.get_label()
        assert (rows.mean() < region.shape[0] / 2) == (vertical == "top"), ax.get_label()


def test_overlay_rejects_masks_off_the_image_grid():
    image, affine, truth = phantom(("R", "A", "S"), (2.0, 2.0, 4.0))
    with pytest.raises(ValueError, match="WT mask has shape"):
        overlay_views(image, affine, {"WT": truth["WT"][:-1]}, None)


def test_figures_leave_pyplot_alone():
    code = (
        "import sys, numpy as np\n"
        "from tumorseg.validation_report import overlay_png, dice_boxplot_png\n"
        "m = np.zeros((8, 8, 8), bool); m[2:5, 2:5, 2:5] = True\n"
        "overlay_png(np.ones((8, 8, 8), np.float32), np.eye(4), {'WT': m}, {'WT': m})\n"
        "dice_boxplot_png({'cases': []})\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def metrics_for(cases: list[dict]) -> dict:
    def stats(mean, n):
        return {"mean": mean, "median": mean, "std": 0.0123456, "worst": None if mean is None else mean / 2, "n": n}

    return {
        "title": "tumorseg validation: synth-eval",
        "dataset": "synth-eval",
        "created": "2026-11-26T20:00:00Z",
        "model": {"name": "tumorseg-default", "version": "1", "weights_sha256": "8db1" + "0" * 60},
        "prediction_scheme": "msd",
        "truth_scheme": "brats2015",
        "nsd_tolerance_mm": 2.0,
        "conventions": {"dice": "2|P∩T| / (|P|+|T|); 1 when both are empty",
                        "hd95_mm": "95th percentile of surface distances <both ways>"},
        "structures": ["WT", "TC", "ET", "edema"],
        "cases": cases,
        "aggregate": {
            "WT": {"dice": stats(0.912345, 2), "hd95_mm": stats(3.14159, 2)},
            "TC": {"dice": stats(float("nan"), 0), "hd95_mm": stats(None, 0)},
            "ET": {"dice": stats(0.5, 2), "hd95_mm": stats(float("inf"), 1)},
            "edema": {"dice": stats(0.7, 2)},
        },
    }


def ok_case(case_id: str, dice_wt: float | None = 0.912345, hd95_wt: float | None = 3.14159) -> dict:
    scores = {
        "WT": {"dice": dice_wt, "hd95_mm": hd95_wt, "nsd": 0.88, "volume_pred_ml": 40.123,
               "volume_truth_ml": 42.0, "volume_diff_ml": -1.877, "relative_volume_diff": -0.0447},
        "TC": {"dice": float("nan"), "hd95_mm": float("nan"), "nsd": None, "volume_pred_ml": 0.0,
               "volume_truth_ml": 0.0, "volume_diff_ml": 0.0, "relative_volume_diff": None},
        "ET": {"dice": 0.5, "hd95_mm": float("inf"), "nsd": 0.2, "volume_pred_ml": 1.0,
               "volume_truth_ml": 2.0, "volume_diff_ml": -1.0, "relative_volume_diff": -0.5},
    }
    return {"case_id": case_id, "status": "ok", "error": None, "spacing_mm": [1.0, 1.0, 3.0], "scores": scores}


def failed_case(case_id: str, error: str) -> dict:
    return {"case_id": case_id, "status": "error", "error": error, "spacing_mm": None, "scores": {}}


def test_boxplot_uses_only_finite_values_of_ok_cases():
    metrics = metrics_for([ok_case("a", 0.9), ok_case("b", None), ok_case("c", float("nan")),
                           failed_case("d", "boom")])
    values = boxplot_values(metrics)
    assert values == {"WT": [0.9], "TC": [], "ET": [0.5, 0.5, 0.5]}
    assert boxplot_values(metrics, "hd95_mm")["ET"] == []  # infinite HD95 is not a point
    assert dice_boxplot_png(metrics)[:8] == PNG_SIGNATURE
    assert dice_boxplot_png({"cases": []})[:8] == PNG_SIGNATURE


def test_render_html_escapes_embeds_and_formats():
    evil = "<script>x</script>"
    error = 'input: truncated gzip <file "a&b.nii.gz">'
    overlays = {evil: b"\x89PNG\r\n\x1a\nfirst", "synth_001": b"\x89PNG\r\n\x1a\nsecond"}
    metrics = metrics_for([ok_case(evil), ok_case("synth_001", None, float("nan")), failed_case("bad_case", error)])
    page = render_html(metrics, overlays)
    text = re.sub(r"data:image/png;base64,[^\"]*", "data:", page)  # base64 can spell anything

    assert evil not in page and "<script" not in page.lower()
    assert "&lt;script&gt;x&lt;/script&gt;" in page
    assert 'alt="overlay &lt;script&gt;x&lt;/script&gt;"' in page
    assert 'alt="overlay synth_001"' in page
    assert 'truncated gzip &lt;file &quot;a&amp;b.nii.gz&quot;&gt;' in page
    assert re.search(r'<tr class="failed">.*?bad_case.*?truncated gzip', page, re.S)
    assert "&lt;both ways&gt;" in page  # conventions are listed, escaped

    # Self-contained: every image is inline data, every link stays on the page.
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<link|<script|@import|url\(", page, re.I)
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    decoded = [base64.b64decode(s.split(",", 1)[1]) for s in sources]
    assert overlays[evil] in decoded and overlays["synth_001"] in decoded
    assert sum(d[:8] == PNG_SIGNATURE for d in decoded) == 3  # two overlays and the box plot
    for href in re.findall(r'href="([^"]*)"', page):
        assert href.startswith("#") and f'id="{href[1:]}"' in page

    # Numbers: 3 places for Dice, 2 for mm and mL; None and NaN as an en dash, inf as ∞.
    assert "0.912" in text and "0.9123" not in text
    assert "3.14" in text and "3.142" not in text
    assert "40.12 / 42.00" in text
    assert "2.00 mm" in text  # NSD tolerance
    assert "nan" not in text.lower() and "None" not in text
    assert "\u2013" in text and "\u221e" in text
    # The second case has no WT Dice or HD95: its row shows dashes.
    row = re.search(r'<tr><td class="l"><a href="#case-synth_001">.*?</tr>', text, re.S).group(0)
    assert row.count("<td>\u2013</td>") >= 4


def test_render_html_without_model_or_cases():
    metrics = metrics_for([])
    metrics["model"] = None
    metrics["aggregate"] = {}
    page = render_html(metrics, {})
    assert "another tool" in page and "No case was scored" in page


def test_write_html_report_is_atomic(tmp_path):
    metrics = metrics_for([ok_case("synth_000")])
    path = write_html_report(tmp_path / "out" / "report.html", metrics, {})
    assert path == tmp_path / "out" / "report.html"
    assert path.read_text(encoding="utf-8") == render_html(metrics, {})
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]


def test_chromium_renders_the_overlays(tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not on PATH, and CI installs it (apt-get install chromium)")
        pytest.skip("chromium is not on PATH (apt-get install chromium); CI runs this test")
    image, affine, truth = phantom(("L", "P", "S"), (1.5, 1.0, 3.0))
    overlays = {"synth_000": overlay_png(image, affine, truth, truth, title="synth_000"),
                "synth_001": overlay_png(image, affine, {"WT": truth["WT"]}, None, title="synth_001")}
    metrics = metrics_for([ok_case("synth_000"), ok_case("synth_001")])
    home = tmp_path / "home"
    home.mkdir()
    # Chromium's profile, caches and crash dumps all land under tmp_path.
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_CACHE_HOME": str(home / ".cache")}

    def screenshot(name: str, page_overlays: dict[str, bytes]) -> np.ndarray:
        report = write_html_report(tmp_path / f"{name}.html", metrics, page_overlays)
        shot = tmp_path / f"{name}.png"
        command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   "--hide-scrollbars", "--force-device-scale-factor=1", f"--user-data-dir={tmp_path / 'profile'}",
                   "--window-size=1200,1600", f"--screenshot={shot}", report.as_uri()]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert shot.exists(), f"no screenshot (exit {result.returncode}): {result.stderr[-2000:]}"
        rgb = mpimg.imread(shot)
        assert rgb.shape[:2] == (1600, 1200)
        return rgb

    rgb = screenshot("report", overlays)
    wt_pixels = int(colour_mask(rgb, REGION_COLOURS["WT"]).sum())
    assert wt_pixels > 150, f"only {wt_pixels} pixels of the WT outline colour: overlays not rendered"
    # The page itself rendered: dark overlay background and white page both present.
    assert (rgb[..., :3].max(axis=-1) < 0.05).sum() > 50_000
    assert (rgb[..., :3].min(axis=-1) > 0.95).sum() > 200_000
    # Control: the same page without overlays has (next to) none of that colour, so the pixels
    # counted above came from the overlay images, not from the page or the box plot.
    control = int(colour_mask(screenshot("control", {}), REGION_COLOURS["WT"]).sum())
    assert control < 20, f"{control} pixels of the WT colour on a page without overlays"
