"""Data shipped with medai: the demo study (``demo-t1/``), a real T1-weighted brain MRI
wrapped as a DICOM series with synthetic headers (licence and attribution in ``demo-t1.LICENSE`` beside the
folder, so the series folder holds only DICOM files)."""

from __future__ import annotations

from pathlib import Path


def demo_t1_dir() -> Path:
    """Folder of the bundled demo T1 series (DICOM, JPEG-LS lossless)."""
    return Path(__file__).resolve().parent / "demo-t1"
