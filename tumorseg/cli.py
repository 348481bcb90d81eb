"""The ``tumorseg`` command line: a thin layer over :mod:`tumorseg.pipeline`.

Exit codes are listed in :data:`tumorseg.errors.EXIT_CODES` and docs/cli.md.
"""
from __future__ import annotations

import logging
import sys
import time
import traceback
from pathlib import Path

import click

from . import __version__, logredact
from .atomic import check_output_folder
from .config import BRAIN_EXTRACTION_MODES, DEVICES, FIXED_PRECISIONS, PRECISIONS, REGISTRATION_MODES
from .errors import EXIT_CODES, INTERRUPTED, ConfigError, TumorsegError
from .labels import SCHEME_NAMES
from .sequences import SEQUENCES

log = logging.getLogger("tumorseg")

_EXIT_HELP = "\b\nExit codes:\n" + "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    if not verbose:
        for noisy in ("monai", "torch", "nibabel"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    # highdicom's INFO lines name the source instances (SOP Instance UIDs): no source header text
    # enters tumorseg's log, --verbose included (docs/rtstruct.md).
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logredact.install()


class _Group(click.Group):
    """Turns tumorseg's own errors into one line on stderr and their exit code, no traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TumorsegError as e:
            # Errors are raised 'from None' to keep the user's line short; --verbose shows where the
            # library error behind it came from, its text redacted as library log lines are.
            cause = e.__cause__ or e.__context__
            if cause is not None and log.isEnabledFor(logging.DEBUG):
                frames = "".join(traceback.format_tb(cause.__traceback__))
                log.debug("caused by %s: %s\n%s", type(cause).__name__, logredact.redact(str(cause)), frames.rstrip())
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(INTERRUPTED)
        except Exception as e:  # a bug: say so, keep the traceback for --verbose
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                raise
            text = " ".join(str(e).split())
            click.echo(f"internal error: {type(e).__name__}: {text} (rerun with --verbose for details)", err=True)
            ctx.exit(1)


@click.group(cls=_Group, epilog=_EXIT_HELP)
@click.version_option(__version__, prog_name="tumorseg")
def main() -> None:
    """Brain tumour segmentation of 3D MRI: label map, volumes and report from one command.

    Research software, not a medical device: check every contour before clinical use.
    """


def _pipeline_options(command):
    """The options that choose and adjust the pipeline, shared by predict, batch and validate."""
    options = [
        click.option("--model", default=None, help="Bundled model name or model folder  [default: the pipeline's model]"),
        click.option("--pipeline", "pipeline_file", default="default", show_default=True, help="Bundled pipeline name or a pipeline TOML file."),
        click.option("--device", type=click.Choice(DEVICES), default=None, help="Where inference runs  [default: auto, the GPU when there is one]"),
        click.option("--precision", type=click.Choice(PRECISIONS), default=None, help="The network's arithmetic: auto is fp16 on a GPU, bf16 on a CPU with bf16 instructions (AVX512-BF16 or AMX), else fp32; fp32 everywhere for full precision  [default: from the pipeline, auto]"),
        click.option("--seg", is_flag=True, help="With DICOM input, also write a DICOM SEG (seg.dcm) beside the RTSTRUCT."),
        click.option("--tta/--no-tta", default=None, help="Mirroring test-time augmentation (8x slower)  [default: from the pipeline, on]"),
        click.option("--overlap", type=float, default=None, help="Sliding-window overlap, 0 <= overlap < 1  [default: from the pipeline, 0.5]"),
        click.option("--registration", type=click.Choice(REGISTRATION_MODES), default=None, help="How sequences reach the reference grid: auto registers (rigidly, mutual information) those on another grid and copies the others; rigid registers every one; none trusts the scanner's coordinates  [default: from the pipeline, auto]"),
        click.option("--reference", type=click.Choice(SEQUENCES), default=None, help="The sequence whose grid the others go onto and the outputs land on  [default: from the pipeline: T1gd, else FLAIR, T1, T2]"),
        click.option("--brain-extraction", type=click.Choice(BRAIN_EXTRACTION_MODES), default=None, help="auto: the network sees only the brain when the scan still has its skull (HD-BET; pip install 'tumorseg[brain]'), skull-stripped scans are left as they are; on: always; off: never  [default: from the pipeline, auto]"),
        click.option("--all-sequences/--preferred-sequences", default=None, help="Give the model every sequence, even where its card prefers a subset (see the report's sequences_ignored)  [default: from the pipeline, preferred]"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _pipeline_config(pipeline_file, model, device, seg, tta, overlap, all_sequences=None, registration=None,
                     reference=None, brain_extraction=None, precision=None):
    from dataclasses import replace

    from .config import load_pipeline
    from .stages.read import max_decompressed_bytes, max_voxels

    # TUMORSEG_MAX_VOXELS / _DECOMPRESSED_MB are read per file; a bad value must stop the command
    # now (exit 6), not fail every case of a batch one by one (exit 8).
    max_voxels(), max_decompressed_bytes()
    config = load_pipeline(pipeline_file).with_overrides(device=device, tta=tta, overlap=overlap,
                                                         all_sequences=all_sequences, precision=precision)
    config = config.with_preprocess(registration=registration, reference=reference,
                                    brain_extraction=brain_extraction)
    if model is not None:
        config = replace(config, model=model)
    if seg:
        config = replace(config, output=replace(config.output, seg=True))
    return config


@main.command()
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--flair", type=click.Path(path_type=Path), help="FLAIR image (T2-weighted FLAIR).")
@click.option("--t1", type=click.Path(path_type=Path), help="Native T1-weighted image.")
@click.option("--t1gd", "--t1c", "t1gd", type=click.Path(path_type=Path), help="T1-weighted image after gadolinium contrast.")
@click.option("--t2", type=click.Path(path_type=Path), help="T2-weighted image.")
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False), default=Path("tumorseg-output"), show_default=True, help="Folder for the label map, report and resolved configuration.")
@_pipeline_options
@click.option("--save-registered", is_flag=True, help="Also write each sequence on the reference grid as the network's input was made from it (registered/<sequence>.nii.gz), to check the registration in a viewer.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and tracebacks for internal errors.")
def predict(inputs, flair, t1, t1gd, t2, output, model, pipeline_file, device, precision, seg, tta, overlap, registration, reference, brain_extraction,
            all_sequences, save_registered, quiet, verbose):
    """Segment one study and write segmentation.nii.gz, report.json and the resolved configuration.

    INPUTS are image files (NIfTI, NRRD, MHA) whose names say their sequence (BraTS names such as
    *-t2f, *-t1n, *-t1c, *-t2w, or flair, t1, t1ce/t1gd, t2), a folder of such files, one 4D
    Decathlon file (channels FLAIR, T1w, T1gd, T2w), or DICOM folders. Name files explicitly with
    --flair, --t1, --t1gd and --t2. The label map has exactly the input's shape and affine.

    DICOM: every series under the folders is found, and one is chosen per sequence by its
    description (the log says which and why). --flair/--t1/--t1gd/--t2 then take a series
    folder, a SeriesNumber or a SeriesInstanceUID. The label map lands on the reference series
    (T1gd, else FLAIR, T1, T2), and an RTSTRUCT referencing it is written (rtstruct.dcm).

    \b
    Examples:
      tumorseg predict BraTS-GLI-00001-000/
      tumorseg predict --flair flair.nii.gz --t1gd t1c.nii.gz -o out/
      tumorseg predict /data/study-dicom/ --t1gd 7 --seg -o out/
    """
    _setup_logging(quiet, verbose)
    from .pipeline import Segmenter, write_outputs
    from .sequences import assign_sequences
    from .stages.read import volume_count

    explicit = {k: v for k, v in {"flair": flair, "t1": t1, "t1gd": t1gd, "t2": t2}.items() if v is not None}
    if not inputs and not explicit:
        raise click.UsageError("give at least one input scan (a file, a folder, or --flair/--t1/--t1gd/--t2)")
    config = _pipeline_config(pipeline_file, model, device, seg, tta, overlap, all_sequences, registration, reference,
                              brain_extraction, precision)
    if save_registered:
        from dataclasses import replace

        config = replace(config, output=replace(config.output, save_registered=True))
    check_output_folder(output)  # before minutes of inference
    dicom = _dicom_inputs(list(inputs), explicit)
    study = None if dicom else assign_sequences(list(inputs), explicit, lambda p: volume_count(p) > 1)
    start = time.perf_counter()
    segmenter = Segmenter(config.model, config, progress=not quiet)
    if dicom:
        result = segmenter.segment_dicom(*dicom)
    else:
        log.info("model %s; sequences %s", segmenter.card.name, ", ".join(study.sequences))
        result = segmenter.segment_inputs(study)
    paths = write_outputs(result, segmenter.spec, output)
    regions = result.report["results"]["regions"]
    summary = ", ".join(f"{r} {v['volume_ml']:.1f} mL" for r, v in regions.items())
    if result.report["empty"]:
        summary = "no tumour found"
    if result.report["sequences_ignored"]:
        summary += (f" (from {', '.join(result.report['sequences_used'])} alone, as the model card prefers; "
                    f"not used: {', '.join(result.report['sequences_ignored'])}; --all-sequences uses them)")
    click.echo(f"{summary}; wrote {paths['label_map']} and {paths['report']} in {time.perf_counter() - start:.1f} s")


def _dicom_inputs(inputs: list[Path], options: dict[str, Path]) -> tuple[list[Path], dict[str, str]] | None:
    """(folders, series named per sequence) when the inputs are DICOM folders, else None.

    A per-sequence option names a folder holding that sequence's one series, or (beside DICOM
    inputs) a SeriesNumber or SeriesInstanceUID. Mixing DICOM and image files is refused.
    """
    from .dicom.find import find_series, looks_like_dicom_folder
    from .errors import SequenceError

    folders = [p for p in inputs if p.is_dir() and looks_like_dicom_folder(p)]
    option_folders = {s: p for s, p in options.items() if p.is_dir() and looks_like_dicom_folder(p)}
    if not folders and not option_folders:
        return None
    explicit: dict[str, str] = {}
    for seq, folder in option_folders.items():
        series = find_series(folder)
        if len(series) != 1:
            raise SequenceError(
                f"--{seq} names a folder with {len(series)} image series; give the folder as input "
                f"and name the series with --{seq} SERIESNUMBER", folder)
        explicit[seq] = series[0].series_uid
        folders.append(folder)
    for seq, value in options.items():
        if seq in option_folders:
            continue
        if value.exists():
            raise SequenceError(f"--{seq} names an image file, but the other inputs are DICOM series; "
                                "give one kind of input", value)
        explicit[seq] = str(value)  # a SeriesNumber or SeriesInstanceUID
    others = [p for p in inputs if p not in folders]
    if others:
        raise SequenceError(f"a mix of DICOM folders and other inputs ({', '.join(map(str, others))}); "
                            "give one kind of input")
    return folders, explicit


@main.command()
@click.option("--config", "config_file", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="The node's configuration (docs/serve.md).")
@click.option("--status", is_flag=True, help="List the queue (studies by a hash of their UID, no patient data) and exit.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def serve(config_file, status, verbose):
    """Run a DICOM node: receive MR studies from the PACS (C-STORE), segment each complete study,
    send the RTSTRUCT (and SEG) back to the configured destinations. Stops cleanly on SIGTERM."""
    _setup_logging(False, verbose)
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if verbose else logging.WARNING)
    from .serve.config import load_node_config
    from .stages.read import max_decompressed_bytes, max_voxels

    max_voxels(), max_decompressed_bytes()  # a bad limit would fail every study received
    config = load_node_config(config_file)
    if status:
        from .serve.node import status_lines

        click.echo("\n".join(status_lines(config)))
        return
    try:
        import pynetdicom  # noqa: F401
    except ImportError:
        raise ConfigError("tumorseg serve needs pynetdicom, which is not installed: pip install 'tumorseg[serve]'") \
            from None
    from .serve.node import Node

    Node(config).run()


@main.command()
@click.option("--mask", required=True, type=click.Path(path_type=Path), help="Label map (NIfTI, NRRD, MHA) on the series' grid.")
@click.option("--series", "series_folder", required=True, type=click.Path(path_type=Path, file_okay=False), help="Folder of the DICOM series the mask was drawn on.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path, file_okay=False), help="Folder for rtstruct.dcm.")
@click.option("--label-scheme", type=click.Choice(SCHEME_NAMES), default="msd", show_default=True, help="Label scheme of the mask's values.")
@click.option("--series-uid", default=None, help="SeriesInstanceUID or SeriesNumber, when the folder holds several image series.")
@click.option("--name", "algorithm", default="tumorseg", show_default=True, help="ROI generation algorithm name.")
@click.option("--seg", is_flag=True, help="Also write a DICOM SEG (seg.dcm).")
@click.option("-q", "--quiet", is_flag=True)
def rtstruct(mask, series_folder, output, label_scheme, series_uid, algorithm, seg, quiet):
    """Convert an existing label map into an RTSTRUCT (and SEG) referencing its DICOM series.

    The mask must cover the series' voxels: the same grid, or the same grid with axes permuted
    or flipped (as dcm2niix writes it); anything else is refused.
    """
    _setup_logging(quiet, False)
    check_output_folder(output)
    from .dicom.export import export_mask

    paths = export_mask(mask, series_folder, output, label_scheme, series_uid, algorithm, seg)
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()))


@main.command()
@click.argument("input_root", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path, file_okay=False), help="Folder for cases/<case_id>/ outputs and manifest.csv / manifest.json.")
@_pipeline_options
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="Worker processes that read, prepare and write cases while the network runs (0: all in this process).")
@click.option("--force", is_flag=True, help="Run every case again, even those whose outputs are complete and up to date.")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS", help="Run the cases on a Ray cluster: its head's HOST:PORT, or auto for a running local one (pip install 'tumorseg[cluster]'; -o must be on storage every node mounts; docs/cluster.md).")
@click.option("--hashed-ids", is_flag=True, help="Name cases case-<keyed hash of their id> instead of after their folders (for folders named by patient); the key is OUTPUT/case-id.key (keep it private), the manifest's source column keeps the mapping.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors (no progress bar).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def batch(input_root, output, model, pipeline_file, device, precision, seg, tta, overlap, registration, reference, brain_extraction, all_sequences, workers, ray_address, force,
          hashed_ids, quiet, verbose):
    """Segment every case under INPUT_ROOT; one bad case never stops the batch.

    INPUT_ROOT is a folder tree (each folder of NIfTI/NRRD/MHA sequences is a case, each DICOM
    study is a case), a Decathlon data set or its imagesTr/imagesTs folder, or a CSV manifest
    (columns case_id and image, dicom, or flair/t1/t1gd/t2). Each case's outputs go to
    OUTPUT/cases/<case_id>/; OUTPUT/manifest.csv and manifest.json list every case with its
    status, error, volumes, timings and checksums. A rerun skips cases whose inputs, model and
    configuration are unchanged and whose outputs are complete.

    Exit code 0 when every case succeeded, 8 when some failed (see the manifest).
    """
    _setup_logging(quiet, verbose)
    from .batch.cases import case_id_key, discover
    from .batch.runner import BatchRunner
    from .batch.steps import quiet_stage_logs
    from .errors import SOME_CASES_FAILED
    from .pipeline import Segmenter

    if ray_address and workers:
        raise ConfigError("--workers is for a batch on this machine; with --ray the cluster's workers run the cases")
    if ray_address:
        from .cluster.ray_batch import require_ray

        require_ray()  # before reading anything
        input_root, output = input_root.absolute(), output.absolute()  # Ray's workers run in their own folders
    config = _pipeline_config(pipeline_file, model, device, seg, tta, overlap, all_sequences, registration, reference,
                              brain_extraction, precision)
    cases = discover(input_root, exclude=output, id_key=case_id_key(output) if hashed_ids else None)
    segmenter = Segmenter(config.model, config)
    if ray_address:
        from .cluster.ray_batch import RayBatchRunner

        runner = RayBatchRunner(segmenter, output, ray_address, force=force, progress=not quiet)
    else:
        runner = BatchRunner(segmenter, output, workers=workers, force=force, progress=not quiet)
    with quiet_stage_logs(not verbose):
        summary = runner.run(cases)
    ok = len(summary.outcomes) - len(summary.failed)
    click.echo(f"{ok} of {len(summary.outcomes)} cases done ({len(summary.reused)} reused), "
               f"{len(summary.failed)} failed, in {summary.seconds:.1f} s; manifest: {output / 'manifest.csv'}")
    if summary.failed:
        sys.exit(SOME_CASES_FAILED)


@main.command()
@click.option("--dataset", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False), help="Decathlon data set (dataset.json, imagesTr/, labelsTr/) or a folder of case folders with BraTS file names and a label file each.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path, file_okay=False), help="Folder for report.html, metrics.json, metrics.csv, summary.csv (and predictions/).")
@click.option("--predictions", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None, help="Score these label maps (<case_id>.nii.gz as nnU-Net writes them, <case_id>/segmentation.nii.gz, or a tumorseg batch folder) instead of predicting.")
@click.option("--prediction-scheme", type=click.Choice(SCHEME_NAMES), default=None, help="Label scheme of --predictions  [default: the one tumorseg's report.json beside each label map records, else msd]")
@click.option("--truth-scheme", "--label-scheme", "truth_scheme", type=click.Choice(SCHEME_NAMES), default=None, help="Label scheme of the ground truth  [default: msd for a Decathlon data set; required otherwise]")
@click.option("--nsd-tolerance", type=float, default=2.0, show_default=True, help="Normalised surface distance tolerance, mm.")
@_pipeline_options
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="Worker processes for predicting (as in tumorseg batch).")
@click.option("--force", is_flag=True, help="Predict every case again, even where predictions are up to date.")
@click.option("--no-html", is_flag=True, help="Only metrics.json and the CSV files.")
@click.option("-q", "--quiet", is_flag=True)
@click.option("-v", "--verbose", is_flag=True)
def validate(dataset, output, predictions, prediction_scheme, truth_scheme, nsd_tolerance, model, pipeline_file, device,
             precision, seg, tta, overlap, registration, reference, brain_extraction, all_sequences, workers, force, no_html, quiet, verbose):
    """Score predictions against ground truth: Dice, HD95, NSD and volume difference per case,
    label and region (WT, TC, ET), aggregated, in report.html, metrics.json and CSV.

    Without --predictions, the cases are predicted first (as tumorseg batch, into
    OUTPUT/predictions/, reused when up to date). Exit code 8 when some case could not be scored.
    Metric conventions (empty masks, surface definition) are in docs/validation.md.
    """
    import math

    _setup_logging(quiet, verbose)
    from .batch.steps import quiet_stage_logs
    from .errors import SOME_CASES_FAILED, ConfigError
    from .labels import get_scheme
    from .validate import validate as run_validation

    if not (math.isfinite(nsd_tolerance) and nsd_tolerance >= 0):
        raise ConfigError(f"--nsd-tolerance must be a finite number >= 0 mm, got {nsd_tolerance}")
    from .stages.read import max_decompressed_bytes, max_voxels

    max_voxels(), max_decompressed_bytes()  # refused now, not once per case scored
    if predictions is None and prediction_scheme is not None:
        raise click.UsageError("--prediction-scheme is for --predictions: cases predicted here are in the model's scheme")
    if predictions is not None:  # nothing is predicted: a pipeline option would be ignored silently
        given = {"--model": model, "--device": device, "--precision": precision, "--tta/--no-tta": tta,
                 "--overlap": overlap, "--registration": registration, "--reference": reference,
                 "--brain-extraction": brain_extraction, "--all-sequences": all_sequences,
                 "--pipeline": None if pipeline_file == "default" else pipeline_file,
                 "--seg": seg or None, "--workers": workers or None, "--force": force or None}
        ignored = [name for name, value in given.items() if value is not None]
        if ignored:
            raise click.UsageError(f"{', '.join(ignored)} choose how cases are predicted; with --predictions "
                                   "nothing is predicted")
    check_output_folder(output)
    segmenter = None
    if predictions is None:
        from .pipeline import Segmenter

        config = _pipeline_config(pipeline_file, model, device, seg, tta, overlap, all_sequences, registration, reference,
                              brain_extraction, precision)
        segmenter = Segmenter(config.model, config)
    with quiet_stage_logs(not verbose):
        document = run_validation(dataset, output, truth_scheme, predictions,
                                  get_scheme(prediction_scheme) if prediction_scheme else None,
                                  nsd_tolerance, segmenter, workers, force, html=not no_html, progress=not quiet)
    wt = document["aggregate"]["WT"]["dice"]
    mean = "n/a" if wt["mean"] is None else f"{wt['mean']:.3f}"
    click.echo(f"{document['counts']['ok']} cases scored, {document['counts']['failed']} failed; WT Dice mean {mean}; "
               f"wrote {output / ('metrics.json' if no_html else 'report.html')}")
    if document["counts"]["failed"]:
        sys.exit(SOME_CASES_FAILED)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected integers separated by commas, got {text!r}") from None


@main.command()
@click.option("--dataset", "datasets", required=True, multiple=True, type=click.Path(path_type=Path, exists=True, file_okay=False), help="Decathlon data set (dataset.json, imagesTr/, labelsTr/) or a folder of case folders with BraTS file names; repeat to train on several, each contributing an equal share of the patches (see --dataset-weights).")
@click.option("--dataset-weights", default=None, help="Relative share of the patches for each --dataset, in order, e.g. 1,1,2  [default: equal]")
@click.option("--exclude", multiple=True, help="Case id to leave out entirely, from every data set that holds it (repeatable; for leave-one-out).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path, file_okay=False), help="Folder for the model card, weights, checkpoint and training log.")
@click.option("--label-scheme", "label_schemes", multiple=True, type=click.Choice(SCHEME_NAMES), help="Label scheme of the ground truth: once for every --dataset, or once per --dataset in the same order  [default: msd for a Decathlon data set; required otherwise]")
@click.option("--name", default="tumorseg-model", show_default=True, help="Model name written into the card.")
@click.option("--epochs", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--iterations", type=click.IntRange(min=1), default=100, show_default=True, help="Iterations per epoch.")
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--patch-size", default="96,96,96", show_default=True, help="Training and inference window, voxels.")
@click.option("--spacing", default="1,1,1", show_default=True, help="Model voxel size in mm.")
@click.option("--filters", default="16,32,64,128,256", show_default=True, help="DynUNet filters per level (network size).")
@click.option("--lr", type=click.FloatRange(min=0), default=1e-3, show_default=True, help="AdamW learning rate (polynomial decay).")
@click.option("--validation-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True, help="Share of each data set's cases held out for validation.")
@click.option("--validate-every", type=click.IntRange(min=1), default=1, show_default=True, help="Validate after every this many epochs (and after the last).")
@click.option("--sequence-dropout", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="Probability of training a patch on a random subset of its sequences.")
@click.option("--preferred-set", "preferred_sets", multiple=True, help="Sequences the model should use alone when all of them are given, e.g. flair,t1gd (repeatable): written into the card's preferred_sets and trained on alone with --preferred-set-probability.")
@click.option("--preferred-set-probability", type=click.FloatRange(0, 1), default=0.25, show_default=True, help="Probability of training a patch on the first --preferred-set set its case holds, alone (when the case has more sequences).")
@click.option("--low-resolution", type=click.FloatRange(0, 1), default=0.2, show_default=True, help="Probability, per sequence of a patch, of simulating 1.5-4x thicker slices along a random axis.")
@click.option("--bias-field", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="Probability, per sequence of a patch, of a smooth multiplicative bias field (up to about 1.6x across the patch), as in scans without bias correction.")
@click.option("--motion", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="Probability, per sequence of a patch, of a patient who moved during the scan (k-space lines after a random moment shifted by up to 4 voxels: ghosts and blur).")
@click.option("--subset-normalisation", is_flag=True, help="Normalise the sequences a patch keeps (--sequence-dropout, --preferred-set) inside their own brain region, as predict does when given only those files, not inside the region of all the case's sequences (off by default, so earlier models' commands reproduce).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(FIXED_PRECISIONS), default=None, help="The network's arithmetic in training: bf16 about halves the time on a CPU with bf16 instructions (AVX512-BF16 or AMX); fp16 is for GPUs; recorded in the card  [default: fp16 on a GPU, fp32 on the CPU]")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="Worker processes that prepare the cases and draw augmented batches ahead of the network (on a GPU the CPU work is the bottleneck); the batches are the same with any number.")
@click.option("--init", "init_model", default=None, help="Fine-tune this model (name or folder; checksum verified) instead of starting from random weights; its spacing, filters, sequences and labels must match these options.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --output (same options).")
@click.option("-q", "--quiet", is_flag=True)
@click.option("-v", "--verbose", is_flag=True)
def train(datasets, dataset_weights, exclude, output, label_schemes, name, epochs, iterations, batch_size, patch_size, spacing,
          filters, lr, validation_fraction, validate_every, sequence_dropout, preferred_sets, preferred_set_probability,
          low_resolution, bias_field, motion, subset_normalisation, seed, device, precision, workers, init_model, resume,
          quiet, verbose):
    """Train a 3D U-Net (MONAI DynUNet) and write a model card with weights that predict uses as they are.

    \b
    Example:
      tumorseg synth -o synth/ --cases 100 --seed 1
      tumorseg train --dataset synth/ -o models/mine --epochs 40
      tumorseg predict scan-t1c.nii.gz --model models/mine
      tumorseg train --dataset site-data/ --label-scheme brats2021 --init default \\
        --spacing 1.5,1.5,1.5 --filters 16,32,64,128 --patch-size 64,64,64 -o models/site
    """
    _setup_logging(quiet, verbose)
    import dataclasses as dc

    from .augment import AugmentConfig
    from .errors import ConfigError, SequenceError
    from .model import load_model
    from .sequences import parse_sequence
    from .train import TrainConfig, train as run_training

    init = load_model(init_model) if init_model else None
    try:
        sets = tuple(tuple(parse_sequence(s) for s in text.split(",") if s.strip()) for text in preferred_sets)
        weights = tuple(float(v) for v in dataset_weights.split(",")) if dataset_weights else None
    except (ValueError, SequenceError) as e:
        raise click.BadParameter(str(e)) from None

    filter_t = _ints(filters)
    try:
        cfg = TrainConfig(
            name=name, epochs=epochs, iterations_per_epoch=iterations, batch_size=batch_size,
            patch_size=_ints(patch_size), spacing_mm=tuple(float(v) for v in spacing.split(",")),
            filters=filter_t, strides=(1,) + (2,) * (len(filter_t) - 1), learning_rate=lr,
            validation_fraction=validation_fraction, validate_every=validate_every, seed=seed,
            augment=dc.replace(AugmentConfig(), sequence_dropout=sequence_dropout, low_resolution=low_resolution,
                               preferred_set=preferred_set_probability if sets else None,
                               bias_field=bias_field or None, motion=motion or None,
                               subset_normalisation=subset_normalisation or None),
            preferred_sets=sets or None, dataset_weights=weights,
            init_weights_sha256=init.sha256 if init else None, precision=precision,
        )
        cfg.card()  # validates patch size against the network depth
    except ValueError as e:
        raise ConfigError(str(e)) from None
    command = "tumorseg train " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "tumorseg train"
    card = run_training(list(datasets), output, cfg, label_schemes, resume, device, progress=not quiet,
                        command=command, exclude=tuple(exclude), init=init, workers=workers)
    click.echo(f"wrote {output / 'model.toml'} (weights sha256 {card.weights.sha256[:16]}...); "
               f"validation Dice {card.metrics.get('validation_dice', {})}")


@main.command()
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path, file_okay=False), help="Folder for the Decathlon-layout data set.")
@click.option("--cases", type=int, default=20, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--generator-version", type=click.Choice(["1", "2", "3"]), default="3", show_default=True,
              help="3 draws half the cases on the Colin27 head (needs Debian's mricron-data), with its real "
                   "skull; 2 and 3 paint enhancing normal structures (venous sinuses, choroid plexus) as "
                   "background; 1 and 2 reproduce earlier data sets (1: the default model's training data).")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="Processes making cases in parallel (the files are the same with any number).")
@click.option("-q", "--quiet", is_flag=True)
def synth(output, cases, seed, generator_version, workers, quiet):
    """Make a Decathlon-layout data set of synthetic tumour cases on real healthy anatomy."""
    _setup_logging(quiet, False)
    from .synth import write_synth_dataset

    if cases < 1:
        raise click.BadParameter("--cases must be >= 1")
    path = write_synth_dataset(output, cases, seed, int(generator_version), workers)
    click.echo(f"wrote {cases} cases to {path}")


from .cli_models import models  # noqa: E402 - the models command group lives in its own module

main.add_command(models)


if __name__ == "__main__":  # pragma: no cover
    main()

