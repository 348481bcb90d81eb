"""How large a network ``predict`` can afford on this CPU: candidate sizes timed against the default.

    python benchmarks/architecture_size.py [--case examples/BraTS-GLI-00001-000] [--json sizes.json]

Inference time does not depend on what the weights hold, so each candidate (filters, model
spacing, patch) gets random weights in a temporary model folder and runs the whole ``predict``
pipeline (read to written files) on a BraTS-sized four-sequence scan, as the default pipeline
runs it (8-flip mirroring) and with ``--no-tta``, in the same run as the bundled default model.
Prints parameters, weight megabytes, seconds and the ratio to the default, so a training recipe
can pick the largest network under issue 25's limits (60 s per case with the defaults, 50 MB).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from tumorseg.config import load_pipeline
from tumorseg.model import Architecture, build_network, load_model, save_model
from tumorseg.pipeline import Segmenter, write_outputs
from tumorseg.sequences import assign_sequences
from tumorseg.stages.read import volume_count

ROOT = Path(__file__).resolve().parents[1]

#: (filters, spacing mm, patch side): the default's shape first, then larger ones.
CANDIDATES = [
    ((16, 32, 64, 128), 1.5, 64),
    ((16, 32, 64, 128, 256), 1.5, 64),
    ((16, 32, 64, 128, 256), 1.5, 96),
    ((24, 48, 96, 192), 1.5, 64),
    ((24, 48, 96, 192, 320), 1.5, 96),
    ((32, 64, 128, 256), 1.5, 64),
    ((16, 32, 64, 128, 256), 1.25, 96),
    ((16, 32, 64, 128, 256), 1.0, 128),
]


def candidate_model(folder: Path, filters: tuple[int, ...], spacing: float, patch: int):
    """A model folder shaped like the default card but with this network, grid and window."""
    card = load_model("default").card
    card = dataclasses.replace(
        card, name="size-candidate",
        input=dataclasses.replace(card.input, spacing_mm=(spacing,) * 3, patch_size=(patch,) * 3),
        architecture=Architecture(filters=filters, strides=(1,) + (2,) * (len(filters) - 1)))
    torch.manual_seed(0)
    save_model(folder, card, build_network(card))
    return load_model(str(folder))


def time_predict(segmenter: Segmenter, study, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            write_outputs(segmenter.segment_inputs(study), segmenter.spec, Path(out))
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", type=Path, default=ROOT / "examples" / "BraTS-GLI-00001-000")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-tta-only", action="store_true", help="skip the 8-flip runs (a quick look)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; case {args.case.name}")
    study = assign_sequences([args.case], {}, lambda p: volume_count(p) > 1)
    pipeline = load_pipeline("default")
    modes = {"one pass": False} if args.no_tta_only else {"8 flips": True, "one pass": False}
    rows, baseline = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        models = [("bundled default", load_model("default"))]
        for i, (filters, spacing, patch) in enumerate(CANDIDATES):
            name = f"{'-'.join(map(str, filters))} @{spacing:g} mm, {patch}^3"
            models.append((name, candidate_model(Path(tmp) / str(i), filters, spacing, patch)))
        time_predict(Segmenter(models[0][1], pipeline.with_overrides(tta=False)), study, 1)  # warm-up, not counted
        for name, model in models:
            params = sum(p.numel() for p in model.network.parameters())
            megabytes = (model.directory / model.card.weights.file).stat().st_size / 1e6
            row = {"model": name, "parameters": params, "weights_mb": round(megabytes, 1)}
            for mode, tta in modes.items():
                segmenter = Segmenter(model, pipeline.with_overrides(tta=tta, all_sequences=True))
                seconds = time_predict(segmenter, study, args.repeats)
                baseline.setdefault(mode, seconds)
                row[mode] = {"seconds": round(seconds, 1), "ratio_to_default": round(seconds / baseline[mode], 2)}
            rows.append(row)
            print(f"{name:36s} {params / 1e6:5.2f} M params {megabytes:5.1f} MB  " + "  ".join(
                f"{mode}: {row[mode]['seconds']:6.1f} s ({row[mode]['ratio_to_default']:.2f}x)" for mode in modes),
                flush=True)
    if args.json:
        args.json.write_text(json.dumps({"case": args.case.name, "threads": torch.get_num_threads(), "rows": rows},
                                        indent=2))


if __name__ == "__main__":
    main()
