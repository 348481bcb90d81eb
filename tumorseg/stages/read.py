"""Read stage: NIfTI (nibabel), NRRD and MHA (SimpleITK) into a :class:`~tumorseg.scan.Scan`.

Every failure names the file. Geometry is never guessed: a NIfTI with neither qform nor sform
set is refused, and so is one whose qform and sform disagree. NaN/inf voxels and constant images
are refused (not cleaned): an image with them is damaged, and silently replacing values would
hide that.
"""
from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, GeometryError, InputError, SequenceError
from ..itk import ras_affine
from ..scan import Scan, SourceGeometry, same_grid
from ..sequences import DECATHLON_ORDER, ITK_SUFFIXES, NIFTI_SUFFIXES, StudyInputs

#: Largest image accepted by default, in voxels per file or series (512^3; a 512 x 512 x 400 MR
#: passes): a header that declares more is refused before anything is allocated.
MAX_VOXELS = 512**3
#: Largest compressed input accepted by default, in decompressed bytes (MiB) per file: a gzip
#: "bomb" is refused after this much, without keeping it in memory.
MAX_DECOMPRESSED_MB = 2048
#: Environment variables that override the two limits for every command (docs/configuration.md).
MAX_VOXELS_ENV, MAX_DECOMPRESSED_MB_ENV = "TUMORSEG_MAX_VOXELS", "TUMORSEG_MAX_DECOMPRESSED_MB"
#: A voxel's edge must lie within these bounds (mm), and the volume within MAX_POSITION_MM of
#: the scanner's origin: other values are a damaged header, not an MR scan.
SPACING_RANGE_MM = (1e-3, 1e3)
MAX_POSITION_MM = 1e6
#: qform and sform (both set) may place a voxel this far apart, in voxels, and count as one.
FORMS_TOLERANCE_VOXEL = 0.1


@dataclass(frozen=True)
class Volume:
    """One file's voxels: float32 (I, J, K) or (I, J, K, T), its RAS affine and NIfTI header."""

    array: np.ndarray
    affine: np.ndarray
    nifti_header: bytes | None
    path: Path


def _suffix_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(ITK_SUFFIXES):
        return "itk"
    raise InputError(
        f"unsupported file type; tumorseg reads {', '.join(NIFTI_SUFFIXES + ITK_SUFFIXES)} "
        "(DICOM folders: see `tumorseg predict --help`)",
        path,
    )


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise InputError("file not found", path)
    if not path.is_file():
        raise InputError("not a file", path)


def volume_count(path: Path) -> int:
    """Volumes along the 4th axis (1 for a 3D image), read from the header only."""
    _check_exists(path)
    if _suffix_kind(path) == "nifti":
        shape = _load_nifti_header(path).shape
    else:
        shape = tuple(_itk_reader(path).GetSize())
    return int(shape[3]) if len(shape) >= 4 else 1


def max_voxels() -> int:
    """The voxel limit per input: :data:`MAX_VOXELS` unless ``TUMORSEG_MAX_VOXELS`` sets it."""
    return _limit(MAX_VOXELS_ENV, MAX_VOXELS)


def max_decompressed_bytes() -> int:
    """The decompressed-size limit per input, in bytes (``TUMORSEG_MAX_DECOMPRESSED_MB``)."""
    return _limit(MAX_DECOMPRESSED_MB_ENV, MAX_DECOMPRESSED_MB) * 2**20


def _limit(variable: str, default: int) -> int:
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"{variable} must be a positive whole number, got {text[:20]!r}")
    return value


def _load_nifti_header(path: Path):
    """nibabel's image object, header only (no voxel data read)."""
    import nibabel as nib

    try:
        return nib.load(str(path))
    except Exception as e:  # nibabel raises many types for a bad header
        raise InputError(f"not a readable NIfTI image ({_first_line(e)})", path) from None


def _read_nifti(path: Path) -> Volume:
    img = _load_nifti_header(path)
    header = img.header
    if int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
        raise GeometryError(
            "the NIfTI header sets neither qform nor sform (both codes are 0), so the scan's "
            "orientation in the patient is unknown; fix the header before segmenting",
            path,
        )
    _check_size(img.shape, path)
    if header.get_data_dtype().fields:  # RGB24, RGBA32: a colour picture, not an MR intensity
        raise InputError("colour (RGB) voxels; give the grey-scale scan the scanner reconstructs", path)
    if header.get_data_dtype().kind == "c":
        raise InputError("complex-valued voxels (magnitude and phase in one number); give the magnitude image "
                         "the scanner reconstructs", path)
    _check_header_geometry(header, path)
    _check_spatial_units(header, path)
    _check_forms_agree(header, img.shape[:3], path)
    try:
        itemsize = header.get_data_dtype().itemsize
        data_end = int(img.dataobj.offset) + int(np.prod(img.shape, dtype=np.int64)) * itemsize
        if _is_gzip(path):
            # nibabel stops reading where the voxels end, before gzip's CRC and length: check them.
            img = type(img).from_bytes(_gunzip_checked(path, data_end))
        elif path.stat().st_size < data_end:
            raise InputError(f"truncated image data: the file holds {path.stat().st_size} bytes, the header "
                             f"declares {data_end}", path)
        array = np.asarray(img.get_fdata(dtype=np.float32))
        if not np.isfinite(array).all():
            _check_float32_range(np.asanyarray(img.dataobj), path)
    except (EOFError, zlib.error, OSError, ValueError, TypeError, OverflowError) as e:
        raise InputError(f"truncated or corrupt image data ({_first_line(e)})", path) from None
    return Volume(array, np.asarray(img.affine, dtype=np.float64), header.binaryblock, path)


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _gunzip_checked(path: Path, keep: int, offset: int = 0) -> bytes:
    """The first ``keep`` decompressed bytes of the gzip stream that starts ``offset`` bytes into
    ``path``, after decompressing all of it: the CRC-32 and length of every member are checked
    (a flipped bit would otherwise change voxels silently), and a stream that decompresses to
    more than :func:`max_decompressed_bytes` is refused without being kept in memory."""
    limit = max_decompressed_bytes()
    kept, total = bytearray(), 0
    try:
        with open(path, "rb") as raw:
            raw.seek(offset)
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                while chunk := stream.read(1 << 22):
                    total += len(chunk)
                    if total > limit:
                        raise InputError(
                            f"the compressed data expands to more than {limit // 2**20} MiB (limit "
                            f"{MAX_DECOMPRESSED_MB_ENV}); the file is damaged or not an image", path)
                    if len(kept) < keep:
                        kept += chunk[: keep - len(kept)]
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise InputError(f"truncated or corrupt compressed data: the gzip stream fails its integrity check "
                         f"({_first_line(e)}); copy the file again from its source", path) from None
    if len(kept) < keep:
        raise InputError(f"truncated image data: the file holds {len(kept)} bytes once decompressed, the "
                         f"header declares {keep}", path)
    return bytes(kept)


def _check_header_geometry(header, path: Path) -> None:
    """Refuse NaN or infinite geometry (comparisons with NaN are false, so the later checks would
    let it through) and a qform quaternion that is not a rotation."""
    fields = {"pixdim": header["pixdim"][:4]}
    if int(header["qform_code"]):
        fields.update({k: header[k] for k in ("quatern_b", "quatern_c", "quatern_d",
                                              "qoffset_x", "qoffset_y", "qoffset_z")})
    if int(header["sform_code"]):
        fields.update({k: header[k] for k in ("srow_x", "srow_y", "srow_z")})
    bad = [k for k, v in fields.items() if not np.isfinite(np.asarray(v, dtype=np.float64)).all()]
    if bad:
        raise GeometryError(f"the NIfTI header holds NaN or infinite values in {', '.join(bad)}; its "
                            "geometry is damaged", path)
    if int(header["qform_code"]):
        norm = float(np.sum(np.square([header[k] for k in ("quatern_b", "quatern_c", "quatern_d")],
                                      dtype=np.float64)))
        if norm > 1.0 + 3 * float(np.finfo(np.float32).eps):  # nibabel's own bound
            raise GeometryError(f"the NIfTI qform quaternion is not a rotation (quatern_b^2 + c^2 + d^2 = "
                                f"{norm:.4g}, more than 1); its geometry is damaged", path)


def _check_spatial_units(header, path: Path) -> None:
    """Refuse spatial units other than millimetres (or unset, which every reader takes as mm):
    nibabel's affine is in the file's units, so 0.5 mm voxels stored in micrometres would be read
    as 500 mm ones, and readers that convert would place the label map elsewhere."""
    unit, _ = header.get_xyzt_units()
    if unit not in ("mm", "unknown"):
        raise GeometryError(f"the NIfTI header gives its spatial units as {unit} (xyzt_units); tumorseg reads "
                            "millimetres only: convert the header to mm before segmenting", path)


def _check_forms_agree(header, shape: tuple[int, ...], path: Path) -> None:
    """Refuse a header whose qform and sform (both set) place the volume differently.

    Readers disagree on which one wins (nibabel takes the sform, some ITK readers the qform), so
    the mask would land where one viewer expects it and not another. Rounding (the qform is a
    quaternion: it cannot hold shear and is rounded to float32) stays far under the bound.
    """
    if int(header["sform_code"]) == 0 or int(header["qform_code"]) == 0:
        return
    sform, qform = header.get_sform(), header.get_qform()
    shape = tuple(shape) + (1,) * (3 - len(shape))  # a 2D image is refused later, by name
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)]).T
    apart = float(np.linalg.norm((sform @ corners - qform @ corners)[:3], axis=0).max())
    bound = FORMS_TOLERANCE_VOXEL * float(np.min(header.get_zooms()[:3]))
    if apart > bound:
        raise GeometryError(
            f"the NIfTI header's qform and sform disagree: they place the volume up to "
            f"{apart:.3g} mm apart (tolerance {bound:.3g} mm), so which voxels the scan covers "
            "depends on the reader; fix the header (set the wrong one's code to 0) before "
            "segmenting", path,
        )


def _itk_reader(path: Path):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise InputError(f"not a readable image ({_first_line(e)})", path) from None
    return reader


def _read_itk(path: Path) -> Volume:
    import SimpleITK as sitk

    reader = _itk_reader(path)
    _check_size(reader.GetSize(), path)
    _check_itk_geometry(reader, path)
    _check_nrrd_gzip(path)
    if reader.GetNumberOfComponents() != 1:
        raise GeometryError(
            f"{reader.GetNumberOfComponents()} components per voxel; give one sequence per file", path
        )
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise InputError(f"truncated or corrupt image data ({_first_line(e)})", path) from None
    dim = image.GetDimension()
    if dim < 3:
        raise GeometryError(f"a {dim}D image; tumorseg segments 3D volumes", path)
    # GetArrayFromImage is indexed [k, j, i]; reverse to (i, j, k) to match the affine.
    native = sitk.GetArrayFromImage(image)
    if native.dtype.itemsize > 4 and native.dtype.kind == "f":
        _check_float32_range(native, path)
    array = native.astype(np.float32)
    array = np.ascontiguousarray(np.transpose(array, tuple(range(array.ndim))[::-1]))
    return Volume(array, ras_affine(image), None, path)


#: NRRD spaces that place a volume in the patient; "scanner-xyz" and "3D-right-handed" do not say
#: which way the patient lies.
NRRD_PATIENT_SPACES = (b"left-posterior-superior", b"right-anterior-superior", b"left-anterior-superior",
                       b"lps", b"ras", b"las")
#: MetaImage fields, one of each group, that together state the grid in the patient (LPS).
_META_GEOMETRY = (("ElementSpacing", "ElementSize"), ("TransformMatrix", "Rotation", "Orientation"),
                  ("Offset", "Origin", "Position"))


def _check_itk_geometry(reader, path: Path) -> None:
    """Refuse an NRRD or MetaImage header that does not state the volume's place in the patient:
    ITK would fill in unit spacing, an identity direction or a zero origin, and the label map
    would be written with that guess presented as scanner coordinates."""
    io = reader.GetMetaData("ITK_InputFilterName")
    if io == "NrrdImageIO":
        fields, _ = _nrrd_header(path)
        space = fields.get(b"space", b"").lower()
        missing = [name.decode() for name in (b"space directions", b"space origin") if name not in fields]
        if space not in NRRD_PATIENT_SPACES or missing:
            said = f"space: {space.decode('latin-1')}" if space else "no space"
            raise GeometryError(f"the NRRD header states {said}{' and no ' + ' or '.join(missing) if missing else ''}, "
                                "so the scan's place in the patient is unknown; it needs space LPS, RAS or LAS with "
                                "space directions and a space origin", path)
    elif io == "MetaImageIO":
        header = _meta_header(path)
        missing = [group[0] for group in _META_GEOMETRY if not any(field in header for field in group)]
        if missing:
            raise GeometryError(f"the MetaImage header has no {', '.join(missing)}, so the scan's place in the patient "
                                "is unknown; fix the header before segmenting", path)


def _nrrd_header(path: Path) -> tuple[dict[bytes, bytes], int]:
    """An NRRD header's fields (lower-case names) and where its data starts (-1 for a detached
    header, .nhdr, or a header longer than 64 KiB, whose fields are all read)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    end = head.find(b"\n\n") if path.suffix.lower() == ".nrrd" else -1
    lines = (head[:end] if end >= 0 else head).splitlines()[1:]
    fields = dict(line.split(b":", 1) for line in lines if b":" in line and not line.startswith(b"#"))
    return {name.strip().lower(): value.strip() for name, value in fields.items()}, end


def _meta_header(path: Path) -> set[str]:
    """The field names of a MetaImage header (.mha: up to ElementDataFile; .mhd: the whole file)."""
    fields = set()
    with open(path, "rb") as f:
        for line in f:
            name = line.split(b"=", 1)[0].strip().decode("latin-1")
            fields.add(name)
            if name == "ElementDataFile" or len(fields) > 200:
                break
    return fields


def _check_float32_range(values: np.ndarray, path: Path) -> None:
    """Refuse finite values beyond float32's range (the pipeline's arithmetic), which the cast would
    turn into infinities that read as a damaged file: the scaling or the export is wrong."""
    finite = values[np.isfinite(values)]
    limit = float(np.finfo(np.float32).max)
    if finite.size and float(np.abs(finite).max()) > limit:
        raise InputError(f"voxel values up to {float(np.abs(finite).max()):.3g} exceed the 32-bit floating-point "
                         f"range ({limit:.3g}) the pipeline works in; check the image's scaling or export", path)


def _check_nrrd_gzip(path: Path) -> None:
    """Verify an attached gzip-encoded NRRD's CRC and length (ITK stops where the voxels end)."""
    if path.suffix.lower() != ".nrrd":
        return
    fields, end = _nrrd_header(path)
    if end < 0:
        return  # ITK read the header, so it is longer than this: no integrity check (documented)
    if fields.get(b"encoding", b"").lower() in (b"gzip", b"gz") and b"data file" not in fields:
        _gunzip_checked(path, 0, offset=end + 2)


def _first_line(e: Exception) -> str:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    return lines[-1] if lines else type(e).__name__


def _check_size(shape: tuple[int, ...], path: Path) -> None:
    if any(int(s) <= 0 for s in shape):
        raise InputError(f"the header declares a shape of {tuple(int(s) for s in shape)}: every size must be "
                         "positive; the file is damaged", path)
    n = int(np.prod([int(s) for s in shape], dtype=np.int64)) if shape else 0
    if n > max_voxels():
        raise InputError(f"image of shape {tuple(int(s) for s in shape)} exceeds the limit of {max_voxels()} "
                         f"voxels ({MAX_VOXELS_ENV} raises it)", path)


def check_affine(affine: np.ndarray, path: Path | None) -> None:
    """Refuse a voxel-to-world affine that no scanner writes: NaN or infinite, singular, voxel
    edges outside :data:`SPACING_RANGE_MM`, or an origin beyond :data:`MAX_POSITION_MM`."""
    affine = np.asarray(affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise GeometryError("the image's geometry holds NaN or infinite values", path)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    low, high = SPACING_RANGE_MM
    if spacing.min() < low or spacing.max() > high:
        raise GeometryError(f"voxel spacing {_fmt_values(spacing)} mm is outside {low:g}-{high:g} mm; the "
                            "geometry is damaged", path)
    if np.abs(affine[:3, 3]).max() > MAX_POSITION_MM:
        raise GeometryError(f"the image lies more than {MAX_POSITION_MM:g} mm from the scanner's origin; the "
                            "geometry is damaged", path)
    # Singular or nearly so: the columns' volume against the box they would span.
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6 * float(np.prod(spacing)):
        raise GeometryError(f"the affine is singular (voxel axes {_fmt_values(affine[:3, :3].T.ravel())} "
                            "are not independent)", path)


def _fmt_values(values) -> str:
    return "[" + ", ".join(f"{float(v):.4g}" for v in values) + "]"


def read_volume(path: Path, allow_constant: bool = False) -> Volume:
    """Read one image file; a singleton 4th (and 5th) axis is dropped.

    ``allow_constant`` accepts a constant volume (an empty label map); scans never are.
    """
    path = Path(path)
    _check_exists(path)
    volume = _read_nifti(path) if _suffix_kind(path) == "nifti" else _read_itk(path)
    array = volume.array
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim < 3 or min(array.shape[:3]) < 2:
        raise GeometryError(
            f"image of shape {array.shape} is 2D (or a single slice); tumorseg segments 3D volumes",
            path,
        )
    if array.ndim > 4:
        raise GeometryError(f"image of shape {array.shape} has more than 4 dimensions", path)
    check_affine(volume.affine, path)
    check_values(array, path, allow_constant)
    return Volume(array, volume.affine, volume.nifti_header, path)


def check_values(array: np.ndarray, path: Path, allow_constant: bool) -> None:
    """Refuse NaN/inf voxels and (unless ``allow_constant``) constant volumes, naming ``path``."""
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - np.count_nonzero(finite))
        raise InputError(f"{bad} voxels are NaN or infinite; the image is damaged", path)
    if allow_constant:
        return
    volumes = array.reshape(array.shape[:3] + (-1,))
    for t in range(volumes.shape[-1]):
        v = volumes[..., t]
        if v.min() == v.max():
            where = f" (volume {t})" if volumes.shape[-1] > 1 else ""
            raise InputError(f"constant image{where}: every voxel is {v.flat[0]:g}", path)


def read_study(inputs: StudyInputs) -> Scan:
    """Read the study's files into one Scan whose channels share one grid.

    Channels must have equal shapes and affines (``scan.same_grid``); files on other grids are
    refused rather than resampled (``stack_volumes``).
    """
    if inputs.decathlon_4d is not None:
        vol = read_volume(inputs.decathlon_4d)
        if vol.array.ndim != 4 or vol.array.shape[3] != len(DECATHLON_ORDER):
            raise GeometryError(
                f"a 4D image with {vol.array.shape[3] if vol.array.ndim == 4 else 1} volumes is not "
                f"a Decathlon study ({len(DECATHLON_ORDER)} channels: "
                f"{', '.join(DECATHLON_ORDER)})",
                vol.path,
            )
        array = np.ascontiguousarray(np.moveaxis(vol.array, 3, 0))
        return _make_scan(array, DECATHLON_ORDER, vol, {s: vol.path for s in DECATHLON_ORDER})
    if not inputs.files:
        raise SequenceError("no input scan given")
    return stack_volumes(read_sequences(inputs))


def read_sequences(inputs: StudyInputs) -> dict[str, Volume]:
    """One 3D volume per sequence of ``inputs.files``, each on its own grid, in the files' order."""
    volumes = {seq: read_volume(path) for seq, path in inputs.files}
    for seq, vol in volumes.items():
        if vol.array.ndim != 3:
            raise GeometryError(
                f"a 4D image with {vol.array.shape[3]} volumes given as the {seq} sequence; "
                "give one 3D volume per sequence",
                vol.path,
            )
    return volumes


def stack_volumes(volumes: dict[str, Volume]) -> Scan:
    """One Scan of ``volumes`` (sequence -> 3D volume), which must share one grid: the first's.
    Volumes on other grids are refused rather than resampled."""
    reference_seq, reference = next(iter(volumes.items()))
    for seq, vol in volumes.items():
        if vol.array.shape != reference.array.shape:
            raise GeometryError(
                f"shape {vol.array.shape} ({seq}) differs from {reference.array.shape} "
                f"({reference_seq}, {reference.path}); co-register the sequences first",
                vol.path,
            )
        if not same_grid(vol.array.shape, vol.affine, reference.array.shape, reference.affine):
            raise GeometryError(
                f"affine of {seq} differs from that of {reference_seq} ({reference.path}) by "
                f"{np.abs(vol.affine - reference.affine).max():.4g} mm; the sequences are not on "
                "one grid (co-register and resample them first)",
                vol.path,
            )
    array = np.stack([v.array for v in volumes.values()])
    return _make_scan(array, tuple(volumes), reference, {s: v.path for s, v in volumes.items()})


def _make_scan(array: np.ndarray, channels: tuple[str, ...], reference: Volume, paths: dict) -> Scan:
    source = SourceGeometry(
        shape=tuple(int(s) for s in array.shape[1:4]),  # type: ignore[arg-type]
        affine=reference.affine,
        nifti_header=reference.nifti_header,
    )
    return Scan(
        array=array.astype(np.float32, copy=False),
        affine=reference.affine,
        channels=channels,
        source=source,
        meta={"paths": {s: Path(p) for s, p in paths.items()}},
    )
