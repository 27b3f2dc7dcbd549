"""What every importer shares: TOML for the card, folder digests, Dice, sealing and installing."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from medai.errors import ModelIntegrityError

#: Label names (lower case, spaces/underscores equal) with a SNOMED CT code for SEG; anything
#: else keeps its own name with the generic "Anatomical Structure" type.
STANDARD_CODES: dict[str, tuple[str, str, str]] = {
    "liver": ("SCT", "10200004", "Liver"),
    "spleen": ("SCT", "78961009", "Spleen"),
    "pancreas": ("SCT", "15776009", "Pancreas"),
    "stomach": ("SCT", "69695003", "Stomach"),
    "gallbladder": ("SCT", "28231008", "Gallbladder"),
    "kidney": ("SCT", "64033007", "Kidney"),
    "kidney left": ("SCT", "64033007", "Kidney"),
    "kidney right": ("SCT", "64033007", "Kidney"),
    "urinary bladder": ("SCT", "89837001", "Urinary bladder"),
    "heart": ("SCT", "80891009", "Heart"),
    "aorta": ("SCT", "15825003", "Aorta"),
    "brain": ("SCT", "12738006", "Brain"),
    "lung": ("SCT", "39607008", "Lung"),
    "bone": ("SCT", "272673000", "Bone"),
}
ANATOMY = ("SCT", "123037004", "Anatomical Structure")
_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255)]


def label_entry(value: int, name: str) -> dict[str, Any]:
    """A ``[[labels]]`` table: the dataset's name, a standard code where one is known."""
    key = re.sub(r"[\s_]+", " ", name.strip().lower())
    coded = STANDARD_CODES.get(key, ANATOMY)
    return {"value": int(value), "name": name, "category": list(ANATOMY), "type": list(coded),
            "color": list(_PALETTE[(value - 1) % len(_PALETTE)])}


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"cannot write {v} to a card")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, np.generic):
        return toml_value(v.item())
    raise TypeError(f"cannot write {type(v).__name__} to a card")


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def toml_table(name: str, values: Mapping[str, Any], *, array: bool = False) -> str:
    head = f"[[{name}]]" if array else f"[{name}]"
    return "\n".join([head] + [f"{_key(k)} = {toml_value(v)}" for k, v in values.items() if v is not None]) + "\n"


def folder_digest(folder: Path, names: Iterable[str]) -> str:
    """SHA-256 over the relative names and contents of the files an import read."""
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(name.encode() + b"\0")
        with open(folder / name, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    inter = float(np.logical_and(a, b).sum())
    total = float(a.sum()) + float(b.sum())
    return 1.0 if total == 0 else 2.0 * inter / total


def per_label_dice(ref: np.ndarray, ours: np.ndarray, values: Sequence[int]) -> dict[int, float]:
    return {int(v): dice(ref == v, ours == v) for v in values}


def check_licence(licence: str) -> str:
    licence = licence.strip()
    if not licence:
        raise ModelIntegrityError("state the licence of the weights (--license), e.g. Apache-2.0 or "
                                  "CC-BY-NC-SA-4.0 (some TotalSegmentator tasks are not for commercial use)")
    return licence


def seal_and_install(build: Callable[[Path], tuple[str, list[str]]], *, install: bool = True,
                     out_dir: Path | None = None) -> Any:
    """``build(folder)`` writes the bundle's files and returns (card template, file names); the
    folder is sealed with this machine's key and installed (or copied to ``out_dir``)."""
    from medai.inference import registry, trust
    from medai.inference.bundle import load_bundle, seal

    base = registry.installed_dir() if install else None
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        folder = Path(tmp) / "bundle"
        folder.mkdir()
        template, names = build(folder)
        seal(folder, template, names, trust.local_key())
        if install:
            return registry.install(folder)
        assert out_dir is not None
        if out_dir.exists():
            raise ModelIntegrityError(f"{out_dir} exists; choose a new folder for the bundle")
        shutil.copytree(folder, out_dir)
        return load_bundle(out_dir)
