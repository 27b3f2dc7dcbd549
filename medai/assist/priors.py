"""Spatial tissue priors: the MNI152 2009a tissue probability maps, registered to a subject.

Why: an intensity-only mixture decides each voxel by its brightness and its neighbours.
When noise widens the tissue peaks, dark sulcal and ventricular CSF that overlaps grey
matter in intensity is called grey matter. SPM, FSL FAST (``-P``) and ANTs Atropos add a
spatial prior: the population probability of each tissue at that place in the head, after
registering a template to the subject. The posterior is then proportional to prior times
likelihood (times the Markov random field), so a voxel in the ventricles needs more
evidence to be called grey matter than a voxel in the cortex.

The atlas is the MNI152 ICBM 2009a symmetric template with its grey- and white-matter
probability maps (as nilearn ships them, BSD-3; template Copyright (C) 1993-2009 Louis
Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute), resampled to
2 mm and stored as uint8 in the ``brain-volumetry`` bundle (``priors/``). CSF's prior is
the template brain mask minus grey and white matter. Registration is affine (SimpleITK,
Mattes mutual information between the template's brain and the subject's brain inside
its brain mask): priors are smooth at 2 mm, and an affine fit keeps the step cheap and
predictable; the prior is floored (:attr:`PriorParams.floor`) so a misregistered prior
never forbids a tissue.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medai.assist import reject_unknown

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

log = logging.getLogger("medai.assist")

#: Files of the atlas inside a bundle folder (uint8 NIfTI, 2 mm, MNI152 2009a sym).
ATLAS_FILES = {"t1": "priors/mni152_2009a_t1_2mm.nii.gz", "gm": "priors/mni152_2009a_gm_2mm.nii.gz",
               "wm": "priors/mni152_2009a_wm_2mm.nii.gz"}


@dataclass(frozen=True)
class PriorParams:
    """How the priors enter the classification and how the atlas is registered."""

    #: Each prior is mixed with a uniform one: (1 - floor) * atlas + floor / 3, so no tissue
    #: is ever impossible where the atlas (or its registration) is wrong.
    floor: float = 0.1
    #: Exponent on the prior in the posterior (1 = Bayes; smaller trusts the image more).
    weight: float = 1.0
    #: Registration: grid shrink factors and Gaussian smoothing (mm) per level, iterations.
    shrink: tuple[int, ...] = (4, 2)
    smoothing_mm: tuple[float, ...] = (2.0, 1.0)
    iterations: int = 100
    sampling: float = 0.2
    seed: int = 16

    @classmethod
    def from_mapping(cls, data: dict[str, Any] | None) -> "PriorParams":
        if not data:
            return cls()
        reject_unknown(cls, data, "tissue prior parameters")
        values = dict(data)
        for key, kind in (("shrink", int), ("smoothing_mm", float)):
            if key in values:
                values[key] = tuple(kind(v) for v in values[key])
        params = cls(**values)
        if not 0.0 < params.floor <= 1.0:
            raise ValueError(f"tissue prior floor must be in (0, 1], got {params.floor}")
        if len(params.shrink) != len(params.smoothing_mm):
            raise ValueError("tissue prior shrink and smoothing_mm need one value per level")
        return params

    def as_dict(self) -> dict[str, Any]:
        return {"floor": self.floor, "weight": self.weight, "shrink": list(self.shrink),
                "smoothing_mm": list(self.smoothing_mm), "iterations": self.iterations,
                "sampling": self.sampling, "seed": self.seed}


@dataclass(frozen=True, eq=False)
class TissueAtlas:
    """Template T1 (brain only, 0 outside) and GM/WM probability maps (0-1), same grid."""

    t1: "sitk.Image"
    gm: "sitk.Image"
    wm: "sitk.Image"


def load_atlas(folder: str | Path) -> TissueAtlas:
    """The atlas files of a bundle folder (:data:`ATLAS_FILES`)."""
    import SimpleITK as sitk

    folder = Path(folder)
    images = {}
    for key, rel in ATLAS_FILES.items():
        path = folder / rel
        if not path.is_file():
            raise FileNotFoundError(f"tissue prior atlas file missing: {path}")
        img = sitk.ReadImage(str(path), sitk.sitkFloat32)
        images[key] = img if key == "t1" else img / 255.0
    return TissueAtlas(images["t1"], images["gm"], images["wm"])


def build_atlas(t1: "sitk.Image", gm: "sitk.Image", wm: "sitk.Image", mm: float = 2.0) -> dict[str, "sitk.Image"]:
    """The shipped uint8 atlas from nilearn's 1 mm MNI152 2009a files: each map block-averaged
    to ``mm`` (Gaussian of the voxel size, then linear sampling), the T1 rescaled to 0-255."""
    import SimpleITK as sitk

    out = {}
    size = [max(1, int(round(n * s / mm))) for n, s in zip(t1.GetSize(), t1.GetSpacing())]
    origin = t1.TransformContinuousIndexToPhysicalPoint([(mm / s - 1) / 2 for s in t1.GetSpacing()])
    for key, img in (("t1", t1), ("gm", gm), ("wm", wm)):
        f = sitk.Cast(img, sitk.sitkFloat32)
        sigma = [max(mm * mm - s * s, 0.0) ** 0.5 / 2.3548 for s in img.GetSpacing()]
        f = sitk.SmoothingRecursiveGaussian(f, sigma)
        f = sitk.Resample(f, size, sitk.Transform(), sitk.sitkLinear, origin, [mm] * 3, img.GetDirection(), 0.0,
                          sitk.sitkFloat32)
        a = sitk.GetArrayFromImage(f)
        top = float(np.percentile(a[a > 0], 99.9)) if key == "t1" else 255.0
        u8 = sitk.GetImageFromArray(np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8))
        u8.CopyInformation(f)
        out[key] = u8
    return out


def register(subject: "sitk.Image", subject_mask: "sitk.Image", atlas: TissueAtlas,
             params: PriorParams) -> "sitk.Transform":
    """Affine transform mapping subject physical points to atlas points (SimpleITK's
    fixed-to-moving convention): the subject's brain is fixed, the template's brain moves."""
    import SimpleITK as sitk

    fixed = sitk.Cast(subject, sitk.sitkFloat32) * sitk.Cast(subject_mask > 0, sitk.sitkFloat32)
    moving = atlas.t1
    moving_mask = sitk.Cast(moving > 0, sitk.sitkUInt8)
    init = sitk.CenteredTransformInitializer(sitk.Cast(subject_mask > 0, sitk.sitkFloat32),
                                             sitk.Cast(moving_mask, sitk.sitkFloat32), sitk.AffineTransform(3),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(float(params.sampling), int(params.seed))
    reg.SetMetricFixedMask(sitk.Cast(subject_mask > 0, sitk.sitkUInt8))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3,
                                                 numberOfIterations=int(params.iterations),
                                                 relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([int(s) for s in params.shrink])
    reg.SetSmoothingSigmasPerLevel([float(s) for s in params.smoothing_mm])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(init, inPlace=False)
    transform = reg.Execute(fixed, moving)
    log.debug("prior registration: metric %.4f after %d iterations", reg.GetMetricValue(),
              reg.GetOptimizerIteration())
    return transform


def tissue_priors(subject: "sitk.Image", mask: np.ndarray, box: tuple[slice, slice, slice], atlas: TissueAtlas,
                  params: PriorParams) -> tuple[np.ndarray, dict[str, Any]]:
    """Prior probabilities of CSF, GM, WM ([3, k, j, i] over ``box`` of the subject grid,
    floored and summing to 1), and what was done (for the run record).

    ``subject`` is the T1 with its geometry, ``mask`` its brain mask ([k, j, i]).
    """
    import SimpleITK as sitk

    m = sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8))
    m.CopyInformation(subject)
    transform = register(subject, m, atlas, params)
    (k0, k1), (j0, j1), (i0, i1) = ((s.start, s.stop) for s in box)
    ref = subject[i0:i1, j0:j1, k0:k1]  # SimpleITK slices (i, j, k) and keeps the geometry
    on_subject = {key: sitk.GetArrayFromImage(sitk.Resample(img, ref, transform, sitk.sitkLinear, 0.0,
                                                            sitk.sitkFloat32))
                  for key, img in (("gm", atlas.gm), ("wm", atlas.wm),
                                   ("brain", sitk.Cast(atlas.t1 > 0, sitk.sitkFloat32)))}
    gm = np.clip(on_subject["gm"], 0, 1)
    wm = np.clip(on_subject["wm"], 0, 1)
    # CSF: the template's intracranial space not taken by GM or WM; beyond the template's
    # brain (a larger head, or misregistration) the only tissue the mask can hold there is
    # CSF-like (meninges, sulci at the surface), so the remainder goes to CSF as well.
    csf = np.clip(1.0 - gm - wm, 0, 1)
    priors = np.stack([csf, gm, wm]).astype(np.float32)
    priors /= np.maximum(priors.sum(axis=0, keepdims=True), 1e-6)
    priors = (1.0 - params.floor) * priors + params.floor / 3.0
    inside = mask[box] > 0
    overlap = float((on_subject["brain"][inside] > 0.5).mean()) if inside.any() else 0.0
    record = {"atlas": "MNI152 ICBM 2009a sym (nilearn), 2 mm", "transform": "affine",
              "parameters": [round(float(v), 5) for v in transform.GetParameters()] if hasattr(transform, "GetParameters") else None,
              "mask_inside_template_brain": round(overlap, 4)}
    return priors, record


__all__ = ["ATLAS_FILES", "PriorParams", "TissueAtlas", "build_atlas", "load_atlas", "register", "tissue_priors"]
