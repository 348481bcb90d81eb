"""Where a batch writes what under ``OUT``: shared by every way of running a batch."""
from __future__ import annotations

#: Raise when a change to tumorseg changes the outputs it writes: earlier outputs are redone.
RESULTS_VERSION = 6  # 4: HD-BET's input z-scored over the head; 5: its head box found over every voxel (air at 0); 6: holes filled after every label is cleaned
CASES_DIR = "cases"
CASE_RECORD = "batch-case.json"
MANIFEST_CSV = "manifest.csv"
MANIFEST_JSON = "manifest.json"
LOCK_FILE = ".batch.lock"

MANIFEST_COLUMNS = (
    "case_id", "status", "reused", "error_code", "error_kind", "error_message", "warnings", "source", "sequences_used", "sequences_ignored",
    "wt_ml", "tc_ml", "et_ml", "label_map", "report", "rtstruct", "seg",
    "read_prepare_s", "infer_s", "finish_write_s", "inputs_sha256", "model_sha256", "config_sha256",
)

