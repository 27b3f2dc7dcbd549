"""Result objects written as DICOM: SEG (segmentations) and SR (measurements)."""
