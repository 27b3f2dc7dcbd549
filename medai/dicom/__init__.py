"""DICOM in and out: header index, volumes, study store, outputs (SEG/SR), de-identification."""
