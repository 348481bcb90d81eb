"""The validation report: overlay images, a box plot and one self-contained HTML page.

Everything here draws what ``tumorseg validate`` already scored (its ``metrics`` dict); nothing is
scored again. Figures use matplotlib's object API on the Agg canvas, so no display is needed and
no pyplot state (open figures, rcParams) leaks into the caller. matplotlib is imported only when
a figure is drawn, so the rest of tumorseg does not pay for it.

Display convention: radiological. Axial panels are seen from the feet (anterior up) and coronal
panels from the front (superior up): both put the patient's right on the viewer's left. Sagittal
panels are seen from the patient's left: anterior left, superior up. Every panel carries the
orientation letters at its edges and the figure says "radiological", so no one has to guess.
"""
from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

from .atomic import write_bytes_atomic
from .labels import REGIONS

REGION_NAMES = {"WT": "whole tumour", "TC": "tumour core", "ET": "enhancing tumour"}
# Okabe-Ito colours: told apart with every common colour-vision deficiency, and bright on grey MRI.
REGION_COLOURS = {"WT": "#56B4E9", "TC": "#F0E442", "ET": "#D55E00"}
# Nested regions often share an edge (a ring-enhancing core): wider lines under narrower ones
# keep every colour visible where outlines coincide.
REGION_LINEWIDTHS = {"WT": 2.4, "TC": 1.8, "ET": 1.2}
# Box-plot points: Okabe-Ito blue, a colour the overlays never use.
POINT_COLOUR = "#0072B2"
CONVENTION_CAPTION = "Radiological view: patient's right on the viewer's left"

OVERLAY_DPI = 80
OVERLAY_SIZE_IN = (11.25, 4.125)  # 900 x 330 px at 80 dpi

METRIC_LABELS = {
    "dice": "Dice",
    "hd95_mm": "HD95 (mm)",
    "nsd": "NSD",
    "volume_diff_ml": "Volume diff (mL)",
    "volume_pred_ml": "Volume pred (mL)",
    "volume_truth_ml": "Volume truth (mL)",
    "relative_volume_diff": "Relative volume diff",
}
DASH = "\u2013"  # en dash: what a missing or undefined number shows as


@dataclass(frozen=True)
class Panel:
    """One displayed slice: 2D arrays in screen order (row 0 at the top, column 0 at the left).

    ``aspect`` is the height of one displayed pixel over its width (row spacing over column
    spacing, in mm), as ``imshow(aspect=...)`` takes it. ``letters`` are the patient directions
    at the left, right, top and bottom edges.
    """

    name: str
    index: int
    image: np.ndarray
    pred: dict[str, np.ndarray]
    truth: dict[str, np.ndarray]
    aspect: float
    letters: tuple[str, str, str, str]


@dataclass(frozen=True)
class OverlayViews:
    """The three panels through ``centre``, a voxel index into the RAS-reoriented volume.

    ``affine`` is the RAS-reoriented volume's affine (so ``affine @ (*centre, 1)`` is the world
    point the slices cross) and ``spacing`` its voxel size in mm along R, A and S. ``box`` is the
    part of the RAS volume the panels show: the head (nonzero voxels) and the masks, with a margin.
    """

    centre: tuple[int, int, int]
    affine: np.ndarray
    spacing: tuple[float, float, float]
    window: tuple[float, float]
    box: tuple[slice, slice, slice]
    panels: tuple[Panel, Panel, Panel]


def reorient_to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``volume`` with its axes permuted and flipped to the nearest R, A, S order, and its affine.

    Slicing the result along its axes gives the true sagittal, coronal and axial planes whatever
    the file's voxel order (LPS from DICOM, permuted, flipped).
    """
    ornt = io_orientation(affine)
    ras = apply_orientation(volume, ornt)
    return ras, affine @ inv_ornt_aff(ornt, volume.shape)


def slice_centre(*masks: np.ndarray | None, shape: Sequence[int]) -> tuple[int, int, int]:
    """The voxel the slices go through: the centre of mass of the first non-empty mask.

    Called with the truth WT mask, then the predicted one, so the panels show the real tumour
    first; the volume centre when every mask is empty or absent.
    """
    for mask in masks:
        if mask is not None and mask.any():
            centre = np.argwhere(mask).mean(axis=0)
            return tuple(int(np.clip(round(float(c)), 0, n - 1)) for c, n in zip(centre, shape))  # type: ignore[return-value]
    return tuple(int(n // 2) for n in shape)  # type: ignore[return-value]


def overlay_views(image: np.ndarray, affine: np.ndarray, pred: Mapping[str, np.ndarray],
                  truth: Mapping[str, np.ndarray] | None) -> OverlayViews:
    """Reorient the image and masks to RAS and cut the axial, coronal and sagittal panels."""
    image = np.asarray(image)
    affine = np.asarray(affine, dtype=float)
    if image.ndim != 3:
        raise ValueError(f"overlay image must be 3D, got shape {image.shape}")
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {affine.shape}")
    for source, masks in (("prediction", pred), ("ground truth", truth or {})):
        for name, mask in masks.items():
            if np.shape(mask) != image.shape:
                raise ValueError(f"{source} {name} mask has shape {np.shape(mask)}, image has {image.shape}")

    ras_image, ras_affine = reorient_to_ras(image, affine)
    ras_pred = {r: reorient_to_ras(np.asarray(pred[r], bool), affine)[0] for r in REGIONS if r in pred}
    ras_truth = {r: reorient_to_ras(np.asarray(truth[r], bool), affine)[0] for r in REGIONS if truth and r in truth}
    spacing = tuple(float(s) for s in np.linalg.norm(ras_affine[:3, :3], axis=0))
    centre = slice_centre(ras_truth.get("WT"), ras_pred.get("WT"), shape=ras_image.shape)
    sx, sy, sz = spacing
    box = content_box(ras_image, [*ras_pred.values(), *ras_truth.values()], centre, spacing)
    i, j, k = (c - b.start for c, b in zip(centre, box))

    def cut(name: str, index: int, take, aspect: float, letters: tuple[str, str, str, str]) -> Panel:
        # Each plane is (first RAS axis, second RAS axis); transposed, the second runs down the
        # rows and the first along the columns; both flips put A or S at the top and R or A left.
        def screen(volume: np.ndarray) -> np.ndarray:
            return take(volume[box]).T[::-1, ::-1]

        return Panel(name, index, screen(ras_image).astype(np.float32),
                     {r: screen(m) for r, m in ras_pred.items()},
                     {r: screen(m) for r, m in ras_truth.items()}, aspect, letters)

    panels = (
        cut("axial", centre[2], lambda v: v[:, :, k], sy / sx, ("R", "L", "A", "P")),
        cut("coronal", centre[1], lambda v: v[:, j, :], sz / sx, ("R", "L", "S", "I")),
        cut("sagittal", centre[0], lambda v: v[i, :, :], sz / sy, ("A", "P", "S", "I")),
    )
    return OverlayViews(centre, ras_affine, spacing, intensity_window(ras_image), box, panels)  # type: ignore[arg-type]


def content_box(image: np.ndarray, masks: Sequence[np.ndarray], centre: Sequence[int],
                spacing: Sequence[float], margin_mm: float = 6.0) -> tuple[slice, slice, slice]:
    """The smallest box holding the foreground (nonzero) voxels, the masks and ``centre``, plus a margin.

    Scans carry wide empty borders (BraTS: a 240 mm field for a 140 mm head); cropping them gives
    the anatomy the pixels of a small figure.
    """
    content = foreground(image)
    for mask in masks:
        content |= mask
    box = []
    for axis, (n, c, s) in enumerate(zip(image.shape, centre, spacing)):
        others = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(content.any(axis=others))
        lo, hi = (min(int(present[0]), c), max(int(present[-1]), c)) if present.size else (0, n - 1)
        margin = int(math.ceil(margin_mm / s)) if s > 0 else 0
        box.append(slice(max(0, lo - margin), min(n, hi + margin + 1)))
    return tuple(box)  # type: ignore[return-value]


def corner_background(image: np.ndarray) -> float:
    """The background's value: 0, or the value all eight corners share when they share one.

    Skull-stripped scans z-scored inside the brain (BraTS 2015) keep a constant nonzero background;
    counting it as tissue would both skew the window and defeat the crop.
    """
    corners = image[np.ix_(*[[0, n - 1] for n in image.shape])].ravel()
    if np.isfinite(corners).all() and np.all(corners == corners[0]):
        return float(corners[0])
    return 0.0


def foreground(image: np.ndarray) -> np.ndarray:
    """Finite voxels that differ from the background value."""
    return np.isfinite(image) & (image != corner_background(image))


def intensity_window(image: np.ndarray) -> tuple[float, float]:
    """The 1st and 99th percentiles of the foreground (nonzero) voxels: the background does not count."""
    values = image[foreground(image)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(values, [1, 99]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def overlay_figure(image: np.ndarray, affine: np.ndarray, pred: Mapping[str, np.ndarray],
                   truth: Mapping[str, np.ndarray] | None, title: str = ""):
    """The overlay as a matplotlib ``Figure`` (on an Agg canvas); its axes are labelled by plane."""
    Figure, FigureCanvasAgg, Line2D = _matplotlib()
    views = overlay_views(image, affine, pred, truth)
    fig = Figure(figsize=OVERLAY_SIZE_IN, dpi=OVERLAY_DPI, facecolor="black")
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.86 if title else 0.92, bottom=0.11, wspace=0.05)
    axes = fig.subplots(1, 3)
    vmin, vmax = views.window
    for ax, panel in zip(axes, views.panels):
        ax.set_label(panel.name)
        ax.set_facecolor("black")
        ax.imshow(panel.image, cmap="gray", vmin=vmin, vmax=vmax, aspect=panel.aspect,
                  interpolation="nearest", origin="upper")
        # Truth after prediction, so its dashes stay visible where the two outlines agree.
        for masks, style in ((panel.pred, "solid"), (panel.truth, "dashed")):
            for region in REGIONS:
                mask = masks.get(region)
                if mask is not None and mask.any() and min(mask.shape) >= 2:
                    ax.contour(mask.astype(np.float32), levels=[0.5], colors=[REGION_COLOURS[region]],
                               linestyles=style, linewidths=REGION_LINEWIDTHS[region])
        height, width = panel.image.shape
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_title(f"{panel.name} (slice {panel.index})", color="white", fontsize=9, pad=3)
        left, right, top, bottom = panel.letters
        letter = dict(transform=ax.transAxes, color="white", fontsize=10, fontweight="bold")
        ax.text(0.02, 0.5, left, ha="left", va="center", **letter)
        ax.text(0.98, 0.5, right, ha="right", va="center", **letter)
        ax.text(0.5, 0.98, top, ha="center", va="top", **letter)
        ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **letter)
    if title:
        fig.suptitle(title, color="white", fontsize=11, y=0.985, parse_math=False)  # a case id may hold '$'

    handles = [Line2D([], [], color=REGION_COLOURS[r], lw=2, label=f"{r} ({REGION_NAMES[r]})") for r in REGIONS]
    handles.append(Line2D([], [], color="white", lw=1.3, ls="solid", label="prediction"))
    if truth is not None:
        handles.append(Line2D([], [], color="white", lw=1.3, ls="dashed", label="ground truth"))
    legend = fig.legend(handles=handles, loc="lower right", ncol=len(handles), fontsize=8.5, frameon=False,
                        bbox_to_anchor=(0.995, 0.0), handlelength=2.2, columnspacing=1.2)
    for text in legend.get_texts():
        text.set_color("white")
    fig.text(0.008, 0.03, CONVENTION_CAPTION, color="#dddddd", fontsize=8.5, ha="left", va="bottom")
    return fig


def overlay_png(image: np.ndarray, affine: np.ndarray, pred: dict[str, np.ndarray],
                truth: dict[str, np.ndarray] | None, title: str = "") -> bytes:
    """Axial, coronal and sagittal slices through the tumour, outlines drawn on the image, as PNG.

    The slices cross the centre of mass of the truth WT (else the predicted WT, else the volume
    centre), in true anatomical planes at true proportions; prediction solid, truth dashed.
    """
    return _png(overlay_figure(image, affine, pred, truth, title), palette=True)


def boxplot_values(metrics: Mapping[str, Any], metric: str = "dice") -> dict[str, list[float]]:
    """Per-region finite values of ``metric`` over the cases whose status is ok."""
    values: dict[str, list[float]] = {r: [] for r in REGIONS}
    for case in metrics.get("cases", []):
        if case.get("status") != "ok":
            continue
        for region in REGIONS:
            value = _number((case.get("scores") or {}).get(region, {}).get(metric))
            if value is not None and math.isfinite(value):
                values[region].append(value)
    return values


def dice_boxplot_png(metrics: dict, metric: str = "dice") -> bytes:
    """Box plots of the per-case ``metric`` for WT, TC and ET, every case drawn as a point.

    Only cases with status ok count; undefined values (NaN, an infinite HD95) are left out, and
    each box's label says how many points it holds.
    """
    Figure, FigureCanvasAgg, _ = _matplotlib()
    values = boxplot_values(metrics, metric)
    fig = Figure(figsize=(7.5, 3.6), dpi=OVERLAY_DPI, facecolor="white")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    positions = list(range(1, len(REGIONS) + 1))
    filled = [(p, values[r]) for p, r in zip(positions, REGIONS) if values[r]]
    if filled:
        ax.boxplot([v for _, v in filled], positions=[p for p, _ in filled], widths=0.5, showfliers=False,
                   patch_artist=True, boxprops=dict(facecolor="#e6e6e6", edgecolor="#333333"),
                   medianprops=dict(color="black", lw=1.8), whiskerprops=dict(color="#333333"),
                   capprops=dict(color="#333333"))
    rng = np.random.default_rng(0)  # the same jitter every time: reports compare byte for byte
    for position, region in zip(positions, REGIONS):
        points = values[region]
        if points:
            ax.scatter(position + rng.uniform(-0.13, 0.13, len(points)), points, s=14, color=POINT_COLOUR,
                       alpha=0.75, zorder=3, linewidths=0)
        else:
            ax.text(position, 0.5, "no data", transform=ax.get_xaxis_transform(), ha="center", color="#777777")
    ax.set_xticks(positions)
    ax.set_xticklabels([f"{r}\nn={len(values[r])}" for r in REGIONS])
    ax.set_xlim(0.4, len(REGIONS) + 0.6)
    if metric in ("dice", "nsd"):
        ax.set_ylim(-0.02, 1.02)
    label = METRIC_LABELS.get(metric, metric)
    ax.set_ylabel(label)
    ax.set_title(f"Per-case {label}, cases scored ok", fontsize=11)
    ax.grid(axis="y", color="#dddddd", lw=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    return _png(fig)


def render_html(metrics: dict, overlays: dict[str, bytes]) -> str:
    """The report as one self-contained HTML page: no external CSS, scripts, fonts or images.

    Every text that came from a user (case ids, error messages, names) is escaped; a
    Content-Security-Policy that allows only inline styles and data: images backs that up.
    """
    cases = list(metrics.get("cases", []))
    anchors = _anchors([str(c.get("case_id", "")) for c in cases])
    title = str(metrics.get("title") or f"tumorseg validation: {metrics.get('dataset', '')}")
    n_ok = sum(1 for c in cases if c.get("status") == "ok")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f"<h1>{_esc(title)}</h1>",
        _settings_html(metrics, n_ok, len(cases)),
        "<h2>Summary</h2>",
        _summary_html(metrics),
        f'<img class="plot" alt="box plot of per-case Dice" src="{_data_uri(dice_boxplot_png(metrics))}">',
        "<h2>Cases</h2>",
        _case_table_html(cases, anchors),
    ]
    for case, anchor in zip(cases, anchors):
        parts.append(_case_section_html(case, anchor, overlays.get(str(case.get("case_id", "")))))
    parts.append(_conventions_html(metrics))
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


def write_html_report(path: Path, metrics: dict, overlays: dict[str, bytes]) -> Path:
    """Render the report and write it atomically: a browser never opens half a page."""
    path = Path(path)
    write_bytes_atomic(path, render_html(metrics, overlays).encode("utf-8"))
    return path


# --- HTML pieces -------------------------------------------------------------------------------

_CSS = """
body{margin:0;background:#f6f6f4;color:#1d1d1d;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
main{max-width:1120px;margin:0 auto;padding:14px 22px 40px;background:#fff}
h1{font-size:22px;margin:6px 0 4px}h2{font-size:17px;margin:22px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:18px 0 6px}
p.settings{margin:2px 0;color:#444}
table{border-collapse:collapse;margin:6px 0 12px;font-variant-numeric:tabular-nums}
th,td{padding:3px 9px;border-bottom:1px solid #e4e4e4;text-align:right;vertical-align:top}
th{background:#f0f0ee;font-weight:600}th.l,td.l{text-align:left}th[colspan]{text-align:center}
td .sub{display:block;color:#666;font-size:12px}
tr.failed td{background:#fde4e1}td.error,div.error{color:#8c1d13;text-align:left;white-space:pre-wrap}
div.error{background:#fde4e1;border-left:4px solid #c0392b;padding:6px 10px;margin:6px 0}
span.status-ok{color:#1b6e3a}span.status-bad{color:#8c1d13;font-weight:600}
img{max-width:100%;height:auto;display:block}img.plot{margin:8px 0}
section.case{border-top:1px solid #eee;padding-top:2px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 14px}dt{font-weight:600}dd{margin:0}
a{color:#0b5394}
"""


def _settings_html(metrics: Mapping[str, Any], n_ok: int, n_cases: int) -> str:
    model = metrics.get("model")
    if model:
        sha = str(model.get("weights_sha256") or "")
        weights = f" (weights sha256 {_esc(sha[:12])}{'…' if len(sha) > 12 else ''})" if sha else ""
        model_text = f"Model: <b>{_esc(model.get('name', '?'))}</b> version {_esc(model.get('version', '?'))}{weights}"
    else:
        model_text = "Model: none (predictions made by another tool)"
    tolerance = _fmt(metrics.get("nsd_tolerance_mm"), 2)
    return "\n".join([
        f'<p class="settings">{model_text} &middot; dataset <b>{_esc(metrics.get("dataset", ""))}</b>'
        f' &middot; tumorseg {_esc(metrics.get("tumorseg_version", DASH))}</p>',
        f'<p class="settings">Prediction labels: {_esc(metrics.get("prediction_scheme", DASH))}'
        f' &middot; truth labels: {_esc(metrics.get("truth_scheme", DASH))}'
        f' &middot; NSD tolerance: {tolerance} mm'
        f' &middot; cases: {n_ok} scored, {n_cases - n_ok} failed</p>',
    ])


def _summary_html(metrics: Mapping[str, Any]) -> str:
    aggregate = metrics.get("aggregate") or {}
    structures = [s for s in metrics.get("structures", []) if s in aggregate]
    structures += [s for s in aggregate if s not in structures]
    columns: list[str] = []
    for structure in structures:
        for metric in aggregate[structure] or {}:
            if metric not in columns:
                columns.append(metric)
    if not structures:
        return "<p>No case was scored.</p>"
    rows = ['<table class="summary"><thead><tr><th class="l">Structure</th>'
            + "".join(f"<th>{_esc(METRIC_LABELS.get(m, m))}</th>" for m in columns) + "</tr></thead><tbody>"]
    for structure in structures:
        cells = []
        for metric in columns:
            stats = (aggregate[structure] or {}).get(metric)
            if not stats:
                cells.append(f"<td>{DASH}</td>")
                continue
            d = _decimals(metric)
            n = DASH if stats.get("n") is None else _esc(stats["n"])
            mean = _fmt(stats.get("mean"), d)
            if mean == DASH:  # nothing to average: a spread beside it would mislead
                cells.append(f'<td>{DASH}<span class="sub">n {n}</span></td>')
                continue
            cells.append(
                f"<td>{mean} &plusmn; {_fmt(stats.get('std'), d)}"
                f'<span class="sub">median {_fmt(stats.get("median"), d)} &middot; '
                f'worst {_fmt(stats.get("worst"), d)} &middot; n {n}</span></td>'
            )
        rows.append(f'<tr><td class="l">{_esc(structure)}</td>{"".join(cells)}</tr>')
    rows.append("</tbody></table>")
    rows.append('<p class="settings">Each cell: mean &plusmn; std; below it the median, the worst case '
                "and n, the number of cases the statistic is over.</p>")
    return "\n".join(rows)


def _case_table_html(cases: Sequence[Mapping[str, Any]], anchors: Sequence[str]) -> str:
    head = ('<table class="cases"><thead><tr><th class="l" rowspan="2">Case</th><th class="l" rowspan="2">Status</th>'
            '<th colspan="3">Dice</th><th colspan="3">HD95 (mm)</th>'
            '<th colspan="3">Volume pred / truth (mL)</th></tr><tr>'
            + "".join(f"<th>{r}</th>" for r in REGIONS) * 3 + "</tr></thead><tbody>")
    rows = [head]
    for case, anchor in zip(cases, anchors):
        link = f'<a href="#{anchor}">{_esc(case.get("case_id", ""))}</a>'
        status = str(case.get("status", ""))
        if status != "ok":
            rows.append(f'<tr class="failed"><td class="l">{link}</td>'
                        f'<td class="l"><span class="status-bad">{_esc(status)}</span></td>'
                        f'<td class="error" colspan="9">{_esc(case.get("error") or "(no message)")}</td></tr>')
            continue
        scores = case.get("scores") or {}
        cells = [_fmt(scores.get(r, {}).get("dice"), 3) for r in REGIONS]
        cells += [_fmt(scores.get(r, {}).get("hd95_mm"), 2) for r in REGIONS]
        cells += [f'{_fmt(scores.get(r, {}).get("volume_pred_ml"), 2)} / {_fmt(scores.get(r, {}).get("volume_truth_ml"), 2)}'
                  for r in REGIONS]
        rows.append(f'<tr><td class="l">{link}</td><td class="l"><span class="status-ok">ok</span></td>'
                    + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _case_section_html(case: Mapping[str, Any], anchor: str, overlay: bytes | None) -> str:
    case_id = _esc(case.get("case_id", ""))
    parts = [f'<section class="case" id="{anchor}"><h3>{case_id}</h3>']
    spacing = case.get("spacing_mm")
    if spacing:
        parts.append(f'<p class="settings">Voxel spacing {" &times; ".join(_fmt(s, 2) for s in spacing)} mm</p>')
    if case.get("status") != "ok":
        parts.append(f'<div class="error">{_esc(case.get("status", ""))}: {_esc(case.get("error") or "(no message)")}</div>')
    if overlay:
        parts.append(f'<img alt="overlay {case_id}" src="{_data_uri(overlay)}">')
    elif case.get("status") == "ok":
        parts.append('<p class="settings">No overlay image was made for this case.</p>')
    parts.append("</section>")
    return "\n".join(parts)


def _conventions_html(metrics: Mapping[str, Any]) -> str:
    conventions = metrics.get("conventions") or {}
    items = "".join(f"<dt>{_esc(METRIC_LABELS.get(k, k))}</dt><dd>{_esc(v)}</dd>" for k, v in conventions.items())
    items += (f"<dt>Images</dt><dd>{_esc(CONVENTION_CAPTION)}; sagittal panels anterior left. Slices cross the "
              "centre of mass of the ground-truth whole tumour. Outlines: prediction solid, ground truth dashed; "
              f"WT {REGION_NAMES['WT']}, TC {REGION_NAMES['TC']}, ET {REGION_NAMES['ET']}.</dd>")
    return f'<h2 id="conventions">Conventions</h2><dl>{items}</dl>'


# --- helpers ------------------------------------------------------------------------------------

def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _fmt(value: Any, decimals: int) -> str:
    """``value`` to ``decimals`` places; None and NaN as an en dash, infinities as ∞."""
    number = _number(value)
    if number is None or math.isnan(number):
        return DASH
    if math.isinf(number):
        return "\u221e" if number > 0 else "\u2212\u221e"
    return f"{number:.{decimals}f}"


def _decimals(metric: str) -> int:
    """Millimetres and millilitres to 2 places; Dice, NSD and ratios to 3."""
    return 2 if metric.endswith(("_mm", "_ml")) else 3


def _anchors(case_ids: Sequence[str]) -> list[str]:
    """A unique, URL-safe element id per case, readable where the case id allows."""
    seen: set[str] = set()
    anchors = []
    for case_id in case_ids:
        base = "case-" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", case_id).strip("_") or "x")
        anchor, n = base, 2
        while anchor in seen:
            anchor, n = f"{base}-{n}", n + 1
        seen.add(anchor)
        anchors.append(anchor)
    return anchors


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png(fig, palette: bool = False) -> bytes:
    """The figure as PNG; with ``palette``, 256 colours: a third of the size, and looks the same.

    A noisy MRI slice in 24-bit colour compresses badly (about 120 kB for a 900 x 330 overlay);
    an octree palette keeps the outline colours exact and the greys smooth at about 35 kB. Plain
    plots compress well as they are, and keep their exact whites.
    """
    buffer = io.BytesIO()
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - matplotlib itself requires Pillow
        palette = False
    if not palette:
        # No "Software" text chunk: the same bytes whatever matplotlib version drew it.
        fig.savefig(buffer, format="png", dpi=fig.dpi, facecolor=fig.get_facecolor(), metadata={"Software": None})
        return buffer.getvalue()
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    image = Image.fromarray(np.ascontiguousarray(rgb)).quantize(
        colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _matplotlib():
    """matplotlib's Figure, Agg canvas and Line2D, imported on first use (it is only for reports)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("tumorseg's validation report needs matplotlib: pip install matplotlib") from error
    return Figure, FigureCanvasAgg, Line2D
