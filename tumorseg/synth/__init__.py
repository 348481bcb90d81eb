"""Deterministic synthetic brain-tumour MRI cases on real healthy anatomy.

A case starts from one of two healthy heads: the MNI ICBM152 2009a symmetric template (T1 and
grey/white-matter probability maps, 1 mm, the copy inside the nilearn wheel), or, from generator version
3 on, the Colin27 single-subject T1 with and without skull (Debian's mricron-data), whose tissue maps are
fitted to its own intensities and whose real scalp, skull and face are kept in scans with skull. It
pushes the tissue away from a tumour (mass effect), paints a three-compartment glioma (necrotic core,
enhancing rim, white-matter-following edema), renders four MR contrasts (FLAIR, T1w, T1gd, T2w),
then "acquires" them like a scanner would: a random head pose, a random voxel grid (spacing, axis
order and flips, small obliquity, field of view), slice-profile blur, a smooth bias field, Rician
noise and an arbitrary intensity scale. Some cases keep a scalp and skull, others are skull-stripped
(zero outside the brain, as in BraTS).

Normal structures that enhance on T1gd (the superior sagittal and transverse sinuses, the choroid
plexus) are painted as well and stay background: on real scans they are the commonest false
"enhancing tumour", and a model that never saw them cannot learn that (generator version 2).

Every random choice comes from one ``numpy.random.Generator`` seeded by the case seed, and every
operation is deterministic, so a seed always gives byte-identical arrays.

Two coordinate frames matter (both in mm, RAS+ as nibabel):

* MNI: the template's frame; ``template affine`` maps template voxels to it.
* world: the scanner's frame; ``world = head_pose @ mni`` (the head is placed and tilted in the scanner)
  and ``world = case.affine @ voxel``.

The label map is resampled (nearest neighbour) with exactly the same voxel mapping as the image
(trilinear), so both share ``case.affine``.

Modules, in the order a case is made: :mod:`.anatomy` (the healthy heads), :mod:`.tumour` (the
tumour and its mass effect), :mod:`.render` (the contrasts), :mod:`.acquire` (the scanner),
:mod:`.dataset` (a case from its seed, and the Decathlon writer).
"""
from .anatomy import ANATOMIES
from .dataset import GENERATOR_VERSION, GENERATOR_VERSIONS, STARTED_MARKER, SynthCase, synth_case, write_synth_dataset
from .render import CHANNELS
from .tumour import LABELS

__all__ = ["SynthCase", "synth_case", "write_synth_dataset", "CHANNELS", "LABELS", "ANATOMIES", "GENERATOR_VERSION",
           "GENERATOR_VERSIONS", "STARTED_MARKER"]
