"""The client-side viewport: a Streamlit custom component built on NiiVue.

Why a component: every interaction with the images (slice steps, window/level,
zoom, pan, crosshair, cine, measurements) must answer at display rate, which a
server round trip per step cannot. The page sends the series once (a gzipped
NIfTI on the RAS grid of :func:`medai.viewer.ras_grid`, served by Streamlit's own
media endpoint on this machine) and the browser does the rest. The JavaScript
bundle in ``bundle/`` is built from ``frontend/`` (pinned ``package-lock.json``)
by ``scripts/build-viewer`` and shipped inside the package: no npm, no CDN at
run time. Licences of the bundled npm packages: ``NOTICE``.

What comes back to the page is only what the clinician asked for: a picked
point, a distance, a prompt box, as voxel indices on that RAS grid
(:func:`medai.viewer.display_voxel_from_ras` maps them to the series).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import streamlit.components.v1 as components

BUNDLE = Path(__file__).with_name("bundle")

_component = components.declare_component("viewport", path=str(BUNDLE))


def media_url(data: bytes, coordinates: str) -> str:
    """Serve ``data`` from this Streamlit server (same origin, loopback) and return
    its URL. The URL is derived from the content hash, so reruns of the page hand
    the browser the same URL and the viewport does not fetch the series again."""
    from streamlit import runtime

    return runtime.get_instance().media_file_mgr.add(data, "application/octet-stream", coordinates)


def viewport(*, volume: bytes, labels: bytes | None, window: tuple[float, float], unit: str,
             presets: Sequence[Mapping[str, Any]], corners: Mapping[str, Any],
             label_entries: Sequence[Mapping[str, Any]] = (), previews: Sequence[bytes] = (), hint: str = "",
             height: int = 560, key: str = "viewport") -> dict[str, Any] | None:
    """Draw the viewport (``hint`` replaces the usage line under it); returns the
    clinician's last explicit action (``pick``, ``distance`` or ``box`` with RAS voxel
    indices) or ``None``. ``previews`` (PNG of the middle axial, coronal and sagittal
    slices) travel inside the first message and are shown until the volume is drawn."""
    volume_url = media_url(volume, f"{key}.volume")
    labels_url = media_url(labels, f"{key}.labels") if labels is not None else None
    return _component(volume_url=volume_url, labels_url=labels_url,
                      window={"width": float(window[0]), "level": float(window[1])}, unit=unit,
                      presets=list(presets), corners=dict(corners), labels=list(label_entries), hint=hint,
                      previews=[_data_url(p) for p in previews], height=int(height), key=key, default=None)


def _data_url(png: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(png).decode()
