"""Models trained by other tools, run through tumorseg's pipeline: nnU-Net v2 results folders
(:mod:`.nnunet`) and MONAI bundles (:mod:`.monai_bundle`).

``tumorseg models import`` writes a model card with an ``[imported]`` table that points at the
tool's files (or a copy of them) with their sha256; :func:`load_imported` checks every checksum
before reading anything, and reads without running code unless the card records ``trust_code``.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ModelError
from ..model import ModelCard, verify_file


def verify_files(card: ModelCard, model_dir: Path) -> Path:
    """The imported files' folder, after checking each file's sha256 against the card."""
    assert card.imported is not None
    folder = card.imported.folder_path(model_dir)
    for name, digest in sorted(card.imported.files.items()):
        verify_file(folder / name, digest)
    return folder


def load_imported(card: ModelCard, model_dir: Path):
    """The network (in eval mode, on the CPU) of an imported model, after checking its files."""
    folder = verify_files(card, model_dir)
    assert card.imported is not None
    if card.imported.format == "nnunet":
        from .nnunet import load_network

        return load_network(card, folder)
    from .monai_bundle import load_network as load_bundle_network

    return load_bundle_network(card, folder)


def load_torch(path: Path, trust_code: bool = False, allowed: tuple = (), holds: str = "the file") -> object:
    """A file written by ``torch.save``, read with ``weights_only=True`` (tensors, containers,
    builtins, and the ``allowed`` types): a pickle that names anything else, whose loading could
    run code, is refused naming it, unless ``trust_code``. ``holds`` names the file in messages."""
    import pickle

    import torch

    try:
        if trust_code:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = str(e).strip().splitlines()
        why = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")
        raise ModelError(f"refused: {holds} holds an object whose loading could run code ({why.strip()}); "
                         "import it with --trust-code only if you trust its source", path) from None
    except (OSError, RuntimeError, EOFError) as e:
        raise ModelError(f"cannot read {holds}: {str(e).splitlines()[0]}", path) from None


def tool_precision(network) -> str:
    """An imported model runs as its tool does, whatever ``[inference] precision`` says: fp16
    autocast on a GPU, fp32 on the CPU (so its labels match the tool's own predictor)."""
    return "fp16" if network.device.type == "cuda" else "fp32"


def runner_for_imported(card: ModelCard, model_dir: Path):
    assert card.imported is not None
    folder = card.imported.folder_path(model_dir)
    if card.imported.format == "nnunet":
        from .nnunet import NnunetRunner, read_settings

        return NnunetRunner(card, read_settings(folder, card))
    from .monai_bundle import BundleRunner

    return BundleRunner(card, folder)


def install(card: ModelCard, used: dict[str, Path], target: Path, copy: bool = False) -> Path:
    """Write the card (and with ``copy`` the files it uses, under ``files/``) as the model folder
    ``target``, all at once: the folder appears complete or not at all."""
    import dataclasses
    import shutil
    import tempfile

    import tomli_w

    from ..configio import to_dict
    from ..errors import ModelError
    from ..model import CARD_NAME

    if target.exists():
        raise ModelError("a model folder of that name exists already; remove it or choose another --name", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        assert card.imported is not None
        if copy:
            for rel, path in used.items():
                (staging / "files" / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, staging / "files" / rel)
            card = dataclasses.replace(card, imported=dataclasses.replace(card.imported, folder="files"))
        written = to_dict(card)
        written.pop("normalization", None)  # tumorseg's own normalisation: the imported model's is its tool's
        (staging / CARD_NAME).write_bytes(tomli_w.dumps(written).encode())
        verify_files(card, staging)  # what was written (or pointed at) is what was checked
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
