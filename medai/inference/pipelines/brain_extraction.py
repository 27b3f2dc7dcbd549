"""Brain extraction from a T1-weighted MRI (deepbet's two-stage 3-D U-Net, ported to ONNX).

The reference (deepbet 1.0.2, ``BrainExtraction.run``) reproduced step by step in
numpy/SimpleITK, with every parameter taken from the card:

1. ``reorient``: closest-canonical RAS axes (permute/flip only, no resampling);
2. ``nan_to_num``;
3. ``resize`` (stage ``bbox``) to 128³ with the ``nearest-exact`` rule;
4. ``quantiles`` 0.5 % / 99.5 % of that small volume (used by both stages);
5. ``normalize`` (stage ``bbox``): clip to the quantiles → [0, 1], z-score, ``0.226 z + 0.449``;
   graph ``bbox`` gives a brain logit; threshold, largest component;
6. ``crop_to_bbox``: the component's bounding box on the full grid, +10 % margin per side;
7. ``resize`` (stage ``main``) of the crop to 256³, ``normalize`` (stage ``main``) with the
   same quantiles; graph ``main`` gives the fine logit (both graphs take their input in
   ``space_to_depth`` layout where the card says so: the first convolution rewritten for the
   CPU's matrix units, the same arithmetic; see ``models/brain-extraction/build.py``);
8. post-processing: logit resized back into the box (nearest-exact), threshold
   (``p > t`` as ``logit > log(t / (1 - t))``, the softmax having been folded into the
   graph), largest component and hole filling inside the box, then the inverse
   reorientation onto the source grid.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from medai.dicom.volume import Volume
from medai.errors import DicomInputError
from medai.inference.bundle import Bundle
from medai.inference.pipeline import Finding, Measurement, PipelineContext, PipelineOutput, segments_from_card
from medai.inference.steps import (bbox_with_margin, fill_holes, largest_component, reorientation,
                                   resize_nearest, resize_normalize)


def _logit_threshold(p: float) -> float:
    if not 0.0 < p < 1.0:
        raise ValueError(f"probability threshold must be in (0, 1), got {p}")
    return math.log(p / (1.0 - p))


def _graph_input(steps: Any, x: np.ndarray, stage: str) -> np.ndarray:
    """The graph's input for the normalised image ``x``: in space-to-depth layout where the
    card declares that step for ``stage`` (graphs built since issue 17, see
    ``steps.space_to_depth``), else ``x`` itself; with the batch (and channel) axes."""
    if steps.declares("space_to_depth", stage):
        return steps.run("space_to_depth", x, stage=stage)[None]
    return x[None, None]


class BrainExtraction:
    accepts_prompt = False

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.post: dict[str, Any] = dict(bundle.card.postprocessing)

    def run(self, volume: Volume, ctx: PipelineContext) -> PipelineOutput:
        steps = ctx.steps
        if min(volume.shape) < 16:
            raise DicomInputError(None, f"series {volume.series_instance_uid or '(file)'}: {volume.shape} is "
                                        "too small for 3-D brain extraction (need >= 16 voxels per axis)")
        t0 = time.perf_counter()
        to = steps.params("reorient")["to"]
        orient = reorientation(volume.geometry.direction, to)
        steps.record("reorient", to=to, perm=list(orient.perm), flip=list(orient.flip))
        x = orient.apply(volume.array, dtype=np.float32)
        x = steps.run("nan_to_num", x)

        small = steps.run("resize", x, stage="bbox")
        low, high = steps.run("quantiles", small)
        xin = _graph_input(steps, steps.run("normalize", small, stage="bbox", low=low, high=high), "bbox")
        ctx.timings["preprocess"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        bbox_logit = ctx.session("bbox").run(xin)[0, 0]
        ctx.timings["infer_bbox"] = time.perf_counter() - t0
        thr = _logit_threshold(float(self.post.get("bbox_threshold", 0.5)))
        small_mask = bbox_logit > thr
        del small, xin, bbox_logit
        if not small_mask.any():
            raise DicomInputError(None, f"series {volume.series_instance_uid or '(file)'}: no brain found "
                                        "(is this a T1-weighted head MRI?)")
        small_mask = largest_component(small_mask)
        crop = steps.params("crop_to_bbox")
        box = bbox_with_margin(small_mask, x.shape, float(crop["margin"]), float(crop["threshold"]))
        steps.record("crop_to_bbox", **crop, box=[[s.start, s.stop] for s in box])

        t0 = time.perf_counter()
        # resize then normalize (the card's two steps), computed on the crop's own voxels
        # before they are copied out to 256³ (steps.resize_normalize), and recorded as both.
        # With the card's space_to_depth step, the crop goes straight into that layout as well.
        resize, norm = steps.params("resize", "main"), steps.params("normalize", "main")
        s2d = steps.params("space_to_depth", "main") if steps.declares("space_to_depth", "main") else None
        xin = resize_normalize(x[box], tuple(resize["shape"]), low, high, float(norm.get("scale", 1.0)),
                               float(norm.get("shift", 0.0)),
                               space_to_depth=None if s2d is None else (int(s2d["factor"]), int(s2d["pad"])))
        steps.record("resize", stage="main", **resize)
        steps.record("normalize", stage="main", **norm, low=low, high=high)
        if s2d is not None:
            steps.record("space_to_depth", stage="main", **s2d)
        xin = xin[None] if s2d is not None else xin[None, None]
        # The full-grid float copy is not needed again (only its shape): free it before the
        # largest graph runs, which is when this process peaks.
        canonical_shape = x.shape
        del x
        ctx.timings["preprocess"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        logit = ctx.session("main").run(xin)[0, 0]
        del xin
        ctx.timings["infer_main"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        threshold = float(self.post.get("threshold", 0.5))
        box_shape = tuple(s.stop - s.start for s in box)
        # Threshold, then resize: nearest-neighbour only picks values, so the order does not
        # change the mask, and the resize moves 1-byte instead of 4-byte voxels.
        inner = resize_nearest(logit > _logit_threshold(threshold), box_shape)
        del logit
        steps.record("resize_back", shape=list(box_shape), mode="nearest-exact")
        steps.record("threshold", probability=threshold)
        if self.post.get("largest_component", True) and inner.any():
            inner = largest_component(inner)
            steps.record("largest_component", connectivity=26, region="box")
        if self.post.get("fill_holes", True):
            inner = fill_holes(inner)
            steps.record("fill_holes", region="box")
        mask = np.zeros(canonical_shape, dtype=np.uint8)
        mask[box] = inner
        labels = orient.invert(mask)
        steps.record("reorient_back", to="source grid")
        ctx.timings["postprocess"] = time.perf_counter() - t0

        brain_ml = float(labels.sum()) * volume.voxel_volume_ml
        # Edges in canonical RAS axes; the inferior edge is left out: the brainstem
        # continues into the spinal cord, so a mask reaching it is normal.
        edges = {"left": mask[0], "right": mask[-1], "posterior": mask[:, 0], "anterior": mask[:, -1],
                 "superior": mask[:, :, -1]}
        touches = [name for name, plane in edges.items() if plane.any()]
        qc = {"brain_volume_ml": round(brain_ml, 1), "box": [[s.start, s.stop] for s in box],
              "mask_touches_edges": touches, "intensity_quantiles": [low, high]}
        findings = []
        lo_ml, hi_ml = self.post.get("plausible_volume_ml", [800.0, 2100.0])
        if not lo_ml <= brain_ml <= hi_ml:
            findings.append(Finding(f"Extracted brain volume {brain_ml:.0f} mL is outside {lo_ml:.0f}-{hi_ml:.0f} mL: "
                                    "check that the series is a whole-head T1-weighted MRI.", "review",
                                    "brain_volume_ml"))
        if any(touches):
            findings.append(Finding(f"Brain mask reaches the {', '.join(touches)} edge of the field of view "
                                    "(head may be cut off).", "review"))
        return PipelineOutput(
            labels=labels, segments=segments_from_card(self.bundle.card),
            measurements=(Measurement("brain_volume_ml", round(brain_ml, 2), "mL", label=1,
                                      concept=("SCT", "12738006", "Brain"),
                                      note="volume of the brain mask (brain + CSF inside the skull boundary)"),),
            findings=tuple(findings), qc=qc,
        )


def validation_volume(bundle: Bundle) -> tuple[str, Volume]:
    """A real T1 series for precision tuning (:mod:`medai.inference.tune`): the shipped demo
    study, Colin27 (real MRI pixels, synthetic headers), so every install can tune offline."""
    from medai.data import demo_t1_dir
    from medai.dicom.volume import load_series

    return "Colin27 T1 (medai demo study, 181 slices)", load_series(demo_t1_dir())


def create(bundle: Bundle) -> BrainExtraction:
    return BrainExtraction(bundle)
