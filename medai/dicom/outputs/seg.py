"""DICOM Segmentation (SEG) from a label map on the grid of its source series (highdicom).

The SEG references every source instance (one frame per non-empty source slice,
binary, one segment per label), names the algorithm (card name, version and
card SHA-256) in each segment's Algorithm Identification, and says "not for
diagnostic use" in the series description and content description, so no
viewer shows it without that warning. It is checked with ``dciodvfy`` in the
tests.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from medai import __version__
from medai.errors import DicomInputError

if TYPE_CHECKING:  # pragma: no cover
    from medai.dicom.volume import Volume
    from medai.inference.bundle import Bundle
    from medai.inference.pipeline import Segment

log = logging.getLogger("medai.dicom")

NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE"
#: Series number given to medai's derived series (DICOM needs one; high to sort last).
SEG_SERIES_NUMBER = 9901


def _code(triple: tuple[str, str, str]):  # type: ignore[no-untyped-def]
    from highdicom.sr import CodedConcept

    scheme, value, meaning = triple
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


#: The last series' source headers: SEG and SR of one run reference the same instances,
#: so they are read once (one entry only: a run's outputs are written together).
_last_sources: tuple[tuple, list] | None = None  # type: ignore[type-arg]


def _source_datasets(volume: "Volume") -> list:  # type: ignore[type-arg]
    """Headers (no pixels) of the volume's source instances, in slice order."""
    global _last_sources
    import pydicom

    from medai.dicom.volume import source_headers

    key = tuple((s.sop_instance_uid, str(s.path)) for s in volume.sources)
    if _last_sources is not None and _last_sources[0] == key:
        return list(_last_sources[1])
    loaded = source_headers(volume)  # the loader's own read: no second pass over the files
    if loaded is not None:
        return loaded
    if not volume.sources or any(s.path is None for s in volume.sources):
        raise DicomInputError(None, "a SEG needs the source DICOM instances; this volume has none")
    if any(s.frame is not None for s in volume.sources):
        raise DicomInputError(volume.sources[0].path, "multi-frame sources are not supported by the SEG writer yet")
    datasets = []
    for ref in volume.sources:
        try:
            ds = pydicom.dcmread(ref.path, stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise DicomInputError(ref.path, f"cannot re-read source instance for the SEG ({exc})") from None
        if ds.SOPInstanceUID != ref.sop_instance_uid:
            raise DicomInputError(ref.path, "source instance changed since the series was loaded")
        datasets.append(ds)
    _last_sources = (key, datasets)
    return list(datasets)


def build_seg(volume: "Volume", labels: np.ndarray, segments: Sequence["Segment"], bundle: "Bundle"):  # type: ignore[no-untyped-def]
    """A highdicom ``Segmentation`` for ``labels`` (``[k, j, i]`` on the volume's grid)."""
    import highdicom as hd
    from highdicom.color import CIELabColor
    from pydicom.sr.codedict import codes

    from medai.dicom.outputs import standard

    standard.install()  # the module table read per module, not whole

    if labels.shape != volume.shape:
        raise ValueError(f"labels {labels.shape} do not match the volume {volume.shape}")
    sources = _source_datasets(volume)
    card = bundle.card
    algorithm = hd.AlgorithmIdentificationSequence(
        name=card.name[:64], family=codes.cid7162.ArtificialIntelligence,
        version=f"{card.version} card-sha256:{bundle.card_sha256[:16]}"[:64],
        source="medai", parameters={"model_id": card.id, "card_sha256": bundle.card_sha256[:64]})
    descriptions = []
    present = []
    for number, seg in enumerate(segments, start=1):
        color = CIELabColor.from_rgb(*seg.color) if seg.color is not None and hasattr(CIELabColor, "from_rgb") else None
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=seg.name[:64],
            segmented_property_category=_code(seg.category), segmented_property_type=_code(seg.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            tracking_uid=hd.UID(), tracking_id=f"{card.id}:{seg.name}"[:64],
            **({"display_color": color} if color is not None else {})))
        present.append(seg.value)
    # [frames, rows, cols, segments] binary stack, one frame per source slice.
    stack = np.stack([labels == v for v in present], axis=-1).astype(np.uint8)
    series_description = f"{NOT_FOR_DIAGNOSIS}: {card.name}"[:64]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=stack, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medai",
        manufacturer_model_name=f"medai {card.id}"[:64], software_versions=f"medai {__version__}; {card.id} {card.version}"[:64],
        device_serial_number="0", content_description=f"Research/assistive output. {NOT_FOR_DIAGNOSIS}."[:64],
        content_creator_name="medai^automatic", content_label=card.id.upper().replace("-", "_")[:16],
        omit_empty_frames=True, series_description=series_description,
    )
    return seg


def write_seg(volume: "Volume", labels: np.ndarray, segments: Sequence["Segment"], bundle: "Bundle",
              path: str | Path) -> Path | None:
    """Build the SEG and write it to ``path`` (temporary name, then renamed).

    Returns ``None`` without writing when the label map is empty: a SEG must have
    at least one frame, and an empty result is stated in result.json instead.
    """
    import os

    path = Path(path)
    if not np.any(labels):
        log.info("empty label map: no SEG written")
        return None
    seg = build_seg(volume, labels, segments, bundle)
    tmp = path.with_name(f".{path.name}.tmp")
    seg.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)
    return path
