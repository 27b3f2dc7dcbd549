"""The model card: what a bundle is, what it accepts, how to run it, how well it did.

A card is ``card.toml`` at the root of a bundle folder. It is the one document the
signature covers; every other file of the bundle is covered through the SHA-256
listed in ``[files]``. Schema (version 1), with the fields medai reads::

    schema = 1
    id = "brain-extraction"            # [a-z0-9-], the name users type
    version = "1.0.0"
    name = "Brain extraction (deepbet)"
    task = "segmentation"              # segmentation | detection | classification
    pipeline = "brain_extraction"      # module medai/inference/pipelines/<pipeline>.py
    summary = "one line"
    accepts_prompt = false             # true: `medai run --plane/--slice/--box` go to the pipeline

    [selection]                        # series-selection rules (see select.py)
    modality = ["MR"]
    body_part = ["HEAD", "BRAIN"]      # matched when the series has a body part
    description_any = ["t1", "mprage"] # case-insensitive substrings; any must match (if given)
    description_none = ["flair", "t2"] # none may match
    min_slices = 40

    [input]                            # what the ONNX graph(s) take, for the planner/parity check
    [input.graphs.main]                # one table per ONNX file the pipeline opens
    file = "main.onnx"
    input = "image"
    output = "logit"
    shape = [1, 1, 256, 256, 256]
    dtype = "float32"
    activation_bytes_per_voxel = 180.0 # measured peak working memory / input voxels (planner)
    memory_arena = false               # true: keep the session's working memory between runs
                                       # (fixed-size graphs run many times; see backends.py)

    [[preprocessing]]                  # steps as data, applied in order, recorded in result.json
    op = "reorient"
    to = "RAS"

    [postprocessing]                   # free-form parameters the pipeline reads
    threshold = 0.5

    [[labels]]                         # segment descriptions for SEG
    value = 1
    name = "Brain"
    category = ["SCT", "123037004", "Anatomical Structure"]
    type = ["SCT", "12738006", "Brain"]

    [parity]                           # accelerator vs CPU on a fixed input
    dice_min = 0.99
    max_abs_diff = 0.05

    [[priority.rules]]                 # applied to measurements when a pipeline sets no priority
    measurement = "brain_volume_ml"
    op = "<"
    value = 800.0
    level = "review"
    reason = "brain volume below 800 mL"

    [intended_use] / [training_data] / [license] / [[metrics]] / [[variants]]   # documentation

    [files]                            # SHA-256 of every other file of the bundle
    "main.onnx" = "9f2c..."

Strict when reading a card we are about to trust: unknown top-level keys are kept
(``raw``) but missing required ones raise :class:`ModelIntegrityError`.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from medai.errors import ModelIntegrityError

CARD_NAME = "card.toml"
SCHEMA_VERSION = 1
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
_FILE_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of a bundle and how to feed it."""

    key: str
    file: str
    input: str
    output: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    activation_bytes_per_voxel: float = 64.0
    memory_arena: bool = False


@dataclass(frozen=True)
class Label:
    """One segment of the label map, with its coded meaning for DICOM SEG."""

    value: int
    name: str
    category: tuple[str, str, str] = ("SCT", "123037004", "Anatomical Structure")
    type: tuple[str, str, str] = ("SCT", "123037004", "Anatomical Structure")
    color: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class Step:
    """One preprocessing step as data: an operation name and its parameters."""

    op: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"op": self.op, **dict(self.params)}


@dataclass(frozen=True)
class PriorityRule:
    measurement: str
    op: str
    value: float
    level: str
    reason: str = ""

    def matches(self, measured: float) -> bool:
        ops = {"<": measured < self.value, "<=": measured <= self.value, ">": measured > self.value,
               ">=": measured >= self.value}
        return ops[self.op]


@dataclass(frozen=True)
class SelectionRules:
    modality: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    description_any: tuple[str, ...] = ()
    description_none: tuple[str, ...] = ()
    min_slices: int = 1


@dataclass(frozen=True)
class ModelCard:
    """A parsed, validated ``card.toml`` (values only; trust is the bundle's job)."""

    id: str
    version: str
    name: str
    task: str
    pipeline: str
    summary: str
    accepts_prompt: bool
    selection: SelectionRules
    graphs: Mapping[str, GraphSpec]
    preprocessing: tuple[Step, ...]
    postprocessing: Mapping[str, Any]
    labels: tuple[Label, ...]
    parity: Mapping[str, float]
    priority_rules: tuple[PriorityRule, ...]
    license: Mapping[str, Any]
    files: Mapping[str, str]
    raw: Mapping[str, Any]

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return list(self.raw.get("metrics", []))

    @property
    def intended_use(self) -> Mapping[str, Any]:
        return self.raw.get("intended_use", {})


def _tuple3(value: Any, where: str) -> tuple[str, str, str]:
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) for v in value)):
        raise ValueError(f"{where} must be [scheme, code, meaning]")
    return (value[0], value[1], value[2])


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false")
    return value


def parse_card(text: str | bytes, *, source: str | Path = CARD_NAME) -> ModelCard:
    """Parse and validate card text. Raises :class:`ModelIntegrityError` naming ``source``."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelIntegrityError(f"{source}: card is not UTF-8 ({exc})") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ModelIntegrityError(f"{source}: card is not valid TOML ({exc})") from exc
    try:
        return _build(raw)
    except (KeyError, TypeError, ValueError) as exc:
        detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ModelIntegrityError(f"{source}: invalid model card: {detail}") from exc


def _build(raw: dict[str, Any]) -> ModelCard:
    if raw.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"schema must be {SCHEMA_VERSION}, got {raw.get('schema')!r}")
    model_id = raw["id"]
    if not isinstance(model_id, str) or not _ID_RE.match(model_id):
        raise ValueError(f"id {model_id!r} must match {_ID_RE.pattern}")
    pipeline = raw["pipeline"]
    if not re.match(r"^[a-z_][a-z0-9_]*$", pipeline):
        raise ValueError(f"pipeline {pipeline!r} is not a module name")
    sel = raw.get("selection", {})
    selection = SelectionRules(
        modality=tuple(s.upper() for s in sel.get("modality", [])),
        body_part=tuple(s.upper() for s in sel.get("body_part", [])),
        description_any=tuple(s.lower() for s in sel.get("description_any", [])),
        description_none=tuple(s.lower() for s in sel.get("description_none", [])),
        min_slices=int(sel.get("min_slices", 1)),
    )
    graphs: dict[str, GraphSpec] = {}
    for key, g in raw.get("input", {}).get("graphs", {}).items():
        graphs[key] = GraphSpec(key=key, file=g["file"], input=g["input"], output=g["output"],
                                shape=tuple(int(s) for s in g["shape"]), dtype=g.get("dtype", "float32"),
                                activation_bytes_per_voxel=float(g.get("activation_bytes_per_voxel", 64.0)),
                                memory_arena=_flag(g.get("memory_arena", False), f"graph {key!r} memory_arena"))
    steps = []
    for s in raw.get("preprocessing", []):
        params = {k: v for k, v in s.items() if k != "op"}
        steps.append(Step(op=s["op"], params=params))
    labels = []
    for lab in raw.get("labels", []):
        labels.append(Label(value=int(lab["value"]), name=lab["name"],
                            category=_tuple3(lab.get("category", list(Label.category)), "label category"),
                            type=_tuple3(lab.get("type", list(Label.type)), "label type"),
                            color=tuple(lab["color"]) if "color" in lab else None))  # type: ignore[arg-type]
    if not labels and raw["task"] == "segmentation":
        raise ValueError("a segmentation card needs [[labels]]")
    if len({lab.value for lab in labels}) != len(labels) or any(lab.value < 1 for lab in labels):
        raise ValueError("label values must be unique and >= 1")
    rules = tuple(PriorityRule(measurement=r["measurement"], op=r["op"], value=float(r["value"]),
                               level=r["level"], reason=r.get("reason", ""))
                  for r in raw.get("priority", {}).get("rules", []))
    for r in rules:
        if r.op not in {"<", "<=", ">", ">="}:
            raise ValueError(f"priority rule op {r.op!r} not one of < <= > >=")
    files = raw.get("files", {})
    for name, digest in files.items():
        if not _FILE_RE.match(name) or ".." in name.split("/"):
            raise ValueError(f"file name {name!r} is not a plain relative path")
        if not re.fullmatch(r"[0-9a-f]{64}", str(digest)):
            raise ValueError(f"files.{name} is not a SHA-256 hex digest")
    for g in graphs.values():
        if g.file not in files:
            raise ValueError(f"graph {g.key!r} file {g.file!r} is not listed in [files]")
    return ModelCard(
        id=model_id, version=str(raw["version"]), name=raw.get("name", model_id), task=raw["task"],
        pipeline=pipeline, summary=raw.get("summary", ""), accepts_prompt=bool(raw.get("accepts_prompt", False)),
        selection=selection, graphs=graphs, preprocessing=tuple(steps),
        postprocessing=dict(raw.get("postprocessing", {})), labels=tuple(labels),
        parity={k: float(v) for k, v in raw.get("parity", {}).items()}, priority_rules=rules,
        license=dict(raw.get("license", {})), files=dict(files), raw=raw,
    )
