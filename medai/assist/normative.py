"""Normative context: where a measurement lies among healthy people of the same age and sex.

The reference numbers are data, not code: they live in the model card's ``[normative]``
table with their source, so a reader of the card sees exactly what a percentile is
relative to. Each measure is a linear age trend with a sex offset and a per-sex standard
deviation, valid over an age range::

    [normative.measures.brain_parenchymal_fraction]
    source = "..."
    unit = "fraction"
    age_min = 20
    age_max = 90
    intercept = 0.813          # mean at age_ref for the average of both sexes
    age_ref = 25
    slope_per_year = -0.0025
    sex_offset = { M = -0.0034, F = 0.0034 }
    sd = { M = 0.049, F = 0.035 }

The z-score is (value - mean) / sd, the percentile the normal CDF of z. Outside the age
range, or without age and sex in the header, there is no comparison and the result says
why instead of extrapolating.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

NO_AGE_SEX = "no normative comparison: age/sex missing"


@dataclass(frozen=True)
class NormativeMeasure:
    """One measure's reference model (see module docstring)."""

    name: str
    source: str
    unit: str
    age_min: float
    age_max: float
    intercept: float
    age_ref: float
    slope_per_year: float
    sex_offset: Mapping[str, float]
    sd: Mapping[str, float]

    @classmethod
    def from_mapping(cls, name: str, data: Mapping[str, Any]) -> "NormativeMeasure":
        sd = {str(k).upper(): float(v) for k, v in data["sd"].items()}
        if any(v <= 0 for v in sd.values()) or not {"M", "F"} <= set(sd):
            raise ValueError(f"normative {name}: sd needs positive values for M and F")
        offset = {str(k).upper(): float(v) for k, v in data.get("sex_offset", {}).items()}
        return cls(name=name, source=str(data["source"]), unit=str(data.get("unit", "")),
                   age_min=float(data["age_min"]), age_max=float(data["age_max"]),
                   intercept=float(data["intercept"]), age_ref=float(data.get("age_ref", 0.0)),
                   slope_per_year=float(data.get("slope_per_year", 0.0)), sex_offset=offset, sd=sd)

    def mean(self, age: float, sex: str) -> float:
        return self.intercept + self.slope_per_year * (age - self.age_ref) + self.sex_offset.get(sex, 0.0)

    def quantile(self, age: float, sex: str, p: float) -> float:
        """Reference value at percentile ``p`` (0-100) for this age and sex."""
        return self.mean(age, sex) + _norm_ppf(p / 100.0) * self.sd[sex]


@dataclass(frozen=True)
class NormativeResult:
    """Comparison of one measured value, or the reason there is none."""

    measure: str
    value: float
    z: float | None = None
    percentile: float | None = None
    reference_mean: float | None = None
    reference_p5: float | None = None
    reference_p95: float | None = None
    source: str = ""
    note: str = ""

    @property
    def compared(self) -> bool:
        return self.z is not None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"measure": self.measure, "value": round(self.value, 4)}
        if self.compared:
            out.update(z=round(self.z, 2), percentile=round(self.percentile, 1),  # type: ignore[arg-type]
                       reference_mean=round(self.reference_mean, 4),  # type: ignore[arg-type]
                       reference_p5=round(self.reference_p5, 4),  # type: ignore[arg-type]
                       reference_p95=round(self.reference_p95, 4), source=self.source)  # type: ignore[arg-type]
        if self.note:
            out["note"] = self.note
        return out


def _norm_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _norm_ppf(p: float) -> float:
    """Inverse normal CDF by bisection (only a handful of calls per report)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"percentile must be strictly between 0 and 100, got {p * 100}")
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if _norm_cdf(mid) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


_AGE_RE = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$", re.IGNORECASE)


def parse_age(value: Any) -> float | None:
    """DICOM PatientAge (``nnnD/W/M/Y``) or a number of years -> years; None if unusable."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return float(value) if value >= 0 else None
    m = _AGE_RE.match(str(value))
    if not m:
        return None
    n, unit = int(m.group(1)), m.group(2).upper()
    return {"D": n / 365.25, "W": n * 7 / 365.25, "M": n / 12.0, "Y": float(n)}[unit]


def parse_sex(value: Any) -> str | None:
    """DICOM PatientSex -> ``"M"``/``"F"``; ``O``, empty or other -> None (no comparison)."""
    text = str(value or "").strip().upper()
    return text if text in {"M", "F"} else None


def load_measures(table: Mapping[str, Any] | None) -> dict[str, NormativeMeasure]:
    """Parse the card's ``[normative.measures]`` table."""
    measures = (table or {}).get("measures", {})
    return {name: NormativeMeasure.from_mapping(name, data) for name, data in measures.items()}


def compare(measure: NormativeMeasure | None, value: float, age: float | None, sex: str | None) -> NormativeResult:
    """Place ``value`` among healthy people of this age and sex, or say why not."""
    name = measure.name if measure else "unknown"
    if measure is None:
        return NormativeResult(name, value, note="no normative reference for this measure")
    if age is None or sex is None:
        return NormativeResult(name, value, note=NO_AGE_SEX)
    if not measure.age_min <= age <= measure.age_max:
        return NormativeResult(name, value, note=(f"no normative comparison: age {age:.0f} outside the "
                                                  f"reference range {measure.age_min:.0f}-{measure.age_max:.0f}"))
    mean = measure.mean(age, sex)
    sd = measure.sd[sex]
    z = (value - mean) / sd
    return NormativeResult(name, value, z=z, percentile=100.0 * _norm_cdf(z), reference_mean=mean,
                           reference_p5=measure.quantile(age, sex, 5), reference_p95=measure.quantile(age, sex, 95),
                           source=measure.source)
