"""Physiological plausibility of a tissue result: is it a brain, or a classification that collapsed?

Image QC (:mod:`medai.assist.qc`) judges the *input*; this module judges the *output*. A
tissue classifier can fail silently on a series that passed every image check (coarse
anisotropic voxels, 8-bit range, low contrast): one class swallows another and the result
is, e.g., 0.4 mL of CSF and a parenchymal fraction of 1.000. No healthy or diseased adult
brain looks like that, so such a result is not reported at all: it is a QC failure that says
"not measurable on this series" and why, and carries no tissue numbers.

The limits are deliberately wide envelopes around published adult values (the figures and
their sources live in the card's ``[postprocessing.plausibility]`` table), so that real
atrophy, large heads and the 5th-95th percentile tails are measured, and only results no
adult brain produces are refused. They are gates, not normative ranges: where a value lies
among healthy people is :mod:`medai.assist.normative`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from medai.assist import reject_unknown

Status = Literal["pass", "fail"]

#: The sentence every surface shows (result.json, findings, summary, worklist reasons).
NOT_MEASURABLE = "not measurable on this series"


@dataclass(frozen=True)
class Range:
    """A closed interval ``[low, high]`` in the unit of its measure."""

    low: float
    high: float

    def __contains__(self, value: float) -> bool:
        return self.low <= value <= self.high

    def text(self, unit: str = "") -> str:
        return f"{self.low:g}-{self.high:g}{(' ' + unit) if unit else ''}"


@dataclass(frozen=True)
class PlausibilityLimits:
    """The card's ``[postprocessing.plausibility]``; defaults are the shipped figures."""

    brain_parenchymal_fraction: Range = Range(0.50, 0.93)
    csf_fraction_of_icv: Range = Range(0.07, 0.50)
    gm_wm_ratio: Range = Range(0.9, 2.0)
    gm_volume_ml: Range = Range(400.0, 1000.0)
    wm_volume_ml: Range = Range(300.0, 850.0)
    #: Intracranial volume by sex ("F", "M") and for a header without sex ("any").
    icv_ml: Mapping[str, Range] = field(default_factory=lambda: {
        "F": Range(1030.0, 1760.0), "M": Range(990.0, 2090.0), "any": Range(990.0, 2090.0)})
    #: Where each figure comes from, by measure name (shown on the card and in result.json).
    sources: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> "PlausibilityLimits":
        """Parse ``{measure: [low, high], ..., icv_ml: {F: [..], M: [..], any: [..]}, sources: {...}}``."""
        if not data:
            return cls()
        reject_unknown(cls, data, "plausibility limits")
        values: dict[str, Any] = {}
        for name, value in data.items():
            if name == "sources":
                values[name] = {str(k): str(v) for k, v in value.items()}
            elif name == "icv_ml":
                values[name] = {str(k): _range(f"icv_ml.{k}", v) for k, v in value.items()}
                if not {"F", "M", "any"} <= set(values[name]):
                    raise ValueError("plausibility icv_ml needs F, M and any")
            else:
                values[name] = _range(name, value)
        return cls(**values)


def _range(name: str, value: Any) -> Range:
    low, high = (float(v) for v in value)
    if not low < high:
        raise ValueError(f"plausibility {name}: low {low} must be below high {high}")
    return Range(low, high)


@dataclass(frozen=True)
class PlausibilityCheck:
    """One gate. ``value`` is kept for the pipeline's own decision but never written out
    for a failed result (:meth:`as_dict` with ``with_value=False``)."""

    name: str
    status: Status
    value: float
    limits: str
    message: str
    source: str = ""

    def as_dict(self, *, with_value: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "status": self.status, "limits": self.limits,
                               "message": self.message}
        if with_value:
            out["value"] = round(float(self.value), 4)
        if self.source:
            out["source"] = self.source
        return out


@dataclass(frozen=True)
class PlausibilityReport:
    checks: tuple[PlausibilityCheck, ...]

    @property
    def plausible(self) -> bool:
        return all(c.status == "pass" for c in self.checks)

    @property
    def reason(self) -> str:
        """Why the result is refused, in words a reader can act on ('' when plausible)."""
        failed = [c.message for c in self.checks if c.status == "fail"]
        return "; ".join(failed)

    def as_dict(self) -> dict[str, Any]:
        # A refused result carries no tissue numbers, not even inside the checks.
        keep = self.plausible
        return {"status": "pass" if keep else "fail",
                "checks": [c.as_dict(with_value=keep) for c in self.checks]}


_LABELS = {"brain_parenchymal_fraction": ("brain parenchymal fraction", ""),
           "csf_fraction_of_icv": ("CSF fraction of the intracranial volume", ""),
           "gm_wm_ratio": ("grey/white matter ratio", ""),
           "gm_volume_ml": ("grey matter volume", "mL"), "wm_volume_ml": ("white matter volume", "mL"),
           "icv_ml": ("intracranial volume", "mL")}


def check(volumes_ml: Mapping[str, float], icv_ml: float, sex: str | None,
          limits: PlausibilityLimits | None = None) -> PlausibilityReport:
    """Gate one tissue result (``volumes_ml`` with ``CSF``, ``GM``, ``WM``) against ``limits``.

    The messages name the measure and the limits, not the measured value: a refused result
    must not leak a number a reader could take for a measurement.
    """
    lim = limits or PlausibilityLimits()
    csf, gm, wm = (float(volumes_ml[k]) for k in ("CSF", "GM", "WM"))
    icv = float(icv_ml)
    values = {
        "brain_parenchymal_fraction": ((gm + wm) / icv if icv > 0 else 0.0, lim.brain_parenchymal_fraction),
        "csf_fraction_of_icv": (csf / icv if icv > 0 else 0.0, lim.csf_fraction_of_icv),
        "gm_wm_ratio": (gm / wm if wm > 0 else float("inf"), lim.gm_wm_ratio),
        "gm_volume_ml": (gm, lim.gm_volume_ml),
        "wm_volume_ml": (wm, lim.wm_volume_ml),
        "icv_ml": (icv, lim.icv_ml.get(sex or "any", lim.icv_ml["any"])),
    }
    checks = []
    for name, (value, rng) in values.items():
        label, unit = _LABELS[name]
        limits_text = rng.text(unit) + (f" (sex {sex})" if name == "icv_ml" and sex else "")
        ok = value in rng
        where = "within" if ok else "below" if value < rng.low else "above"
        message = f"{label} {where} the plausible adult range {limits_text}"
        checks.append(PlausibilityCheck(name, "pass" if ok else "fail", value, limits_text, message,
                                        lim.sources.get(name, "")))
    return PlausibilityReport(tuple(checks))


__all__ = ["NOT_MEASURABLE", "PlausibilityCheck", "PlausibilityLimits", "PlausibilityReport", "Range", "check"]
