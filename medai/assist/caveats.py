"""Caveats a reader must see beside a measured volume, decided by the series' grid.

Why: a series on a template grid (the MNI152 1 mm grid, 181 x 217 x 181, where the bundled
demo study Colin27 lives) was registered to template space, which is larger than a typical
head, so any volume measured on it describes the enlarged image. That is a fact about the
series, true for every model that measures (brain extraction's "Brain 1956.5 mL" as much as
volumetry's tissue volumes), so the rule lives here once and the text comes from each card:

    [[postprocessing.caveats]]
    grid = [181, 217, 181]     # dimensions, any order
    spacing_mm = 1.0           # isotropic voxel size
    text = "Template space: ..."

:func:`medai.inference.run` puts the caveats of the model's card into ``result.json``
(``caveats``) for every model; pipelines that write findings (volumetry) also show them there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np


@dataclass(frozen=True)
class CaveatRule:
    """A series with these dimensions (sorted) and this isotropic voxel size gets ``text``."""

    grid: tuple[int, int, int]
    spacing_mm: float
    text: str

    @classmethod
    def from_mapping(cls, rule: Mapping[str, Any]) -> "CaveatRule":
        grid = tuple(sorted(int(n) for n in rule["grid"]))
        if len(grid) != 3:
            raise ValueError(f"a caveat grid has three dimensions, got {rule['grid']}")
        text = str(rule["text"]).strip()
        if not text:
            raise ValueError("a caveat needs a text")
        return cls(grid, float(rule["spacing_mm"]), text)  # type: ignore[arg-type]

    def applies(self, shape: Iterable[int], spacing: Iterable[float]) -> bool:
        return (tuple(sorted(int(n) for n in shape)) == self.grid
                and bool(np.allclose(np.asarray(tuple(spacing), dtype=float), self.spacing_mm, atol=0.01)))


def rules_from_card(postprocessing: Mapping[str, Any] | None) -> tuple[CaveatRule, ...]:
    """The ``[[postprocessing.caveats]]`` of a card (none: no caveats). Raises ``ValueError``
    or ``KeyError`` for a malformed rule (the card is then invalid)."""
    return tuple(CaveatRule.from_mapping(r) for r in (postprocessing or {}).get("caveats", ()))


def caveats_for(shape: Iterable[int], spacing: Iterable[float], rules: Iterable[CaveatRule]) -> list[str]:
    """Texts of the rules that match a series of ``shape`` voxels of ``spacing`` mm."""
    shape, spacing = tuple(shape), tuple(spacing)
    return [r.text for r in rules if r.applies(shape, spacing)]


def for_result(postprocessing: Mapping[str, Any] | None, shape: Iterable[int], spacing: Iterable[float],
               already: Iterable[str] | None = None) -> list[str]:
    """``result.json``'s ``caveats``: what the pipeline reported (``already``), then the card's
    rules that match the series, each text once."""
    out = [str(c) for c in already or ()]
    for text in caveats_for(shape, spacing, rules_from_card(postprocessing)):
        if text not in out:
            out.append(text)
    return out


__all__ = ["CaveatRule", "caveats_for", "for_result", "rules_from_card"]
