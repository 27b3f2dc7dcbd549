"""The shipped viewport bundle: complete, local, licensed, and built from the pinned lockfile."""

from __future__ import annotations

import json
import re
from pathlib import Path

VIEWPORT = Path(__file__).resolve().parents[1] / "ui" / "viewport"


def test_bundle_references_only_its_own_files():
    html = (VIEWPORT / "bundle" / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(r.startswith("./assets/") for r in refs), refs
    for ref in refs:
        assert (VIEWPORT / "bundle" / ref).is_file(), ref
    assert "Content-Security-Policy" in html and "default-src 'self'" in html  # nothing off this server
    size = sum(p.stat().st_size for p in (VIEWPORT / "bundle").rglob("*") if p.is_file())
    assert size < 4_000_000  # a few MB, shipped in the wheel


def test_notice_names_every_bundled_package_at_its_locked_version():
    lock = json.loads((VIEWPORT / "frontend" / "package-lock.json").read_text())
    notice = (VIEWPORT / "NOTICE").read_text()
    runtime = {path.rsplit("node_modules/", 1)[-1]: meta for path, meta in lock["packages"].items()
               if path and not meta.get("dev") and not meta.get("optional")}
    assert runtime["@niivue/niivue"]["license"] == "BSD-2-Clause"
    for name, meta in runtime.items():
        if name.startswith("@rollup/"):
            continue  # a native build tool NiiVue lists, never bundled
        assert f"- {name} {meta['version']}: " in notice, name
    assert set(json.loads((VIEWPORT / "frontend" / "package.json").read_text())["dependencies"]) == {"@niivue/niivue"}


def test_component_points_at_the_shipped_bundle():
    from medai.ui import viewport

    assert viewport.BUNDLE == VIEWPORT / "bundle" and (viewport.BUNDLE / "index.html").is_file()
