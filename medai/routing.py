"""Which models a series gets: one decision for ``medai run``, triage, the PACS hook and the UI.

Two sources of rules, both applied:

* **The card** (``[selection]`` of each installed model): ``modality``, ``body_part``
  (an empty body part never excludes: many scanners leave it empty),
  ``description_any`` / ``description_none`` (substrings of the series description,
  or of the protocol name when the description is empty), ``min_slices``.
* **The site's routes** (``pacs.routes`` in ``medai.toml``: a list of tables, or JSON in
  ``MEDAI_PACS_ROUTES``). Each route names a model and optional criteria on the series:
  ``modality`` (list), ``body_part`` and ``series_description`` (case-insensitive regular
  expressions, searched), ``sop_class`` (list of UIDs). When a site configures routes, a
  model runs only on series a route for it matches, and still only where its card
  accepts the series (a route never feeds a model what it was not built for).

Per study, each model gets the best accepted series: most frames first, then UID, so the
choice is deterministic. Models that take a person's prompt (a box on a slice) are
offered interactively but never chosen for unattended runs.

Routing reads header facts only (:class:`~medai.dicom.index.SeriesEntry`), never pixels.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from medai.dicom.index import SeriesEntry
from medai.errors import ConfigError


# --------------------------------------------------------------------------- the card

def card_accepts(card: Any, series: SeriesEntry) -> tuple[bool, str]:
    """Whether a model card's selection rules accept ``series``; the reason names the first
    rule that failed."""
    rules = card.selection
    if not series.is_image:
        return False, "not an image series"
    modality = series.modality.upper()
    if rules.modality and modality not in rules.modality:
        return False, f"modality {modality or '(none)'} not in {', '.join(rules.modality)}"
    body = series.body_part.upper()
    if rules.body_part and body and body not in rules.body_part:
        return False, f"body part {body} not in {', '.join(rules.body_part)}"
    desc = series.description.lower()
    if rules.description_any and not any(s in desc for s in rules.description_any):
        return False, "series description does not name an accepted sequence"
    bad = [s for s in rules.description_none if s in desc]
    if bad:
        return False, f"series description names an excluded sequence ({bad[0]})"
    n = series.frame_count
    if n < rules.min_slices:
        return False, f"{n} slices, fewer than {rules.min_slices}"
    return True, "matches"


def best_first(series: Iterable[SeriesEntry]) -> list[SeriesEntry]:
    return sorted(series, key=lambda s: (-s.frame_count, s.series_instance_uid))


# --------------------------------------------------------------------------- site routes

@dataclass(frozen=True)
class Route:
    """One site routing rule (``[[pacs.routes]]``)."""

    model: str
    modality: tuple[str, ...] = ()
    body_part: str | None = None
    series_description: str | None = None
    sop_class: tuple[str, ...] = ()

    def matches(self, series: SeriesEntry) -> bool:
        if self.modality and series.modality.upper() not in {m.upper() for m in self.modality}:
            return False
        if self.sop_class and series.sop_class_uid not in self.sop_class:
            return False
        if self.body_part and not re.search(self.body_part, series.body_part, re.IGNORECASE):
            return False
        if self.series_description and not re.search(self.series_description, series.description,
                                                      re.IGNORECASE):
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
        for name in ("body_part", "series_description"):
            if item.get(name):
                try:
                    re.compile(str(item[name]))
                except re.error as exc:
                    raise ConfigError(f"pacs.routes[{i}].{name}: not a regular expression ({exc})") from exc
        routes.append(Route(model=str(item["model"]), modality=_as_tuple(item.get("modality")),
                            body_part=item.get("body_part") or None,
                            series_description=item.get("series_description") or None,
                            sop_class=_as_tuple(item.get("sop_class"))))
    return tuple(routes)


def site_routes() -> tuple[Route, ...]:
    """The routes configured for this install (``pacs.routes``)."""
    from medai import config

    return parse_routes(config.get("pacs.routes"))


# --------------------------------------------------------------------------- the decision

@dataclass(frozen=True)
class Offer:
    """One installed model considered for one series."""

    model_id: str
    name: str
    version: str
    accepts: bool
    reason: str
    #: Needs a person's prompt (a box on a slice): offered in the UI, never run unattended.
    interactive: bool
    card: Any


def site_allows(model_id: str, series: SeriesEntry, routes: Sequence[Route]) -> tuple[bool, str]:
    """Whether the site's routes let ``model_id`` read ``series`` (always, when none are set)."""
    if not routes:
        return True, ""
    mine = [r for r in routes if r.model == model_id]
    if not mine:
        return False, "no site route names this model (pacs.routes)"
    if not any(r.matches(series) for r in mine):
        return False, "the site's routes for this model do not match this series (pacs.routes)"
    return True, ""


def offers(series: SeriesEntry, *, bundles: Sequence[Any] | None = None,
           routes: Sequence[Route] | None = None) -> list[Offer]:
    """Every installed model for one series, those that accept it first: what the UI lists."""
    from medai.inference import registry

    bundles = registry.list_bundles() if bundles is None else bundles
    routes = site_routes() if routes is None else routes
    out = []
    for bundle in bundles:
        ok, reason = accepts(bundle, series, routes)
        out.append(Offer(bundle.id, bundle.card.name, str(bundle.version), ok, reason,
                         bool(bundle.card.accepts_prompt), bundle.card))
    return sorted(out, key=lambda o: (not o.accepts, o.model_id))


@dataclass(frozen=True)
class Decision:
    """A model chosen for a study, with the series it reads."""

    model_id: str
    model_version: str
    series: SeriesEntry


def accepts(bundle: Any, series: SeriesEntry, routes: Sequence[Route]) -> tuple[bool, str]:
    """The card's rules, then the site's routes, for one model and one series."""
    ok, reason = card_accepts(bundle.card, series)
    if ok:
        ok, why = site_allows(bundle.id, series, routes)
        reason = why or reason
    return ok, reason


def decide(series: Sequence[SeriesEntry], *, bundles: Sequence[Any] | None = None,
           routes: Sequence[Route] | None = None, models: Sequence[str] | None = None,
           automatic_only: bool = True) -> tuple[list[Decision], dict[str, str]]:
    """The models a study's ``series`` get, each on its best accepted series; and for each
    installed model that gets none, why (the first series' reason, or all distinct ones).

    ``models`` limits the choice to those ids (``medai run --model``, ``medai triage
    --models``); ``automatic_only`` leaves out models that need a person's prompt."""
    from medai.inference import registry

    if bundles is None:
        bundles = [registry.get_bundle(m) for m in models] if models else registry.list_bundles()
    routes = site_routes() if routes is None else routes
    chosen: list[Decision] = []
    why: dict[str, str] = {}
    for bundle in bundles:
        if automatic_only and bundle.card.accepts_prompt:
            why[bundle.id] = "needs a prompt drawn by a person"
            continue
        reasons: list[str] = []
        accepted = []
        for s in series:
            ok, reason = accepts(bundle, s, routes)
            if ok:
                accepted.append(s)
            elif reason not in reasons:
                reasons.append(reason)
        if accepted:
            chosen.append(Decision(bundle.id, str(bundle.version), best_first(accepted)[0]))
        else:
            why[bundle.id] = "; ".join(sorted(reasons)) or "no image series"
    return chosen, why


__all__ = ["card_accepts", "site_allows", "accepts", "best_first", "Route", "parse_routes", "site_routes", "Offer",
           "offers", "Decision", "decide"]
