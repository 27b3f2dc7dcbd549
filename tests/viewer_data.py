"""The head CT the browser viewport is tested and benchmarked on.

TotalSegmentator's head CT atlas (shipped in the body-organ-analysis wheel,
Apache-2.0; fetched by scripts/fetch-test-data): real CT values in HU, 1 mm,
202 x 202 x 179, written as an axial DICOM CT series with ``medai.dicom.synth``
(synthetic headers, marked as such; body part HEAD so the viewer opens it in the
brain window). An atlas is an average of real head CTs: smoother than one scan,
which does not matter for display speed and value mapping.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ATLAS = REPO / ".cache" / "testdata" / "ct-head-atlas" / "ct_brain_atlas_1mm.nii.gz"
DESCRIPTION = "CT HEAD atlas 1 mm (synthetic header)"


def head_ct_series(out: Path) -> Path:
    """Write the series into ``out`` (once; a folder already written is reused)."""
    import pydicom
    import SimpleITK as sitk

    from medai.dicom import synth

    if not ATLAS.exists():
        raise FileNotFoundError(f"{ATLAS} missing: run scripts/fetch-test-data")
    if out.is_dir() and len(list(out.glob("*.dcm"))) > 100:
        return out
    image = sitk.ReadImage(str(ATLAS))
    hu = sitk.GetArrayFromImage(image).astype(np.int32)
    # the NIfTI runs right-to-left and front-to-back (LPS direction diag(-1, -1, 1)):
    # flip to the usual DICOM axial layout so rows run anterior to posterior
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    if d[0, 0] < 0:
        hu = hu[:, :, ::-1]
    if d[1, 1] < 0:
        hu = hu[:, ::-1, :]
    stored = np.clip(hu + 1024, 0, 4095).astype(np.uint16)
    synth.write_series(out, n=stored.shape[0], rows=stored.shape[1], cols=stored.shape[2],
                       spacing=tuple(image.GetSpacing()), modality="CT", intercept=-1024.0,
                       pixels=np.ascontiguousarray(stored), name="head-ct-atlas", seed=3)
    for path in out.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.BodyPartExamined = "HEAD"
        ds.SeriesDescription = DESCRIPTION
        ds.SliceThickness = "1.0"
        ds.save_as(path)
    return out
