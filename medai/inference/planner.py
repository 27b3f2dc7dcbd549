"""Resource planner: predict a run's peak memory before it starts, and fit it to a budget.

The prediction is built from numbers, not guesses at run time:

* the source volume and the pipeline's working copies: ``voxels x 4 bytes x
  working_copies`` (card ``[input] working_copies``, default 4: float32 source,
  reoriented copy, label map, probability map);
* each ONNX graph: ``prod(input shape) x activation_bytes_per_voxel``; the factor is
  measured by the bundle's build script (peak RSS of a session run minus the
  baseline, over input voxels) and written on the card;
* the model files themselves, and a fixed runtime baseline (interpreter, numpy,
  SimpleITK, onnxruntime) also measured at build time (card ``[input] baseline_mb``);
* where this machine has been tuned (``medai doctor --tune``), a graph's term is instead
  the peak its chosen session (provider and precision) measured here: OpenVINO and
  ONNX Runtime, fp32 and bf16 keep very different buffers, and a card's one factor
  cannot describe them all;
* when planning inside the process that will run, the resident memory at that moment (a
  measurement of interpreter, libraries and the loaded volume) replaces the card's baseline
  and one working copy;
* what the pipeline keeps beside its graphs (its module's ``memory_extras``; LiteMedSAM:
  the slice-embedding cache and the display-sized copies propagation works on).

Graphs run one after another, so the peak is the largest graph, not the sum, except for
graphs whose card keeps the memory arena (``memory_arena = true``): their sessions hold
their working memory between runs, so those terms add up.
When ``--max-memory`` is given and the plan does not fit, the planner tries the
bundle's lighter variants in card order (``[[variants]]`` with ``graph``, ``file``,
``precision``, ``activation_bytes_per_voxel``), then tiled inference when the card
allows it (``[input] tile = [..]``), and otherwise raises :class:`ResourceError`
saying how much is needed. Measured peak RSS (Linux ``VmHWM`` after resetting it
through ``/proc/self/clear_refs``; ``getrusage`` elsewhere) is recorded beside the
prediction in ``result.json``.
"""

from __future__ import annotations

import math
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from medai.errors import ResourceError

if TYPE_CHECKING:  # pragma: no cover
    from medai.inference.bundle import Bundle

MB = 1024 * 1024


@dataclass(frozen=True)
class Plan:
    predicted_bytes: int
    budget_bytes: int | None
    #: Graph key → file chosen (the card's default file or a variant's).
    graph_files: Mapping[str, str] = field(default_factory=dict)
    precision: str = "fp32"
    #: Sliding-window tile (z, y, x) when tiling was needed; None = whole input.
    tile: tuple[int, int, int] | None = None
    breakdown: Mapping[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"predicted_peak_mb": round(self.predicted_bytes / MB, 1),
                "budget_mb": None if self.budget_bytes is None else round(self.budget_bytes / MB, 1),
                "precision": self.precision, "tile": list(self.tile) if self.tile else None,
                "graph_files": dict(self.graph_files),
                "breakdown_mb": {k: round(v / MB, 1) for k, v in self.breakdown.items()}}


def _graph_bytes(shape: tuple[int, ...], factor: float) -> int:
    return int(math.prod(shape) * factor)


def plan(bundle: "Bundle", volume_shape: tuple[int, int, int], budget_bytes: int | None = None, *,
         device: str | None = None, in_this_process: bool = True) -> Plan:
    """Predict peak memory for ``volume_shape`` and pick graph files/tiling to fit ``budget_bytes``.

    ``device``: the run's device (``cpu`` makes a tuned machine's prediction use the ONNX
    Runtime CPU row of its table instead of the chosen provider's). ``in_this_process``:
    the run will happen in the calling process, so what it holds now counts; False when
    planning for another process (triage's coordinator sizing its pool), whose baseline is
    the card's."""
    card = bundle.card
    spec_in = card.raw.get("input", {})
    baseline = int(float(spec_in.get("baseline_mb", 160)) * MB)
    copies = float(spec_in.get("working_copies", 4))
    voxels = math.prod(volume_shape)
    data = int(voxels * 4 * copies)
    files = {k: g.file for k, g in card.graphs.items()}
    factors = {k: g.activation_bytes_per_voxel for k, g in card.graphs.items()}
    shapes = {k: g.shape for k, g in card.graphs.items()}
    arenas = {k: g.memory_arena for k, g in card.graphs.items()}

    extras = _pipeline_extras(bundle, volume_shape)

    def build(precision: str, tile: tuple[int, int, int] | None) -> Plan:
        graph_peaks = {}
        for key in files:
            shape = shapes[key] if tile is None else shapes[key][:2] + tile
            measured = _tuned_peak(bundle, files[key], device) if tile is None else None
            if measured is not None:  # what this graph's tuned session took on this machine,
                # plus its float32 input, which the tuner fed from memory it already held
                graph_peaks[key] = measured + math.prod(shape) * 4
                continue
            model_bytes = (bundle.path / files[key]).stat().st_size if (bundle.path / files[key]).exists() else 0
            graph_peaks[key] = _graph_bytes(shape, factors[key]) + model_bytes
        # A graph whose card keeps its memory arena (LiteMedSAM's two per-slice graphs) holds its
        # working memory for the session's lifetime: those add up; the others come and go.
        held = sum(v for k, v in graph_peaks.items() if arenas[k])
        peak_graph = held + max((v for k, v in graph_peaks.items() if not arenas[k]), default=0)
        base, copies_bytes = baseline, data
        resident = resident_bytes() if in_this_process else 0
        if resident > baseline + voxels * 4:
            # Planning inside the process that will run: what is resident now (interpreter,
            # libraries, the loaded volume) is a measurement; the card's baseline is a floor.
            base, copies_bytes = resident, int(voxels * 4 * max(copies - 1.0, 0.0))
        breakdown = {"runtime_baseline": base, "volume_working_copies": copies_bytes, "largest_graph": peak_graph,
                     **extras}
        return Plan(base + copies_bytes + peak_graph + sum(extras.values()), budget_bytes, dict(files), precision,
                    tile, breakdown)

    first = build("fp32", None)
    if budget_bytes is None or first.predicted_bytes <= budget_bytes:
        return first
    for variant in card.raw.get("variants", []):
        if "file" not in variant or variant.get("graph") not in files or variant["file"] not in card.files:
            continue
        files[variant["graph"]] = variant["file"]
        factors[variant["graph"]] = float(variant.get("activation_bytes_per_voxel", factors[variant["graph"]]))
        candidate = build(variant.get("precision", "fp32"), None)
        if candidate.predicted_bytes <= budget_bytes:
            return candidate
    tile = spec_in.get("tile")
    if tile:
        candidate = build(first.precision, tuple(int(t) for t in tile))  # type: ignore[arg-type]
        if candidate.predicted_bytes <= budget_bytes:
            return candidate
    raise ResourceError(f"model {bundle.id} needs about {first.predicted_bytes / MB:.0f} MB for a "
                        f"{'x'.join(map(str, volume_shape))} series; the budget is {budget_bytes / MB:.0f} MB "
                        "and no lighter variant or tiling fits. Raise --max-memory.")


def _tuned_peak(bundle: "Bundle", file: str, device: str | None = None) -> int | None:
    from medai import config
    from medai.inference import tune

    digest = bundle.card.files.get(file)
    cpu = str(config.get("device", device) or "auto").lower() == "cpu"
    return tune.measured_peak_bytes(digest, cpu_only=cpu) if digest else None


def resident_bytes() -> int:
    """This process's resident memory now (0 where /proc is not there)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _pipeline_extras(bundle: "Bundle", volume_shape: tuple[int, int, int]) -> dict[str, int]:
    """Memory a pipeline holds beside its graphs (e.g. LiteMedSAM's embedding cache): its
    module's optional ``memory_extras(bundle, volume_shape) -> {name: bytes}``."""
    import importlib

    try:
        module = importlib.import_module(f"medai.inference.pipelines.{bundle.card.pipeline}")
    except ModuleNotFoundError:
        return {}
    extras = getattr(module, "memory_extras", None)
    return {k: int(v) for k, v in extras(bundle, volume_shape).items()} if callable(extras) else {}


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark for this process (Linux); False when unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since start (or since :func:`reset_peak_rss`)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
