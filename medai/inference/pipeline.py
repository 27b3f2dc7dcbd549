"""The pipeline interface: what a model's pre-process → infer → post-process code implements.

How to write a pipeline
-----------------------
Put a module at ``medai/inference/pipelines/<name>.py`` and set ``pipeline = "<name>"``
on the card. The module defines ``create(bundle) -> Pipeline``; :mod:`medai.inference.run`
calls it once per run (keep heavy state in the session cache, not in the module)::

    from medai.inference.pipeline import Pipeline, PipelineContext, PipelineOutput, Segment

    class BrainThing:
        accepts_prompt = False

        def __init__(self, bundle): self.bundle = bundle

        def estimate_memory(self, shape, plan_ctx):      # optional, see planner.py
            ...

        def run(self, volume, ctx: PipelineContext) -> PipelineOutput:
            x = ctx.steps.apply(volume)                  # card [[preprocessing]] steps, recorded
            session = ctx.session("main")                # ONNX session for card graph "main"
            y = session.run(x[None, None])               # numpy in, numpy out
            # several inputs: session.run_feeds({"embedding": e, "box": b}, ["logits", "iou"])
            ctx.record("threshold", value=0.5)           # record anything else you do
            labels = ...                                 # uint8/uint16, volume.shape, source grid
            return PipelineOutput(labels=labels, segments=segments_from_card(self.bundle.card))

    def create(bundle): return BrainThing(bundle)

Rules
-----
* ``run`` receives the :class:`~medai.dicom.volume.Volume` as loaded (source grid,
  ``[k, j, i]``, LPS) and must return ``labels`` on exactly that grid
  (``labels.shape == volume.shape``); 0 is background, other values are the card's
  ``[[labels]]`` values. Resampling back is the pipeline's job (see
  :mod:`medai.inference.steps` for deterministic helpers).
* Everything that changes the data is recorded through ``ctx.record`` or
  ``ctx.steps.apply`` so ``result.json`` can explain and replay it.
* Inference only through ``ctx.session(graph_key)`` (provider choice, parity
  check, session reuse and threads are handled there) — never ``import torch``.
* ``ctx.prompt`` is ``None`` unless the card has ``accepts_prompt = true``; then it
  is a :class:`Prompt` built from ``medai run --plane/--slice/--box/--propagate``
  or from the UI.
* ``measurements`` (e.g. volumes of structures, in named units) go to ``result.json``
  and, when present, to a DICOM SR. Volumes per label in mL are computed by the
  runner for every segment; a pipeline does not need to repeat them.
* ``priority``: set it when the pipeline knows; otherwise the runner applies the
  card's ``[[priority.rules]]`` to ``measurements`` (and label volumes named
  ``volume_ml:<label name>``).
* Optional ``write_extras(out_dir, volume, output) -> list[Path]``: files beyond
  mask/SEG/SR (e.g. a one-page summary) written after them and listed in
  ``result.json`` under ``outputs.extra``.
* Raise :class:`medai.errors.DicomInputError` (or a subclass) when the volume is
  unusable for this model; the runner records it and moves on to the next series.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from medai.dicom.volume import Volume
    from medai.inference.backends import Session
    from medai.inference.bundle import Bundle
    from medai.inference.card import ModelCard
    from medai.inference.planner import Plan
    from medai.inference.steps import StepRunner

Plane = Literal["axial", "coronal", "sagittal"]


@dataclass(frozen=True)
class Prompt:
    """An interactive prompt for promptable models (e.g. LiteMedSAM).

    ``box`` is ``(x0, y0, x1, y1)`` in pixel columns/rows of the displayed slice
    ``slice_index`` of ``plane`` (axial: array ``[k]``; coronal: ``[:, j]``;
    sagittal: ``[:, :, i]``; display orientation as the UI shows it).
    ``propagate`` asks the pipeline to carry the segmentation to neighbouring slices.
    """

    plane: Plane = "axial"
    slice_index: int | None = None
    box: tuple[int, int, int, int] | None = None
    propagate: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Prompt":
        box = data.get("box")
        if isinstance(box, str):
            box = tuple(int(v) for v in box.split(","))
        if box is not None and (len(box) != 4 or box[0] >= box[2] or box[1] >= box[3]):
            raise ValueError(f"box must be X0,Y0,X1,Y1 with X0<X1 and Y0<Y1, got {box}")
        plane = data.get("plane", "axial")
        if plane not in ("axial", "coronal", "sagittal"):
            raise ValueError(f"plane must be axial, coronal or sagittal, got {plane!r}")
        known = {"plane", "slice", "slice_index", "box", "propagate"}
        return cls(plane=plane, slice_index=data.get("slice_index", data.get("slice")),
                   box=tuple(box) if box is not None else None,  # type: ignore[arg-type]
                   propagate=bool(data.get("propagate", False)),
                   extra={k: v for k, v in data.items() if k not in known})

    def as_dict(self) -> dict[str, Any]:
        return {"plane": self.plane, "slice": self.slice_index, "box": list(self.box) if self.box else None,
                "propagate": self.propagate, **dict(self.extra)}


@dataclass(frozen=True)
class Segment:
    """One segment of the output label map (what DICOM SEG describes)."""

    value: int
    name: str
    category: tuple[str, str, str]
    type: tuple[str, str, str]
    color: tuple[int, int, int] | None = None


def segments_from_card(card: "ModelCard") -> tuple[Segment, ...]:
    return tuple(Segment(lab.value, lab.name, lab.category, lab.type, lab.color) for lab in card.labels)


@dataclass(frozen=True)
class Measurement:
    """A named quantity, e.g. ``Measurement("hippocampus_left", 3.41, "mL", label=17)``."""

    name: str
    value: float
    unit: str
    label: int | None = None
    #: Optional coded concept (scheme, code, meaning) for SR.
    concept: tuple[str, str, str] | None = None
    note: str = ""


@dataclass(frozen=True)
class Finding:
    """A statement for the clinician (assistive, never a diagnosis)."""

    text: str
    severity: Literal["info", "review", "urgent"] = "info"
    measurement: str | None = None


@dataclass(frozen=True)
class Priority:
    """Worklist priority: ``level`` in routine < review < urgent; ``score`` for ranking (0-1)."""

    level: Literal["routine", "review", "urgent"]
    score: float = 0.0
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class PipelineOutput:
    """What a pipeline returns. ``labels`` is on the source grid of the input volume."""

    labels: np.ndarray
    segments: tuple[Segment, ...]
    measurements: tuple[Measurement, ...] = ()
    findings: tuple[Finding, ...] = ()
    #: Quality checks, e.g. {"mask_touches_border": False, "brain_fraction": 0.21}.
    qc: Mapping[str, Any] = field(default_factory=dict)
    priority: Priority | None = None

    def __post_init__(self) -> None:
        if self.labels.ndim != 3:
            raise ValueError(f"labels must be 3-D [k, j, i], got shape {self.labels.shape}")
        if self.labels.dtype not in (np.uint8, np.uint16):
            raise TypeError(f"labels must be uint8 or uint16, got {self.labels.dtype}")


@dataclass
class PipelineContext:
    """What the runner hands a pipeline for one series. Not a value: it records as it goes."""

    bundle: "Bundle"
    #: ``session(graph_key)`` → a ready :class:`~medai.inference.backends.Session`.
    session: Callable[[str], "Session"]
    plan: "Plan"
    steps: "StepRunner"
    prompt: Prompt | None = None
    #: ``session_for(bundle, graph_key)``: a session for another bundle this pipeline builds
    #: on (same device and threads as the run; its provider is reported with the result).
    session_for: Callable[["Bundle", str], "Session"] | None = None
    #: Applied steps in order, as dicts ({"op": ..., params...}); written to result.json.
    recorded: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def record(self, op: str, **params: Any) -> None:
        self.recorded.append({"op": op, **params})


@runtime_checkable
class Pipeline(Protocol):
    """Implemented by the object ``create(bundle)`` of a pipeline module returns."""

    accepts_prompt: bool

    def run(self, volume: "Volume", ctx: PipelineContext) -> PipelineOutput: ...


__all__ = ["Finding", "Measurement", "Pipeline", "PipelineContext", "PipelineOutput", "Plane", "Priority",
           "Prompt", "Segment", "segments_from_card"]
