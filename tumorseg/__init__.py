"""tumorseg: brain tumour segmentation of 3D MRI, from scan to label map, RTSTRUCT and report."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "Segmenter", "load_model", "load_pipeline"]


def __getattr__(name: str):
    # Lazy: `import tumorseg` stays cheap (no torch) for the CLI's --help and `models`.
    if name == "Segmenter":
        from .pipeline import Segmenter

        return Segmenter
    if name == "load_model":
        from .model import load_model

        return load_model
    if name == "load_pipeline":
        from .config import load_pipeline

        return load_pipeline
    raise AttributeError(name)
