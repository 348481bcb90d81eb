"""``tumorseg models``: list the installed models; ``tumorseg models import``: bring in a model
trained by nnU-Net v2 or packaged as a MONAI bundle (:mod:`tumorseg.imported`)."""
from __future__ import annotations

from pathlib import Path

import click

from .errors import ConfigError, TumorsegError
from .labels import SCHEME_NAMES
from .sequences import SEQUENCES


@click.group(invoke_without_command=True)
@click.pass_context
def models(ctx: click.Context) -> None:
    """List the installed models (bundled and the user's) and the sequences each takes."""
    if ctx.invoked_subcommand is None:
        _list_models()


def _list_models() -> None:
    from .model import list_model_dirs, load_card, user_models_dir

    dirs = list_model_dirs()
    if not dirs:
        click.echo(f"no models installed (user models go in {user_models_dir()})")
        return
    for model_dir in dirs:
        try:
            card = load_card(model_dir)
        except TumorsegError as e:
            click.echo(f"{model_dir.name}: unusable model card ({e})")
            continue
        spec = card.input
        required = ", ".join(spec.required) or "none"
        origin = (f"imported {card.imported.format}" + (", trusted to run code" if card.imported.trust_code else "")
                  if card.imported else "tumorseg")
        click.echo(
            f"{model_dir.name}  {card.name} {card.version}  labels: {card.labels}  ({origin}; {model_dir})\n"
            f"  sequences (channel order): {', '.join(spec.sequences)}\n"
            f"  required: {required}; at least {spec.min_sequences} of them\n"
            + "".join(f"  given all of {', '.join(s)}, uses those alone (preferred_sets)\n" for s in spec.preferred_sets) +
            f"  spacing {spec.spacing_mm} mm, patch {spec.patch_size}, sha256 {card.fingerprint[:16]}..."
        )


def _pairs(text: str | None, what: str, check) -> dict[int, str] | None:
    """``0=flair,1=t1`` -> {0: "flair", 1: "t1"}."""
    if not text:
        return None
    out: dict[int, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isdigit() or not value.strip():
            raise click.BadParameter(f"expected N=NAME pairs separated by commas, got {item!r}", param_hint=what)
        out[int(key)] = check(value.strip())
    return out


def _sequence(name: str) -> str:
    if name not in SEQUENCES:
        raise click.BadParameter(f"{name!r} is not one of {', '.join(SEQUENCES)}", param_hint="--channels")
    return name


def _target(name: str, output: Path | None) -> Path:
    from .model import user_models_dir

    if "/" in name or name in ("", ".", ".."):
        raise ConfigError(f"--name must be a plain name, got {name!r}")
    return output if output is not None else user_models_dir() / name


_common = [
    click.option("--name", required=True, help="The model's name: `--model NAME` finds it in the user models folder."),
    click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False), default=None,
                 help="Model folder to write  [default: the user models folder/NAME; see docs/models.md]"),
    click.option("--label-scheme", type=click.Choice(SCHEME_NAMES), default="msd", show_default=True,
                 help="Label scheme the outputs are written in."),
    click.option("--copy", is_flag=True, help="Copy the model's files into the model folder instead of pointing at them."),
    click.option("--trust-code", is_flag=True,
                 help="Allow files whose loading can run code (pickles outside the allow-list, TorchScript); "
                      "recorded in the card. Only for models from a source you trust."),
]


def _with_common(command):
    for option in reversed(_common):
        command = option(command)
    return command


@models.group("import")
def import_group() -> None:
    """Import a model trained by another tool; it then runs everywhere a bundled one does."""


@import_group.command("nnunet")
@click.argument("results_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@_with_common
@click.option("--folds", default=None, help="Folds to ensemble, e.g. 0,1,2 or all  [default: every fold_* with the checkpoint]")
@click.option("--checkpoint", type=click.Choice(["final", "best"]), default="final", show_default=True)
@click.option("--channels", default=None, help="Sequence of each input channel, e.g. 0=t1,1=t1gd,2=t2,3=flair  [default: from dataset.json's channel names]")
@click.option("--labels", default=None, help="Label (of --label-scheme) of each output value, e.g. 1=edema,2=non_enhancing_tumour,3=enhancing_tumour  [default: from dataset.json]")
def import_nnunet_command(results_dir: Path, name: str, output: Path | None, label_scheme: str, copy: bool,
                          trust_code: bool, folds: str | None, checkpoint: str, channels: str | None,
                          labels: str | None) -> None:
    """An nnU-Net v2 trained-model folder (dataset.json, plans.json, fold_*/checkpoint_*.pth)."""
    from .imported import install
    from .imported.nnunet import import_nnunet

    fold_list = tuple(f.strip() for f in folds.split(",")) if folds else None
    card, used = import_nnunet(results_dir, name, fold_list, checkpoint, _pairs(channels, "--channels", _sequence),
                               _pairs(labels, "--labels", str), label_scheme, trust_code)
    target = install(card, used, _target(name, output), copy)
    _report(target, card)


@import_group.command("monai-bundle")
@click.argument("bundle_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@_with_common
@click.option("--channels", default=None, help="Sequence of each input channel  [default: from the bundle's metadata, "
              "or brats_mri_segmentation's T1c, T1, T2, FLAIR]")
def import_bundle_command(bundle_dir: Path, name: str, output: Path | None, label_scheme: str, copy: bool,
                          trust_code: bool, channels: str | None) -> None:
    """A MONAI bundle (configs/, models/model.pt or model.ts), e.g. brats_mri_segmentation."""
    from .imported import install
    from .imported.monai_bundle import import_bundle

    card, used = import_bundle(bundle_dir, name, _pairs(channels, "--channels", _sequence), label_scheme, trust_code)
    target = install(card, used, _target(name, output), copy)
    _report(target, card)


def _report(target: Path, card) -> None:
    assert card.imported is not None
    click.echo(f"imported {card.name} into {target}: {', '.join(card.input.sequences)} -> {card.labels} labels, "
               f"{len(card.imported.files)} files checksummed" + (", trusted to run code" if card.imported.trust_code else ""))
    from .model import find_model_dir

    try:
        by_name = find_model_dir(target.name).resolve() == target.resolve()
    except TumorsegError:
        by_name = False
    click.echo(f"run it with: tumorseg predict SCAN --model {target.name if by_name else target}")
