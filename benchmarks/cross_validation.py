"""K-fold cross-validation of a training recipe over the real cases, scored as ``predict`` runs.

    python benchmarks/cross_validation.py \\
        --dataset ../shared/data/brats2018-train:brats2021 --dataset ../shared/data/brats2015-dev:brats2015 \\
        -o cv/ --json cv.json [--synth synth-train] [--device cuda --workers 7] [--fold 0 --fold 1] [--fold final]

Folds. The cases of every data set are grouped by patient (a case whose expert labels match another
data set's case voxel for voxel, WT Dice >= 0.9 on the same grid, is the same patient: BraTS 2018's
Brats18_2013_20_1 is brats2015-dev's pat0006), the groups are shuffled by ``--seed`` and dealt to the
folds, four-sequence cases first so that every fold holds its share of them. ``OUT/folds.json``
records the folds; a rerun with other data, seed or fold count is refused rather than mixing folds.

Training. Fold k is ``tumorseg train`` on every data set with fold k's cases left out (``--exclude``),
the same ``RECIPE`` for every fold, into ``OUT/fold<k>/``; ``--fold final`` trains the same command on
all cases into ``OUT/final/`` (the model to ship; not scored). A finished fold is reused if its card
records the same command (another recipe into the same ``-o`` is refused), a killed one resumes.
``--epochs``/``--iterations`` shrink the recipe for a check of the mechanics (scores then mean nothing).
``--recipe cpu`` trains ``CPU_RECIPE`` instead: the bundled default model fine-tuned on the real cases,
what a 2-core CPU trains in about 40 minutes a fold; a held-out case that the model a fold started
from trained on (its card's ``initialised_from`` chain says which) is scored but left out of the
means. ``--init MODEL`` starts it from another model (e.g. version 2.2's folder, to repeat a fold of
version 2.3's recipe after 2.3 became ``default``). ``--synth DIR`` adds a ``tumorseg synth``
data set to every fold's training (never scored); ``--synth-share`` sets its share of the patches.
``--baseline MODEL`` scores another model (e.g. ``default``) on the same held-out cases, side
by side.

Scoring, on the held-out cases of each fold, on the input grid, with the full pipeline: once as
``predict`` runs by default (every sequence the case has, the card's preferred sets applied), then
with each non-empty subset of its sequences given alone (15 for a four-sequence case; one pass
unless ``--subset-tta``, since mirroring costs 8x on a CPU): WT/TC/ET Dice and HD95. Scores are
kept per fold in ``OUT/fold<k>/scores.json`` and reused when the model and
settings are the same. The summary prints the missing-sequence table beside published results on
BraTS 2018 (``published_missing_modality.json``: other data and splits, for orientation only) and
the ``preferred_sets`` that the table supports (``preferred_sets``).

Recording. ``--record-in MODEL`` (a model folder, e.g. ``OUT/final`` or ``models/default``) pools
this run's folds with the folds its card already records in ``metrics.cross_validation_folds``
(per-case rows side by side, subset means weighted by their case counts; a fold recorded twice or
dealt otherwise is refused) and sets the card's ``input.preferred_sets`` to the rule over the
pooled table, so folds trained in separate sessions make one table. Weights are not touched.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tumorseg.atomic import write_bytes_atomic
from tumorseg.config import FIXED_PRECISIONS, PRECISIONS, load_pipeline
from tumorseg.evaluate import check_same_grid, read_label_file
from tumorseg.labels import REGIONS, SCHEMES
from tumorseg.metrics import score_masks
from tumorseg.model import InputSpec, find_model_dir, load_card, load_model, write_card
from tumorseg.pipeline import Segmenter
from tumorseg.sequences import SEQUENCES, StudyInputs
from tumorseg.datasets import SAME_PATIENT_DICE, LabelledCase, discover_cases, patient_groups

HERE = Path(__file__).resolve().parent
PUBLISHED = HERE / "published_missing_modality.json"

#: The training options every fold shares (and the shipped model), less data, output, name and
#: exclusions. Sized by benchmarks/architecture_size.py: 16-32-64-128-256 at 1.5 mm with 96^3
#: windows (5.6 M parameters, 22.6 MB) predicts in about half the default model's time on a 2-core
#: CPU, and its checkpoint (weights and AdamW state, about 68 MB) comes back from a device run in 5
#: files of 16 MiB. One label scheme per --dataset follows from the data sets given.
RECIPE = ["--patch-size", "96,96,96", "--spacing", "1.5,1.5,1.5", "--filters", "16,32,64,128,256",
          "--batch-size", "2", "--lr", "1e-3", "--validation-fraction", "0",
          "--sequence-dropout", "0.5", "--low-resolution", "0.2", "--bias-field", "0.3", "--motion", "0.1",
          "--subset-normalisation", "--seed", "0"]
EPOCHS, ITERATIONS = 40, 100
#: What a 2-core CPU can train in about an hour per fold: the bundled default model's network
#: (16-32-64-128 at 1.5 mm, 64^3 windows, 1.4 M parameters) fine-tuned on the real cases with the
#: same augmentation. A held-out case that the initial model trained on is scored but left out of
#: the means (``seen_before``).
CPU_RECIPE = ["--init", "default", "--patch-size", "64,64,64", "--spacing", "1.5,1.5,1.5", "--filters", "16,32,64,128",
              "--batch-size", "2", "--lr", "5e-4", "--validation-fraction", "0",
              "--sequence-dropout", "0.5", "--low-resolution", "0.2", "--bias-field", "0.3", "--motion", "0.1",
              "--seed", "0"]
CPU_EPOCHS, CPU_ITERATIONS = 30, 100
#: ``preferred_sets``: a subset must beat the sequences it leaves out by this much mean Dice per
#: sequence dropped before the network is given it alone (more sequences are kept on a near tie).
MARGIN_PER_SEQUENCE = 0.01


def parse_dataset(text: str) -> tuple[Path, str]:
    """``PATH:SCHEME`` (the ground truth's label scheme) of one --dataset."""
    path, _, scheme = text.rpartition(":")
    if not path or scheme not in SCHEMES:
        raise argparse.ArgumentTypeError(f"{text!r}: give PATH:SCHEME, SCHEME one of {', '.join(SCHEMES)}")
    return Path(path), scheme


def discover(datasets: list[tuple[Path, str]]) -> list[LabelledCase]:
    """Every case of every data set; case ids must be unique across them (--exclude takes ids)."""
    cases = [case for path, scheme in datasets for case in discover_cases(path, scheme)]
    ids = [c.case_id for c in cases]
    if dupes := sorted({i for i in ids if ids.count(i) > 1}):
        raise SystemExit(f"case ids in more than one data set: {', '.join(dupes)} (tumorseg train --exclude "
                         "could not tell them apart)")
    return cases


def same_patient_groups(cases: list[LabelledCase], threshold: float = SAME_PATIENT_DICE) -> list[list[str]]:
    """Case ids grouped by patient (``tumorseg.datasets.patient_groups``)."""
    return [[cases[i].case_id for i in group] for group in patient_groups(cases, threshold)]


def make_folds(groups: list[list[str]], four_sequence: set[str], k: int, seed: int) -> list[list[str]]:
    """Deal patient groups to ``k`` folds: shuffled by ``seed``, larger groups first, each to the
    fold with the fewest four-sequence cases, then the fewest cases (then the lowest index)."""
    if len(groups) < k:
        raise SystemExit(f"{len(groups)} patients cannot fill {k} folds")
    order = np.random.default_rng([seed, 25]).permutation(len(groups))
    shuffled = sorted((groups[i] for i in order), key=len, reverse=True)  # stable: the shuffle breaks ties
    folds: list[list[str]] = [[] for _ in range(k)]
    for group in shuffled:
        load = [(sum(c in four_sequence for c in f), len(f), n) for n, f in enumerate(folds)]
        folds[min(load)[2]].extend(group)
    return [sorted(f) for f in folds]


def fold_plan(datasets: list[tuple[Path, str]], k: int, seed: int, output: Path) -> dict:
    """The folds, made once and recorded in ``output/folds.json``. A rerun takes the recorded folds
    when its data sets hold the same cases and its seed and fold count are the same, and is
    refused otherwise (a case trained on in one run must not be scored as unseen in the next)."""
    cases = discover(datasets)
    listing = [{"name": p.name, "label_scheme": s, "cases": [c.case_id for c in discover_cases(p, s)]}
               for p, s in datasets]
    path = output / "folds.json"
    if path.exists():
        recorded = json.loads(path.read_text())
        if (recorded["seed"], len(recorded["folds"]), recorded["datasets"]) != (seed, k, listing):
            raise SystemExit(f"{path} records other folds (data sets, seed or fold count changed); "
                             "choose another -o or rerun with the recorded settings")
        return recorded
    four = {c.case_id for c in cases if set(c.inputs.sequences) == set(SEQUENCES)}
    groups = same_patient_groups(cases)
    plan = {"seed": seed, "folds": make_folds(groups, four, k, seed), "datasets": listing,
            "same_patient": [g for g in groups if len(g) > 1], "four_sequence_cases": sorted(four),
            "rule": f"patients (WT Dice >= {SAME_PATIENT_DICE} on one grid) dealt to {k} folds, shuffled by seed"}
    output.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, json.dumps(plan, indent=1).encode())
    return plan


def train_command(datasets: list[tuple[Path, str]], synth: Path | None, output: Path, name: str,
                  exclude: list[str], length: tuple[int, int], recipe: list[str] = RECIPE) -> list[str]:
    """The ``tumorseg train`` command of one fold (``exclude``: its held-out cases) or of the final
    model (none)."""
    command = [sys.executable, "-m", "tumorseg.cli", "train", "-o", str(output), "--name", name]
    for path, scheme in datasets + ([(synth, "msd")] if synth else []):
        command += ["--dataset", str(path), "--label-scheme", scheme]
    for case in exclude:
        command += ["--exclude", case]
    return command + recipe + ["--epochs", str(length[0]), "--iterations", str(length[1])]


def adapt_recipe(recipe: list[str], init: str, synth_share: float | None, real_datasets: int,
                 precision: str | None = None) -> list[str]:
    """``recipe`` starting from ``init`` where it fine-tunes, trained in ``precision`` where given
    (``tumorseg train --precision``), and with ``--dataset-weights`` giving the synthetic set (last,
    see ``train_command``) ``synth_share`` of the patches and the real data sets equal shares of the
    rest."""
    out = [init if i and recipe[i - 1] == "--init" else v for i, v in enumerate(recipe)]
    if precision is not None:
        out += ["--precision", precision]
    if synth_share is not None:
        shares = [(1 - synth_share) / real_datasets] * real_datasets + [synth_share]
        out += ["--dataset-weights", ",".join(f"{w:.4g}" for w in shares)]
    return out


def train_once(command: list[str], output: Path, runs_on: tuple[str, ...]) -> None:
    """Run ``command`` with the options of where it runs (``runs_on``: --device, --workers) unless
    ``output`` holds its model already; resume a killed run. A finished model is reused only if
    its card records the same command (recipe, starting model, data, exclusions, length), so a
    rerun with another recipe or share cannot pass one recipe's folds off as another's."""
    if (output / "model.toml").exists():
        recorded = load_card(output).training.get("command", "")
        expected = "tumorseg train " + " ".join(command[command.index("train") + 1:])
        if recorded != expected and not recorded.startswith(expected + " "):  # + where it ran, --resume
            raise SystemExit(f"{output} holds a model trained by another command; choose another -o\n"
                             f"  recorded: {recorded}\n  now:      {expected}")
        print(f"{output}: trained already, reused", flush=True)
        return
    resume = ["--resume"] if (output / "checkpoint.pt").exists() else []
    subprocess.run(command + list(runs_on) + resume, check=True)


def subsets(sequences: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``sequences``, in SEQUENCES order, fewest sequences first."""
    ordered = [s for s in SEQUENCES if s in sequences]
    return [c for n in range(1, len(ordered) + 1) for c in itertools.combinations(ordered, n)]


def key(sequences: tuple[str, ...]) -> str:
    return "+".join(sequences)


def score_result(result, case: LabelledCase, scheme) -> dict:
    truth = read_label_file(case.label_path)
    check_same_grid(result.labels.source.shape, result.labels.affine, truth, case.label_path)
    out = {}
    for region in REGIONS:
        s = score_masks(scheme.region_mask(result.labels.array, region), case.scheme.region_mask(truth.labels, region),
                        result.labels.spacing, voxel_ml=result.labels.voxel_volume_ml)
        out[region] = {"dice": round(s.dice, 4), "hd95_mm": round(s.hd95_mm, 2)}
    return out


def seen_before(training: dict, listing: list[dict]) -> set[str]:
    """Cases of this run's data sets (``listing``, as in folds.json) that the models a model was
    fine-tuned from trained on, read from the ``initialised_from`` chain of its card's ``training``
    (each step's data sets by name, less its excluded cases), so a fold is judged by the model it
    really started from, whatever ``default`` is now."""
    seen: set[str] = set()
    step = training.get("initialised_from")
    while step:
        for dataset in listing:
            if dataset["name"] in step.get("datasets", []):
                seen |= set(dataset["cases"]) - set(step.get("excluded_cases", []))
        step = step.get("initialised_from")
    return seen


def trained_on(model: str, listing: list[dict]) -> set[str]:
    """The cases ``model`` (a name or folder) or a model it was fine-tuned from trained on."""
    training = load_card(find_model_dir(model)).training
    return set(training.get("training_cases", [])) | seen_before(training, listing)


def score_fold(model_ref: str, path: Path, cases: list[LabelledCase], tta: bool, with_subsets: bool,
               subset_tta: bool, precision: str = "auto") -> dict:
    """Scores of the held-out ``cases`` by ``model_ref``, kept in ``path`` (reused for the same
    model and settings, so a killed scoring run goes on where it stopped)."""
    model = load_model(model_ref)
    pipeline = load_pipeline("default").with_overrides(precision=precision)
    as_predict = Segmenter(model, pipeline.with_overrides(tta=tta))
    exact = Segmenter(model, pipeline.with_overrides(tta=subset_tta, all_sequences=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {"model_sha256": model.sha256, "tta": tta, "subsets": with_subsets, "subset_tta": subset_tta,
                "precision": as_predict.spec.precision,
                "decoding": model.card.decoding.settings() if model.card.decoding else None}
    kept = json.loads(path.read_text()) if path.exists() else {}
    # Scores kept before the precision setting came were fp32 (the CPU's only arithmetic then), and
    # before the decoding setting came, the argmax's.
    scores = kept.get("cases", {}) if {"precision": "fp32", "decoding": None, **kept.get("settings", {})} == settings else {}
    for case in cases:
        if case.case_id in scores:
            continue
        start = time.perf_counter()
        files = dict(case.inputs.files)
        row = {"sequences": list(case.inputs.sequences),
               "predict_used": list(model.card.input.choose(case.inputs.sequences)),
               "predict": score_result(as_predict.segment_inputs(case.inputs), case, model.card.scheme), "subsets": {}}
        for subset in subsets(case.inputs.sequences) if with_subsets else []:
            inputs = StudyInputs(files=tuple((s, files[s]) for s in subset))
            row["subsets"][key(subset)] = score_result(exact.segment_inputs(inputs), case, model.card.scheme)
        row["seconds"] = round(time.perf_counter() - start, 1)
        scores[case.case_id] = row
        write_bytes_atomic(path, json.dumps({"settings": settings, "cases": scores}, indent=1).encode())
        print(f"  {case.case_id:24s} as predict runs ({key(row['predict_used'])}): "
              + " ".join(f"{r} {row['predict'][r]['dice']:.3f}" for r in REGIONS) + f"  ({row['seconds']} s)", flush=True)
    return {c.case_id: scores[c.case_id] for c in cases}


def summarise(rows: list[dict]) -> dict:
    """Mean and worst Dice and mean HD95 per region over ``rows`` (each {region: {dice, hd95_mm}})."""
    out = {"cases": len(rows)}
    for region in REGIONS:
        dice = [r[region]["dice"] for r in rows]
        hd95 = [r[region]["hd95_mm"] for r in rows]
        out[region] = {"dice_mean": round(float(np.mean(dice)), 4), "dice_worst": round(float(np.min(dice)), 4),
                       "hd95_mean_mm": round(float(np.mean(hd95)), 2)}
    return out


def preferred_sets(dice: dict[tuple[str, ...], dict[str, float]]) -> list[tuple[str, ...]]:
    """The card's ``preferred_sets`` that the table supports: for every set of sequences a case
    may have, the network is given its subset with the highest mean Dice over the regions (``dice``:
    subset -> region -> mean Dice), counting ``MARGIN_PER_SEQUENCE`` for each sequence kept (so a
    subset must be clearly better to drop one). For a case without T1gd the mean leaves ET out: no
    set without contrast shows enhancing tumour, and its ET Dice there is noise, not a reason to drop
    a sequence. ``InputSpec.choose`` gives the first listed set the case holds, so each case's choice
    is listed before the other listed sets it holds, and only the sets needed for the choices are."""
    def score(subset: tuple[str, ...], have: tuple[str, ...]) -> float:
        regions = REGIONS if "t1gd" in have else tuple(r for r in REGIONS if r != "ET")
        return float(np.mean([dice[subset][r] for r in regions])) + MARGIN_PER_SEQUENCE * len(subset)

    best = {have: sorted((s for s in dice if set(s) <= set(have)), key=lambda s: (-score(s, have), -len(s), s))[0]
            for have in dice}

    # Listed: every subset chosen for a larger set, and a set that is its own best where a listed
    # set lies inside it (else that one would be chosen for it).
    listed = {best[have] for have in dice if best[have] != have}
    while own := {h for h in dice if best[h] == h and h not in listed and any(set(t) < set(h) for t in listed)}:
        listed |= own
    # Order: a case's choice before every other listed set that the case holds.
    after = {s: {best[h] for h in dice if best[h] in listed and best[h] != s and set(s) <= set(h)} for s in listed}
    order: list[tuple[str, ...]] = []
    while len(order) < len(listed):
        free = [s for s in listed if s not in order and after[s] <= set(order)]
        if not free:
            raise ValueError("no order of preferred sets gives every case its best subset")
        order.append(min(free, key=lambda s: (-score(s, s), -len(s), s)))
    spec = InputSpec(sequences=tuple(SEQUENCES), preferred_sets=tuple(order))
    assert all(spec.choose(have) == best[have] for have in dice)
    return order


def report(plan: dict, scores: dict[str, dict], seen: set[str] = frozenset()) -> dict:
    """The CV table: as predict runs (all real cases; four-sequence cases), and per subset. Cases in
    ``seen`` (trained on by the model a fold started from) are left out of every mean."""
    unseen = {c: r for c, r in scores.items() if c not in seen}
    four = [unseen[c] for c in plan["four_sequence_cases"] if c in unseen]
    out = {"as_predict_runs": {"all_cases": summarise([r["predict"] for r in unseen.values()]) if unseen else None,
                               "four_sequence_cases": summarise([r["predict"] for r in four]) if four else None},
           "left_out_seen_by_init": sorted(set(scores) & seen), "subsets": {}}
    for subset in subsets(tuple(SEQUENCES)):
        rows = [r["subsets"][key(subset)] for r in four if key(subset) in r["subsets"]]
        if rows:
            out["subsets"][key(subset)] = summarise(rows)
    if len(out["subsets"]) == 15:
        table = {tuple(k.split("+")): {r: v[r]["dice_mean"] for r in REGIONS} for k, v in out["subsets"].items()}
        out["preferred_sets"] = [list(s) for s in preferred_sets(table)]
    return out


CARD_METRIC = "cross_validation_folds"
FOUR = "+".join(SEQUENCES)


def card_metric(plan: dict, scores: dict[str, dict], table: dict, seen: set[str], fold_sha256: dict[int, str],
                command: str) -> dict:
    """This run's folds as a card records them (``CARD_METRIC``): per held-out case its Dice and
    HD95 as predict runs, and the subset means with their case counts."""
    fold_of = {c: k for k, f in enumerate(plan["folds"]) for c in f}
    cases = {c: {**{r: row["predict"][r]["dice"] for r in REGIONS},
                 "hd95_mm": [row["predict"][r]["hd95_mm"] for r in REGIONS],
                 "sequences": "+".join(row["sequences"]), "fold": fold_of[c], "seen_by_init": c in seen}
             for c, row in scores.items()}
    subsets_ = {k: {**{r: v[r]["dice_mean"] for r in REGIONS}, "hd95_mm": [v[r]["hd95_mean_mm"] for r in REGIONS],
                    "cases": v["cases"]} for k, v in table.get("subsets", {}).items()}
    return {"commands": [command], "seed": plan["seed"], "folds": sorted({fold_of[c] for c in scores}),
            "fold_model_sha256": {str(k): v for k, v in sorted(fold_sha256.items())}, "cases": cases,
            "subsets": subsets_}


def pool_metrics(recorded: dict, new: dict, plan: dict) -> dict:
    """Two card records of disjoint folds of the same plan as one: the cases side by side, each
    subset's mean weighted by its case count, the means over cases recomputed."""
    fold_of = {c: k for k, f in enumerate(plan["folds"]) for c in f}
    if both := sorted(set(recorded["folds"]) & set(new["folds"])):
        raise SystemExit(f"fold(s) {both} recorded already; give only the folds not yet recorded")
    if moved := sorted(c for c, v in recorded["cases"].items() if fold_of.get(c) != v["fold"]):
        raise SystemExit(f"the recorded folds were dealt otherwise ({', '.join(moved)}): not the same plan")
    if recorded["seed"] != plan["seed"]:
        raise SystemExit(f"the recorded folds come from seed {recorded['seed']}, not {plan['seed']}")
    if bool(recorded["subsets"]) != bool(new["subsets"]):
        raise SystemExit("one side has no subset table (--no-subsets): its subset means would cover fewer cases")
    subsets_ = {}
    order = [key(s) for s in subsets(tuple(SEQUENCES))]
    for k in sorted(set(recorded["subsets"]) | set(new["subsets"]), key=order.index):
        parts = [d["subsets"][k] for d in (recorded, new) if k in d["subsets"]]
        n = sum(p["cases"] for p in parts)
        subsets_[k] = {r: round(sum(p[r] * p["cases"] for p in parts) / n, 4) for r in REGIONS}
        if all("hd95_mm" in p for p in parts):
            subsets_[k]["hd95_mm"] = [round(sum(p["hd95_mm"][i] * p["cases"] for p in parts) / n, 2) for i in range(3)]
        subsets_[k]["cases"] = n
    return {"commands": recorded["commands"] + new["commands"], "seed": plan["seed"],
            "folds": sorted(recorded["folds"] + new["folds"]),
            "fold_model_sha256": dict(sorted({**recorded["fold_model_sha256"], **new["fold_model_sha256"]}.items())),
            "cases": {**recorded["cases"], **new["cases"]}, "subsets": subsets_}


def metric_means(metric: dict) -> dict:
    """``metric`` with its means over the cases a fold's starting model did not train on: all of
    them (``unseen_mean``) and the four-sequence ones (``four_sequence_mean``), as predict ran."""
    rows = {c: {r: {"dice": v[r], "hd95_mm": v["hd95_mm"][i]} for i, r in enumerate(REGIONS)}
            for c, v in metric["cases"].items() if not v["seen_by_init"]}
    out = dict(metric)
    for name, chosen in (("four_sequence_mean", [c for c in rows if metric["cases"][c]["sequences"] == FOUR]),
                         ("unseen_mean", list(rows))):
        s = summarise([rows[c] for c in chosen])
        out[name] = {**{r: s[r]["dice_mean"] for r in REGIONS}, "worst": [s[r]["dice_worst"] for r in REGIONS],
                     "hd95_mm": [s[r]["hd95_mean_mm"] for r in REGIONS], "cases": s["cases"]}
    if len(metric["subsets"]) == 15:
        table = {tuple(k.split("+")): {r: v[r] for r in REGIONS} for k, v in metric["subsets"].items()}
        out["preferred_sets_rule"] = [list(s) for s in preferred_sets(table)]
    return out


def record_in_card(model_dir: Path, new: dict, plan: dict) -> dict:
    """Pool ``new`` into the card in ``model_dir`` (``pool_metrics``), set its ``preferred_sets``
    to the pooled table's rule, and write the card atomically. Returns the pooled record."""
    card = load_card(model_dir)
    recorded = card.metrics.get(CARD_METRIC)
    pooled = metric_means(pool_metrics(recorded, new, plan) if recorded else new)
    pooled["note"] = (f"folds {', '.join(map(str, pooled['folds']))} of {len(plan['folds'])} (seed {plan['seed']}), "
                      "each trained by the same recipe without its held-out cases and scored on them as predict "
                      "runs (mirroring, every sequence); subsets: one pass, mean over the four-sequence cases. Cases "
                      "the starting model trained on (seen_by_init) are left out of the means.")
    metrics = {**card.metrics, CARD_METRIC: pooled}
    rule = tuple(tuple(s) for s in pooled.get("preferred_sets_rule", card.input.preferred_sets))
    card = dataclasses.replace(card, metrics=metrics, input=dataclasses.replace(card.input, preferred_sets=rule))
    write_card(model_dir, card)
    return pooled


def print_table(table: dict) -> None:
    published = json.loads(PUBLISHED.read_text())
    columns = {key(tuple(s)): i for i, s in enumerate(published["subsets"])}
    names = {"flair": "FLAIR", "t1": "T1", "t1gd": "T1gd", "t2": "T2"}
    if table["left_out_seen_by_init"]:
        print(f"left out of the means (trained on by the initial model): {', '.join(table['left_out_seen_by_init'])}")
    for label, row in table["as_predict_runs"].items():
        if row:
            print(f"as predict runs, {label} ({row['cases']}): " + "; ".join(
                f"{r} {row[r]['dice_mean']:.3f} (worst {row[r]['dice_worst']:.3f}, HD95 {row[r]['hd95_mean_mm']:.1f} mm)"
                for r in REGIONS))
    if not table["subsets"]:
        return
    methods = list(published["methods"])
    print("\n| sequences | cases | WT | TC | ET | HD95 WT/TC/ET mm | " + " | ".join(f"{m} WT/TC/ET" for m in methods) + " |")
    print("|---" * (5 + len(methods) + 1) + "|")
    for subset, row in table["subsets"].items():
        theirs = [published["methods"][m] for m in methods]
        i = columns[subset]
        print(f"| {' + '.join(names[s] for s in subset.split('+'))} | {row['cases']} | "
              + " | ".join(f"{row[r]['dice_mean']:.3f}" for r in REGIONS) + " | "
              + "/".join(f"{row[r]['hd95_mean_mm']:.1f}" for r in REGIONS) + " | "
              + " | ".join("/".join(f"{t[r][i] / 100:.3f}" for r in REGIONS) for t in theirs) + " |")
    if "preferred_sets" in table:
        print(f"\npreferred_sets the table supports: {table['preferred_sets'] or 'none (give every sequence)'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=parse_dataset, action="append", required=True, metavar="PATH:SCHEME",
                        help="case folders with expert labels and their label scheme (repeat; order kept)")
    parser.add_argument("--synth", type=Path, help="a tumorseg synth data set trained on in every fold (never scored)")
    parser.add_argument("--synth-share", type=float, help="share of the training patches drawn from --synth, the "
                        "rest split equally between the --dataset sets  [default: an equal share, as one more data set]")
    parser.add_argument("--init", metavar="MODEL", default="default",
                        help="--recipe cpu: the model every fold and the final model start from (name or folder)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="deals the patients to the folds")
    parser.add_argument("--fold", action="append", help="train and score only these folds (0-based; repeat), "
                        "or 'final': train the recipe on every case (OUT/final)  [default: every fold]")
    parser.add_argument("--no-train", action="store_true", help="only score folds already trained")
    parser.add_argument("--no-subsets", action="store_true", help="score as predict runs only (no missing-sequence table)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                        help="mirroring test-time augmentation when scoring as predict runs (predict's default: on)")
    parser.add_argument("--subset-tta", action=argparse.BooleanOptionalAction, default=False,
                        help="mirroring for the 15 subsets too (8x the time; off: one pass, as --no-tta)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="the network's arithmetic when scoring, as tumorseg predict --precision")
    parser.add_argument("--baseline", metavar="MODEL", help="also score this model (name or folder) on the same "
                        "held-out cases, in OUT/baseline (cases it trained on are left out of its means)")
    parser.add_argument("--recipe", choices=("gpu", "cpu"), default="gpu",
                        help="gpu: RECIPE, the model to ship; cpu: CPU_RECIPE, fine-tuning the default model")
    parser.add_argument("--epochs", type=int, help="to shrink the recipe for a quick check  [default: the recipe's]")
    parser.add_argument("--iterations", type=int, help="per epoch, to shrink the recipe  [default: the recipe's]")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="for training")
    parser.add_argument("--train-precision", choices=FIXED_PRECISIONS, help="tumorseg train --precision, part "
                        "of the recipe (recorded in each fold's command)  [default: train's, fp32 on the CPU]")
    parser.add_argument("--workers", type=int, default=0, help="tumorseg train --workers (the same batches)")
    parser.add_argument("--json", type=Path, help="write the folds, per-case scores and the table here")
    parser.add_argument("--record-in", type=Path, metavar="MODEL_DIR",
                        help="pool this run's folds into MODEL_DIR's card (metrics.cross_validation_folds) and set "
                        "its preferred_sets to the pooled table's rule")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.folds < 2 or args.workers < 0:
        parser.error("--folds must be 2 or more and --workers 0 or more")

    plan = fold_plan(args.dataset, args.folds, args.seed, args.output)
    print(f"{args.folds} folds (seed {args.seed}): " + "; ".join(f"{k}: {len(f)} cases" for k, f in enumerate(plan["folds"]))
          + f"; same patient: {plan['same_patient'] or 'none'}", flush=True)
    recipe, epochs, iterations = {"gpu": (RECIPE, EPOCHS, ITERATIONS), "cpu": (CPU_RECIPE, CPU_EPOCHS, CPU_ITERATIONS)}[
        args.recipe]
    if args.recipe != "cpu" and args.init != "default":
        parser.error("--init is for --recipe cpu (the GPU recipe trains from random weights)")
    if args.synth_share is not None and (not args.synth or not 0 < args.synth_share < 1):
        parser.error("--synth-share needs --synth and a share between 0 and 1")
    recipe = adapt_recipe(recipe, args.init, args.synth_share, len(args.dataset), args.train_precision)
    length = (args.epochs or epochs, args.iterations or iterations)
    runs_on = ("--device", args.device, "--workers", str(args.workers), "-q")
    chosen = args.fold or [str(k) for k in range(args.folds)]
    if bad := [k for k in chosen if k != "final" and k not in {str(n) for n in range(args.folds)}]:
        parser.error(f"--fold {', '.join(bad)}: folds are 0 to {args.folds - 1}, or final")
    wanted = [int(k) for k in chosen if k != "final"]
    by_id = {c.case_id: c for c in discover(args.dataset)}
    scores: dict[str, dict] = {}
    baseline: dict[str, dict] = {}
    seen: set[str] = set()  # held-out cases that a fold's starting model trained on
    fold_sha256: dict[int, str] = {}
    for k in wanted:
        held_out, folder = plan["folds"][k], args.output / f"fold{k}"
        if not args.no_train:
            train_once(train_command(args.dataset, args.synth, folder, f"tumorseg-cv-fold{k}", held_out, length, recipe),
                       folder, runs_on)
        if not (folder / "model.toml").exists():
            print(f"fold {k}: not trained, not scored", flush=True)
            continue
        seen |= trained_on(str(folder), plan["datasets"]) & set(held_out)
        fold_sha256[k] = load_card(folder).weights.sha256
        print(f"fold {k}: scoring {len(held_out)} held-out cases", flush=True)
        scores.update(score_fold(str(folder), folder / "scores.json", [by_id[c] for c in held_out], args.tta,
                                 not args.no_subsets, args.subset_tta, args.precision))
        if args.baseline:
            print(f"fold {k}: scoring the same cases with {args.baseline}", flush=True)
            baseline.update(score_fold(args.baseline, args.output / "baseline" / "scores.json",
                                       [by_id[c] for c in held_out], args.tta, not args.no_subsets, args.subset_tta,
                                       args.precision))
    if "final" in chosen and not args.no_train:
        train_once(train_command(args.dataset, args.synth, args.output / "final", "tumorseg-default", [], length, recipe),
                   args.output / "final", runs_on)
    table = report(plan, scores, seen) if scores else {}
    if table:
        print_table(table)
    base_table = report(plan, baseline, trained_on(args.baseline, plan["datasets"])) if baseline else {}
    if base_table:
        print(f"\nbaseline {args.baseline}, the same held-out cases:")
        print_table(base_table)
    if args.json:
        args.json.write_text(json.dumps({"plan": plan, "recipe": recipe, "length": length, "tta": args.tta,
                                         "subset_tta": args.subset_tta,
                                         "cases": scores, "table": table, "baseline": args.baseline,
                                         "baseline_cases": baseline, "baseline_table": base_table}, indent=1))
    if args.record_in and scores:
        command = "python benchmarks/cross_validation.py " + shlex.join(sys.argv[1:])
        pooled = record_in_card(args.record_in, card_metric(plan, scores, table, seen, fold_sha256, command), plan)
        mean = pooled["four_sequence_mean"]
        print(f"\n{args.record_in}: folds {pooled['folds']} recorded; four-sequence cases ({mean['cases']}): "
              + " ".join(f"{r} {mean[r]:.3f}" for r in REGIONS)
              + f"; preferred_sets {pooled.get('preferred_sets_rule', 'unchanged (fewer than 15 subsets)')}")


if __name__ == "__main__":
    main()
