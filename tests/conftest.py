"""Shared fixtures: a tiny random-weight model, synthetic scans, and the shared real data."""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tumorseg.model import Architecture, InputSpec, ModelCard, Weights, build_network, save_model

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def pytest_configure(config) -> None:
    """Under pytest-xdist (pyproject's addopts: one worker per core) each worker, and the tumorseg
    processes its tests start, get their share of the cores, not all of them each."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def benchmark_module(name: str):
    """A script under benchmarks/ imported as a module (they are scripts, not a package)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test when that data set is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs ../shared/data/{'/'.join(parts)} (absent in a fresh clone; present in CI)")
    return path


def make_tiny_model(directory: Path, sequences=("flair", "t1", "t1gd", "t2"), required=(), min_sequences=1,
                    spacing=(1.0, 1.0, 1.0), seed: int = 0, background_bias: float | None = None,
                    preferred_sets=()) -> Path:
    """A small random-weight DynUNet: fine for geometry and mechanics, says nothing of quality.

    ``background_bias`` added to the background logit makes a model that finds nothing.
    """
    card = ModelCard(
        name="tiny-test",
        version="0",
        input=InputSpec(sequences=tuple(sequences), required=tuple(required), min_sequences=min_sequences,
                        spacing_mm=spacing, patch_size=(32, 32, 32), preferred_sets=tuple(preferred_sets)),
        labels="msd",
        architecture=Architecture(filters=(4, 8, 16), strides=(1, 2, 2)),
        weights=Weights("weights.safetensors", "0" * 64),
    )
    torch.manual_seed(seed)
    network = build_network(card)
    if background_bias is not None:
        with torch.no_grad():
            network.output_block.conv.conv.bias[0] += background_bias
    save_model(directory, card, network)
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def empty_model(tmp_path_factory) -> Path:
    """A tiny model that labels every voxel background."""
    return make_tiny_model(tmp_path_factory.mktemp("empty-model"), spacing=(4.0, 4.0, 4.0), background_bias=100.0)


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray, qform_code: int = 1, sform_code: int = 1) -> Path:
    image = nib.Nifti1Image(array, affine)
    image.header.set_qform(affine, code=qform_code)
    image.header.set_sform(affine, code=sform_code)
    nib.save(image, str(path))
    return path


def brain_phantom(shape=(40, 44, 36), seed: int = 0) -> np.ndarray:
    """An ellipsoidal 'brain' with smooth texture on a zero background, float32."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = sum(g**2 for g in grid) < 0.8
    image = 100 + 20 * grid[0] + 10 * np.sin(3 * grid[1]) + rng.normal(0, 5, shape)
    return np.where(inside, image, 0).astype(np.float32)


def run_tool(*args: str) -> subprocess.CompletedProcess:
    """Run a Debian tool (dciodvfy, dcentvfy, dcm2niix, dcmtk's); skip where it is not installed (CI has it)."""
    if shutil.which(args[0]) is None:
        pytest.skip(f"needs {args[0]} (Debian packages dicom3tools / dcm2niix / dcmtk; .ci/run installs them)")
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def dicom3tools_findings(result: subprocess.CompletedProcess) -> tuple[list[str], list[str]]:
    """(error lines, warning lines) of a dciodvfy / dcentvfy run."""
    lines = (result.stdout + result.stderr).splitlines()
    return [l for l in lines if l.startswith("Error")], [l for l in lines if l.startswith("Warning")]


class ThresholdNet(torch.nn.Module):
    """Logits for the MSD scheme: label 1 where channel 0 > 2.5 (normalised units)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = 10.0 * (x[:, :1] - 2.5)
        low = torch.full_like(bright, -100.0)
        return torch.cat([torch.zeros_like(bright), bright, low, low], dim=1)
