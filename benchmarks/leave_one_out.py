"""Leave-one-out for version 2.2 of the default model: retrain it without one real case, score that case.

Version 2.2 of the default model (the starting point of versions 2.3 and 2.4, models/default) was trained in
three steps, on synthetic cases and on three of the four BraTS 2015 cases in
../shared/data/brats2015-dev (pat0006 held out). Its scores on the other
three say little, as it saw them. For each case given, this script trains all three steps again with
that case left out and the other three real cases in, pat0006 included (the card's recorded
commands, see ``RECIPE``), then scores the held-out case as ``predict`` runs on it (FLAIR and T1c):

    tumorseg synth -o synth-train --cases 240 --seed 1000 --generator-version 1   # the card's data
    python benchmarks/leave_one_out.py --synth synth-train --brats ../shared/data/brats2015-dev \\
        -o loo/ --json loo.json

One fold is about 2 hours on a 2-core CPU (steps 1 and 2 about 95 minutes, step 3 about 35), and
a few minutes on one H200 with `--device cuda --workers 7` (three folds at once, see loo_gpu.sh). A
step already trained is reused and a killed one resumes, so a rerun only does what is missing.
``--epochs``/``--iterations`` shrink every step for a quick check of the mechanics (the scores then
mean nothing).
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

#: The default card's three training commands without their data paths, output, name and
#: exclusions (tests/test_leave_one_out.py checks them against models/default/model.toml). Step 1
#: used the first 123 synthetic cases; steps 1 and 2 ``--low-resolution 0`` because that
#: augmentation came later, step 3 its default of then, 0.2.
COMMON = ["--label-scheme", "brats2015", "--batch-size", "2", "--patch-size", "64,64,64", "--spacing", "1.5,1.5,1.5",
          "--filters", "16,32,64,128", "--validation-fraction", "0.05"]
RECIPE = {
    "step1": {"synthetic_cases": 123, "epochs": 20,
              "options": ["--lr", "2e-3", "--validate-every", "5", "--seed", "0", "--low-resolution", "0"]},
    "step2": {"synthetic_cases": None, "epochs": 20,
              "options": ["--lr", "1e-3", "--validate-every", "10", "--seed", "1", "--low-resolution", "0"]},
    "step3": {"synthetic_cases": None, "epochs": 15,
              "options": ["--lr", "5e-4", "--validate-every", "15", "--preferred-set", "flair,t1gd", "--seed", "5",
                          "--low-resolution", "0.2"]},
}
ITERATIONS = 100  # per epoch, in every step


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


def step_length(step: str, epochs: int | None, iterations: int | None) -> tuple[int, int]:
    """Epochs and iterations per epoch of one step: the recipe's, unless shrunk."""
    return epochs or RECIPE[step]["epochs"], iterations or ITERATIONS


def step_command(step: str, case: str, synth: Path, brats: Path, output: Path, length: tuple[int, int],
                 init: Path | None, runs_on: tuple[str, ...] = ()) -> list[str]:
    """The ``tumorseg train`` command of one step; ``runs_on``: options of where it runs, outside the
    recipe: --workers does not change the batches, but --device cuda trains in mixed precision, so
    its weights differ a little from a CPU run's."""
    command = [sys.executable, "-m", "tumorseg.cli", "train", "--dataset", str(synth), "--dataset", str(brats),
               "-o", str(output), "--name", f"tumorseg-loo-{case}", "--exclude", case, *COMMON,
               "--epochs", str(length[0]), "--iterations", str(length[1]), *RECIPE[step]["options"], *runs_on]
    return command + (["--init", str(init)] if init else [])


def train_step(command: list[str], output: Path, case: str, length: tuple[int, int], init: Path | None) -> None:
    """Run one training step unless ``output`` holds it already (resuming a killed one)."""
    if (output / "model.toml").exists():
        training = load_model(str(output)).card.training
        config = training["config"]
        base = load_model(str(init)).sha256 if init else None
        if (config["epochs"], config["iterations_per_epoch"]) != length or \
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
    parser.add_argument("-o", "--output", type=Path, required=True, help="one folder per fold: step1/ to step3/")
    parser.add_argument("--case", action="append", choices=IN_TRAINING, help="fold(s) to run  [default: all three]")
    parser.add_argument("--epochs", type=int, help="per step, to shrink the recipe (its: 20, 20, 15)")
    parser.add_argument("--iterations", type=int, help=f"per epoch, to shrink the recipe (its: {ITERATIONS})")
    parser.add_argument("--json", type=Path, help="write the held-out scores here")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="for training (on CUDA in mixed precision); scoring runs where predict would")
    parser.add_argument("--workers", type=int, default=0, help="tumorseg train --workers (the same batches)")
    args = parser.parse_args()
    if args.workers < 0:
        parser.error("--workers must be 0 or more")
    runs_on = ("--device", args.device, "--workers", str(args.workers))

    lengths = {step: step_length(step, args.epochs, args.iterations) for step in RECIPE}
    results = {}
    for case in args.case or IN_TRAINING:
        fold = args.output / case
        step1_data = synthetic_subset(args.synth, RECIPE["step1"]["synthetic_cases"], fold / "synth-step1")
        init = None
        for step, length in lengths.items():
            synth = step1_data if RECIPE[step]["synthetic_cases"] else args.synth
            command = step_command(step, case, synth, args.brats, fold / step, length, init, runs_on)
            train_step(command, fold / step, case, length, init)
            init = fold / step
        print(f"fold {case}: scoring the held-out case with {init}", flush=True)
        segmenter = Segmenter(str(init), load_pipeline("default"))
        results[case] = score(segmenter, args.brats, "brats2015", only={case})["cases"][case]
        if args.json:  # after every fold: a later fold's failure loses nothing
            args.json.write_text(json.dumps({"recipe": "models/default (all three steps)", "held_out": results,
                                             "lengths": lengths}, indent=2))
    for case, row in results.items():
        print(f"held out {case}: " + ", ".join(f"{r} {row[r]:.3f}" for r in ("WT", "TC", "ET")))


if __name__ == "__main__":
    main()
