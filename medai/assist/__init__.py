"""Diagnostic assist: the numerical parts behind brain volumetry.

Small, pure modules (numpy and SimpleITK only, no ONNX, no DICOM I/O) so each can be
tested on its own and read in one sitting:

* :mod:`medai.assist.tissue` — CSF/GM/WM classification inside a brain mask;
* :mod:`medai.assist.qc` — image-quality checks that block or qualify a report;
* :mod:`medai.assist.normative` — published age/sex reference ranges, z-scores;
* :mod:`medai.assist.report` — the one-page summary a clinician reads.
"""
