"""DICOM Structured Report (TID 1500 Measurement Report) for a pipeline's measurements.

Built with highdicom as a Comprehensive 3D SR. Each measurement becomes one
measurement group:

* a measurement tied to a label (``Measurement.label``) present in the SEG is a
  *volumetric ROI* group (TID 1411) that references that segment of the SEG and,
  through it, the source series;
* any other measurement (intracranial volume, a fraction, a percentile) is an
  image-level group (TID 1501).

Each group names the algorithm (card name, version, card SHA-256). Volumes are coded
as SCT "Volume" in UCUM ``ml``; other quantities use the measurement's own concept.
The evidence lists the source instances and the SEG, the series description says
"not for diagnostic use", and the tests check the file with ``dciodvfy`` and read it
back with highdicom.

A result the pipeline refused (``qc.measurable`` false: image QC failed, or the result was
physiologically implausible) still gets an SR, so the PACS receives the statement: one
image-level group whose qualitative evaluation is "not measurable on this series", with the
reason as a comment, and no measurement at all.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medai import __version__
from medai.dicom.outputs.seg import NOT_FOR_DIAGNOSIS, _source_datasets

if TYPE_CHECKING:  # pragma: no cover
    from medai.dicom.volume import Volume
    from medai.inference.bundle import Bundle
    from medai.inference.pipeline import Measurement, PipelineOutput

log = logging.getLogger("medai.dicom")

SR_SERIES_NUMBER = 9902
#: UCUM codes of the units pipelines use.
_UCUM = {"mL": ("ml", "milliliter"), "ml": ("ml", "milliliter"), "1": ("1", "no units"),
         "%": ("%", "percent"), "mm": ("mm", "millimeter"), "mm2": ("mm2", "square millimeter"),
         "mm3": ("mm3", "cubic millimeter"), "cm3": ("cm3", "cubic centimeter")}


def _coded(triple: tuple[str, str, str]) -> Any:
    from highdicom.sr import CodedConcept

    scheme, value, meaning = triple
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _unit(unit: str) -> Any:
    from highdicom.sr import CodedConcept

    code, meaning = _UCUM.get(unit, (unit, unit))
    return CodedConcept(value=code, scheme_designator="UCUM", meaning=meaning)


def _measurement(m: "Measurement", algorithm: Any) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if m.unit.lower() in ("ml", "mm3", "cm3"):
        name = codes.SCT.Volume
    elif m.concept is not None:
        name = _coded(m.concept)
    else:
        name = _coded(("99MEDAI", m.name[:16].upper(), m.name[:64]))
    return hd.sr.Measurement(name=name, value=float(m.value), unit=_unit(m.unit), algorithm_id=algorithm)


#: Qualitative evaluation of a refused result: "Measurability" = "Not measurable on this
#: series" (private codes: no standard concept says this); the reason follows as a DCM
#: "Comment" text item.
MEASURABILITY = ("99MEDAI", "MEASURABLE", "Measurability")
NOT_MEASURABLE_CODE = ("99MEDAI", "NOTMEAS", "Not measurable on this series")
_COMMENT = ("DCM", "121106", "Comment")


def refused(output: "PipelineOutput") -> str | None:
    """The reason a pipeline refused to measure (``qc.measurable`` false), else None."""
    qc = output.qc or {}
    if qc.get("measurable") is False:
        return str(qc.get("not_measurable_reason") or "not measurable on this series")
    return None


def _not_measurable_group(reason: str, card_id: str, algorithm: Any) -> Any:
    """One TID 1501 group saying the series could not be measured, and why; no numbers."""
    import highdicom as hd
    from highdicom.sr import RelationshipTypeValues, TextContentItem

    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{card_id}:not-measurable"[:64]),
        algorithm_id=algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(_coded(MEASURABILITY), _coded(NOT_MEASURABLE_CODE))])
    group[0].ContentSequence.append(TextContentItem(name=_coded(_COMMENT), value=reason[:1024],
                                                    relationship_type=RelationshipTypeValues.CONTAINS))
    return group


def build_sr(volume: "Volume", output: "PipelineOutput", bundle: "Bundle", *, seg_path: str | Path | None = None) -> Any:
    """A highdicom ``Comprehensive3DSR`` with one measurement group per measurement, or,
    for a refused result (:func:`refused`), the one "not measurable" group."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from medai.dicom.outputs import standard

    standard.install()  # the module table read per module, not whole

    reason = refused(output)
    if not output.measurements and reason is None:
        raise ValueError("an SR needs at least one measurement or a refusal")
    if reason is not None and output.measurements:
        raise ValueError("a refused result carries no measurements")
    sources = _source_datasets(volume)
    card = bundle.card
    evidence = list(sources)
    seg_ds = None
    if seg_path is not None:
        seg_ds = pydicom.dcmread(seg_path, stop_before_pixels=True)
        evidence.append(seg_ds)
    algorithm = hd.sr.AlgorithmIdentification(
        name=card.name[:64], version=f"{card.version} card-sha256:{bundle.card_sha256[:16]}"[:64],
        parameters=[f"model_id={card.id}"])
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=f"medai {card.id}"[:64], manufacturer_name="medai",
            model_name=f"{card.id} {card.version}"[:64]))
    context = hd.sr.ObservationContext(observer_device_context=observer)
    # SEG segment numbers follow the order of the pipeline's segments (see seg.py).
    segment_numbers = {s.value: n for n, s in enumerate(output.segments, start=1)}
    seg_present = set()
    if seg_ds is not None:
        seg_present = {int(item.SegmentNumber) for item in seg_ds.SegmentSequence}
    groups: list[Any] = [] if reason is None else [_not_measurable_group(reason, card.id, algorithm)]
    for i, m in enumerate(output.measurements, start=1):
        tracking = hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{card.id}:{m.name}"[:64])
        measurement = _measurement(m, algorithm)
        number = segment_numbers.get(m.label) if m.label is not None else None
        finding = _coded(m.concept) if m.concept is not None else None
        if seg_ds is not None and number is not None and number in seg_present:
            referenced = hd.sr.ReferencedSegment(
                sop_class_uid=seg_ds.SOPClassUID, sop_instance_uid=seg_ds.SOPInstanceUID,
                segment_number=number,
                source_series=hd.sr.SourceSeriesForSegmentation(volume.series_instance_uid))
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking, referenced_segment=referenced, finding_type=finding,
                algorithm_id=algorithm, measurements=[measurement]))
        else:
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking, finding_type=finding, algorithm_id=algorithm,
                measurements=[measurement]))
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=_coded(("LN", "24590-2", "MR Brain")),
                                     imaging_measurements=groups, title=codes.DCM.ImagingMeasurementReport)
    kwargs: dict[str, Any] = {}
    if "software_versions" in inspect.signature(hd.sr.Comprehensive3DSR.__init__).parameters:
        kwargs["software_versions"] = f"medai {__version__}; {card.id} {card.version}"[:64]
    return hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report, series_instance_uid=hd.UID(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medai",
        series_description=f"{NOT_FOR_DIAGNOSIS}: {card.name}"[:64], is_complete=True, is_final=False,
        is_verified=False, **kwargs)


def write_sr(volume: "Volume", output: "PipelineOutput", bundle: "Bundle", path: str | Path, *,
             seg_path: str | Path | None = None) -> Path | None:
    """Build the SR and write it to ``path`` (temporary name, then renamed).

    Returns ``None`` without writing when there are no measurements and the result was
    not refused (a segmentation-only model); a refused result gets its "not measurable" SR.
    """
    path = Path(path)
    if not output.measurements and refused(output) is None:
        log.info("no measurements: no SR written")
        return None
    sr = build_sr(volume, output, bundle, seg_path=seg_path)
    tmp = path.with_name(f".{path.name}.tmp")
    sr.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)
    return path
