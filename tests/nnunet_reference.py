"""nnU-Net's own answers for tests/test_imported.py and benchmarks/imported_models.py.

Runs under the nnU-Net virtual environment (its own torch and nnunetv2), never imports tumorseg:

    $TUMORSEG_NNUNET_VENV/bin/python tests/nnunet_reference.py MODEL_FOLDER OUT --folds 0 1 \\
        --case NAME FILE_0000 FILE_0001 ... [--case ...]

For each case it writes OUT/NAME_preprocessed.npy (nnU-Net's DefaultPreprocessor output),
OUT/NAME_logits.npy (``predict_logits_from_preprocessed_data``: folds, windows, mirroring) and
OUT/NAME_seconds.json (the seconds the logits took). The label maps themselves come from the
``nnUNetv2_predict_from_modelfolder`` command, which the tests run separately.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--folds", nargs="+", required=True)
    parser.add_argument("--checkpoint", default="checkpoint_final.pth")
    parser.add_argument("--no-mirroring", action="store_true")
    parser.add_argument("--step-size", type=float, default=0.5)
    parser.add_argument("--case", nargs="+", action="append", required=True)
    args = parser.parse_args()

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    predictor = nnUNetPredictor(tile_step_size=args.step_size, use_gaussian=True,
                                use_mirroring=not args.no_mirroring, device=torch.device("cpu"),
                                verbose=False, allow_tqdm=False)
    folds = [f if f == "all" else int(f) for f in args.folds]
    predictor.initialize_from_trained_model_folder(args.model, folds, args.checkpoint)
    preprocessor = DefaultPreprocessor(verbose=False)
    for name, *files in args.case:
        data, _, _ = preprocessor.run_case(files, None, predictor.plans_manager, predictor.configuration_manager,
                                           predictor.dataset_json)
        np.save(f"{args.out}/{name}_preprocessed.npy", data)
        start = time.perf_counter()
        logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data))
        seconds = time.perf_counter() - start
        np.save(f"{args.out}/{name}_logits.npy", logits.numpy())
        with open(f"{args.out}/{name}_seconds.json", "w") as f:
            json.dump({"logits_seconds": seconds, "torch": torch.__version__, "threads": torch.get_num_threads()}, f)


if __name__ == "__main__":
    main()
