"""CPU time of ``predict`` on a BraTS-sized four-sequence scan, beside MONAI's plain sliding window.

    python benchmarks/cpu_predict.py [--model default] [--case examples/BraTS-GLI-00001-000] [--repeats 2]

Prints, in one run on this machine: tumorseg's whole predict (read to written files) as the
default pipeline runs it (8-flip mirroring; ``precision = "auto"``: bf16 on a CPU with bf16
instructions), the same with ``--precision fp32`` (ratio and label agreement) and with
``--no-tta``, its one-pass inference stage alone, and two baselines on the same network and normalised input: MONAI
``sliding_window_inference`` with its defaults (fp32, one window per batch, overlap 0.25,
constant blending: less work than ours), and with tumorseg's settings (fp32, one window per
batch, tumorseg's overlap, Gaussian blending: the same work), each with its ratio and argmax
agreement.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tumorseg.pipeline import Segmenter, write_outputs
from tumorseg.runner import model_input
from tumorseg.sequences import assign_sequences
from tumorseg.stages import infer, read
from tumorseg.stages.read import volume_count

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--case", type=Path, default=ROOT / "examples" / "BraTS-GLI-00001-000")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    start = time.perf_counter()
    segmenter = Segmenter(args.model)
    load_s = time.perf_counter() - start
    one_pass = Segmenter(segmenter.model, segmenter.config.with_overrides(tta=False))
    full_precision = Segmenter(segmenter.model, segmenter.config.with_overrides(precision="fp32"))
    study = assign_sequences([args.case], {}, lambda p: volume_count(p) > 1)
    card = segmenter.card

    runs = {"default pipeline": segmenter, "--precision fp32": full_precision, "--no-tta": one_pass}
    whole: dict[str, list[float]] = {name: [] for name in runs}
    labels_of: dict[str, np.ndarray] = {}
    infer_s = []  # the one-pass inference stage, compared with MONAI below
    for name, seg in runs.items():
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as out:
                start = time.perf_counter()
                result = seg.segment_inputs(study)
                write_outputs(result, seg.spec, Path(out))
                whole[name].append(time.perf_counter() - start)
                labels_of[name] = result.labels.array
                if seg is one_pass:
                    infer_s.append(result.timings["infer"])

    scan = read.read_study(study)
    array, transform = model_input(scan, card)
    image = torch.from_numpy(array)[None]
    from monai.inferers import sliding_window_inference

    network = segmenter.model.network.eval()
    overlap = one_pass.config.inference.overlap
    settings = {
        "defaults": ({}, "fp32, 1 window/batch, overlap 0.25, constant"),
        "our settings": ({"overlap": overlap, "mode": "gaussian", "sigma_scale": infer.SIGMA_SCALE},
                         f"fp32, 1 window/batch, overlap {overlap}, Gaussian"),
    }
    baselines = {}
    for name, (kwargs, _) in settings.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            with torch.inference_mode():
                logits = sliding_window_inference(image, card.input.patch_size, 1, network, **kwargs)
            times.append(time.perf_counter() - start)
        baselines[name] = (min(times), logits[0].argmax(0).numpy())
    ours = np.argmax(infer.predict_probabilities(one_pass.network, array, card.input.patch_size,
                                                 one_pass.config.inference, one_pass.device), 0)

    print(f"scan {scan.spatial_shape} x {len(scan.channels)} channels -> model grid {transform.model_shape}")
    print(f"model load                        {load_s:6.2f} s (once per process)")
    for name, times in whole.items():
        tta = "8-flip mirroring" if runs[name].config.inference.tta else "one pass"
        print(f"tumorseg predict, {name:16s} {min(times):6.2f} s read to write ({tta}, {runs[name].spec.precision}; "
              f"best of {args.repeats})")
    agree = float((labels_of["default pipeline"] == labels_of["--precision fp32"]).mean())
    print(f"default pipeline ({segmenter.spec.precision}) against fp32: ratio fp32 / default "
          f"{min(whole['--precision fp32']) / min(whole['default pipeline']):.2f}, labels agree on {100 * agree:.3f} % "
          "of the voxels")
    print(f"tumorseg inference stage, one pass {min(infer_s):6.2f} s (overlap {overlap}, Gaussian, "
          f"{one_pass.spec.precision})")
    for name, (seconds, labels) in baselines.items():
        print(f"MONAI sliding window, {name:12s}{seconds:6.2f} s ({settings[name][1]}): "
              f"ratio baseline / tumorseg {seconds / min(infer_s):.2f}, "
              f"argmax agreement {100 * float((labels == ours).mean()):.2f} %")


if __name__ == "__main__":
    main()
