"""Which models run on a study that became stable.

Two sources of rules, in this order:

* **Explicit routes** (``pacs.routes`` in ``medai.toml``, a list of tables, or
  JSON in ``MEDAI_PACS_ROUTES``). Each route names a model and optional
  criteria on the series: ``modality`` (list), ``body_part``,
  ``series_description`` (case-insensitive regular expressions, searched) and
  ``sop_class`` (list of UIDs). A route fires on the first series (most
  instances first) that meets all of its criteria.
* **Default**: when no route is configured, every installed model's own card
  selection rules (``medai.inference.select.matching_series``) decide, exactly
  as for an interactive run.

Models that take a user prompt (a box drawn on a slice) never run unattended.

Routing never reads pixels: series attributes were recorded from the headers at
reception.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from medai.errors import ConfigError, MedaiError
from medai.pacs.queue import RouteTarget, SeriesInfo

log = logging.getLogger("medai.pacs")


@dataclass(frozen=True)
class Route:
    model: str
    modality: tuple[str, ...] = ()
    body_part: str | None = None
    series_description: str | None = None
    sop_class: tuple[str, ...] = ()

    def matches(self, series: SeriesInfo) -> bool:
        if self.modality and series.modality.upper() not in {m.upper() for m in self.modality}:
            return False
        if self.sop_class and series.sop_class_uid not in self.sop_class:
            return False
        if self.body_part and not re.search(self.body_part, series.body_part, re.IGNORECASE):
            return False
        if self.series_description and not re.search(self.series_description, series.description, re.IGNORECASE):
            return False
        return True


def _as_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def parse_routes(raw: Any) -> tuple[Route, ...]:
    """Routes from the TOML list of tables or its JSON form; strict about keys."""
    if raw in (None, "", []):
        return ()
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"pacs.routes: not JSON ({exc})") from exc
    if isinstance(raw, Mapping):
        raw = [raw]
    routes = []
    allowed = {"model", "modality", "body_part", "series_description", "sop_class"}
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping) or not item.get("model"):
            raise ConfigError(f"pacs.routes[{i}]: a route is a table with at least 'model'")
        unknown = set(item) - allowed
        if unknown:
            raise ConfigError(f"pacs.routes[{i}]: unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})")
        for key in ("body_part", "series_description"):
            if item.get(key):
                try:
                    re.compile(str(item[key]))
                except re.error as exc:
                    raise ConfigError(f"pacs.routes[{i}].{key}: not a regular expression ({exc})") from exc
        routes.append(Route(model=str(item["model"]), modality=_as_tuple(item.get("modality")),
                            body_part=item.get("body_part") or None,
                            series_description=item.get("series_description") or None,
                            sop_class=_as_tuple(item.get("sop_class"))))
    return tuple(routes)


def _model_version(model_id: str) -> str | None:
    """The installed version, or None for a model that needs a person's prompt
    (a box drawn on a slice): nobody is there to give it one."""
    registry = importlib.import_module("medai.inference.registry")
    bundle = registry.get_bundle(model_id)
    if bundle.card.accepts_prompt:
        log.error("route to %s ignored: it takes a user prompt and cannot run unattended", model_id)
        return None
    return str(bundle.version)


def route_explicit(routes: Sequence[Route], series: Sequence[SeriesInfo],
                   counts: Mapping[str, int]) -> list[RouteTarget]:
    ordered = sorted(series, key=lambda s: (-counts.get(s.series_uid, 0), s.series_uid))
    targets: dict[str, RouteTarget] = {}
    for route in routes:
        if route.model in targets:
            continue
        for s in ordered:
            if route.matches(s):
                version = _model_version(route.model)
                if version is not None:
                    targets[route.model] = RouteTarget(route.model, version, s.series_uid)
                break
    return list(targets.values())


def _series_uid(entry: Any) -> str | None:
    for attr in ("series_uid", "series_instance_uid", "uid"):
        value = getattr(entry, attr, None)
        if value:
            return str(value)
    if isinstance(entry, str):
        return entry
    return None


def route_default(study_dir: Path) -> list[RouteTarget]:
    """Every installed model whose card selection rules pick a series of the study."""
    try:
        registry = importlib.import_module("medai.inference.registry")
        select = importlib.import_module("medai.inference.select")
        index_mod = importlib.import_module("medai.dicom.index")
    except ModuleNotFoundError as exc:
        log.error("default routing unavailable (%s missing); configure pacs.routes", exc.name)
        return []
    index = index_mod.scan([study_dir])
    targets = []
    for bundle in registry.list_bundles():
        if bundle.card.accepts_prompt:
            continue  # needs a person's prompt (a box on a slice): interactive use only
        try:
            picked = select.matching_series(bundle.card, index)
        except MedaiError as exc:
            log.info("model %s: no series selected (%s)", bundle.id, exc)
            continue
        if isinstance(picked, (list, tuple)):
            picked = picked[0] if picked else None
        if picked is None:
            continue
        targets.append(RouteTarget(bundle.id, str(bundle.version), _series_uid(picked)))
    return targets


def route(study_dir: Path, series: Iterable[SeriesInfo], counts: Mapping[str, int],
          routes: Sequence[Route]) -> list[RouteTarget]:
    """The models (with versions and series) a stable study goes to."""
    if routes:
        return route_explicit(routes, list(series), counts)
    return route_default(study_dir)
