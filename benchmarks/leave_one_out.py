"""Leave-one-out for the default model's recipe: retrain it without one real case, score that case.

The default model (models/default) was trained in two steps, on synthetic cases and on three of the
four BraTS 2015 cases in ../shared/data/brats2015-dev (pat0006 held out). Its scores on the other
three say little, as it saw them. For each case given, this script trains both steps again with that
case left out and the other three real cases in, pat0006 included (the card's recorded commands, see
``RECIPE``), then scores the held-out case as ``predict`` runs on it (FLAIR and T1c):

    tumorseg synth -o synth-train --cases 240 --seed 1000 --generator-version 1   # the card's data
    python benchmarks/leave_one_out.py --synth synth-train --brats ../shared/data/brats2015-dev \\
        -o loo/ --json loo.json

One fold is about 95 minutes on a 2-core CPU, and about 4 on one H200 with `--device cuda --workers 7`
(three folds at once, see loo_gpu.sh). A step already trained is reused and a killed one
resumes, so a rerun only does what is missing. ``--epochs``/``--iterations`` shrink the recipe for a
quick check of the mechanics (the scores then mean nothing).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_quality import score  # noqa: E402

from tumorseg.config import load_pipeline  # noqa: E402
from tumorseg.model import load_model  # noqa: E402
from tumorseg.pipeline import Segmenter  # noqa: E402

#: The real cases the default model was trained on.
IN_TRAINING = ("brats_2013_pat0003_1", "brats_2013_pat0004_1", "brats_2013_pat0005_1")

#: The default card's two training commands without their data paths, output, name and exclusions
#: (tests/test_leave_one_out.py checks them against models/default/model.toml). Step 1 used the first
#: 123 synthetic cases; ``--low-resolution 0`` because that augmentation came later.
COMMON = ["--label-scheme", "brats2015", "--epochs", "20", "--iterations", "100", "--batch-size", "2",
          "--patch-size", "64,64,64", "--spacing", "1.5,1.5,1.5", "--filters", "16,32,64,128",
          "--validation-fraction", "0.05", "--low-resolution", "0"]
RECIPE = {
    "step1": {"synthetic_cases": 123, "options": ["--lr", "2e-3", "--validate-every", "5", "--seed", "0"]},
    "step2": {"synthetic_cases": None, "options": ["--lr", "1e-3", "--validate-every", "10", "--seed", "1"]},
}


def synthetic_subset(synth: Path, cases: int, target: Path) -> Path:
    """A Decathlon view of the first ``cases`` cases of ``synth`` (symbolic links, its own dataset.json)."""
    spec = json.loads((synth / "dataset.json").read_text())
    made = spec.get("tumorseg_synth", {})
    if made.get("seed") != 1000 or made.get("generator_version", 1) != 1:
        raise SystemExit(f"{synth} is not the recipe's synthetic data (seed 1000, generator version 1; it holds "
                         f"seed {made.get('seed')}, version {made.get('generator_version', 1)}): make it with "
                         "tumorseg synth --seed 1000 --generator-version 1")
    if len(spec["training"]) < cases:
        raise SystemExit(f"{synth} has {len(spec['training'])} cases; the recipe's first step needs {cases}")
    spec["training"] = spec["training"][:cases]
    spec["numTraining"] = cases
    made.update(cases=cases, case_seeds=made["case_seeds"][:cases])
    for entry in spec["training"]:
        for key in ("image", "label"):
            link = target / entry[key]
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to((synth / entry[key]).resolve())
    (target / "dataset.json").write_text(json.dumps(spec, indent=1))
    return target


def step_command(step: str, case: str, synth: Path, brats: Path, output: Path, epochs: int, iterations: int,
                 init: Path | None, runs_on: tuple[str, ...] = ()) -> list[str]:
    """The ``tumorseg train`` command of one step; ``runs_on``: options of where it runs, outside the
    recipe: --workers does not change the batches, but --device cuda trains in mixed precision, so
    its weights differ a little from a CPU run's."""
    options = list(COMMON)
    options[options.index("--epochs") + 1] = str(epochs)
    options[options.index("--iterations") + 1] = str(iterations)
    command = [sys.executable, "-m", "tumorseg.cli", "train", "--dataset", str(synth), "--dataset", str(brats),
               "-o", str(output), "--name", f"tumorseg-loo-{case}", "--exclude", case, *options,
               *RECIPE[step]["options"], *runs_on]
    return command + (["--init", str(init)] if init else [])


def train_step(command: list[str], output: Path, case: str, epochs: int, iterations: int, init: Path | None) -> None:
    """Run one training step unless ``output`` holds it already (resuming a killed one)."""
    if (output / "model.toml").exists():
        training = load_model(str(output)).card.training
        config = training["config"]
        base = load_model(str(init)).sha256 if init else None
        if (config["epochs"], config["iterations_per_epoch"]) != (epochs, iterations) or \
                case not in training.get("excluded_cases", []) or config.get("init_weights_sha256") != base:
            raise SystemExit(f"{output} holds a model trained with other settings; choose another --output")
        print(f"{output}: trained already, reused", flush=True)
        return
    resume = ["--resume"] if (output / "checkpoint.pt").exists() else []
    subprocess.run(command + resume, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synth", type=Path, required=True,
                        help="the data of tumorseg synth --cases 240 --seed 1000 --generator-version 1")
    parser.add_argument("--brats", type=Path, required=True, help="the brats2015-dev case folders")
    parser.add_argument("-o", "--output", type=Path, required=True, help="one folder per fold: step1/, step2/")
    parser.add_argument("--case", action="append", choices=IN_TRAINING, help="fold(s) to run  [default: all three]")
    parser.add_argument("--epochs", type=int, default=20, help="per step (recipe: 20)")
    parser.add_argument("--iterations", type=int, default=100, help="per epoch (recipe: 100)")
    parser.add_argument("--json", type=Path, help="write the held-out scores here")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="for training (on CUDA in mixed precision); scoring runs where predict would")
    parser.add_argument("--workers", type=int, default=0, help="tumorseg train --workers (the same batches)")
    args = parser.parse_args()
    if args.workers < 0:
        parser.error("--workers must be 0 or more")
    runs_on = ("--device", args.device, "--workers", str(args.workers))

    results = {}
    for case in args.case or IN_TRAINING:
        fold = args.output / case
        step1_data = synthetic_subset(args.synth, RECIPE["step1"]["synthetic_cases"], fold / "synth-step1")
        init = None
        for step, synth in (("step1", step1_data), ("step2", args.synth)):
            command = step_command(step, case, synth, args.brats, fold / step, args.epochs, args.iterations, init,
                                   runs_on)
            train_step(command, fold / step, case, args.epochs, args.iterations, init)
            init = fold / step
        print(f"fold {case}: scoring the held-out case with {init}", flush=True)
        segmenter = Segmenter(str(init), load_pipeline("default"))
        results[case] = score(segmenter, args.brats, "brats2015", only={case})["cases"][case]
        if args.json:  # after every fold: a later fold's failure loses nothing
            args.json.write_text(json.dumps({"recipe": "models/default (both steps)", "held_out": results,
                                             "epochs": args.epochs, "iterations": args.iterations}, indent=2))
    for case, row in results.items():
        print(f"held out {case}: " + ", ".join(f"{r} {row[r]:.3f}" for r in ("WT", "TC", "ET")))


if __name__ == "__main__":
    main()
