"""Following an Orthanc that a site already runs, over its REST API only.

medai reads Orthanc's ``/changes`` feed, and for each ``StableStudy`` fetches
the study's instances into the local store, queues the routed models, and
uploads the results back with ``POST /instances``. Nothing runs inside Orthanc
(no plugin, no AGPL code): the two processes only talk HTTP, normally on
loopback. The feed cursor is kept in the queue database, so a restart resumes
where it stopped; a study seen twice is idempotent (same instances, same job
key).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pydicom

from medai import config
from medai.errors import AuditWriteError, ConfigError, PacsError, UnsafeInputError
from medai.pacs import _audit
from medai.pacs.queue import PacsDB, SeriesInfo
from medai.pacs.store import StudyStore, validate_uid

log = logging.getLogger("medai.pacs")


@dataclass(frozen=True)
class OrthancClient:
    """A small REST client for one Orthanc (base URL, optional basic auth in the URL)."""

    url: str
    timeout: float = 30.0

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ConfigError(f"pacs.orthanc_url {self._safe_url()!r}: expected http(s)://host:port")
        # Configured, hence allowed (loopback needs no permission, anything else does).
        _audit.allow_destination(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))

    @classmethod
    def from_config(cls, url: str | None = None) -> "OrthancClient":
        value = config.get("pacs.orthanc_url", url)
        if not value:
            raise ConfigError("pacs.orthanc_url is not set: the Orthanc to follow must be configured")
        return cls(str(value).rstrip("/"))

    def _safe_url(self) -> str:
        parts = urllib.parse.urlsplit(self.url)
        host = parts.hostname or ""
        return f"{parts.scheme}://{host}{':' + str(parts.port) if parts.port else ''}{parts.path}"

    def describe(self) -> str:
        return f"orthanc:{self._safe_url()}"

    def _request(self, method: str, path: str, body: bytes | None = None,
                 content_type: str | None = None) -> bytes:
        parts = urllib.parse.urlsplit(self.url)
        base = self._safe_url()
        req = urllib.request.Request(base + path, data=body, method=method)
        if parts.username is not None:
            token = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            req.add_header("Authorization", "Basic " + base64.b64encode(token.encode()).decode())
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 - configured URL
                return bytes(resp.read())
        except urllib.error.HTTPError as exc:
            raise PacsError(f"{self.describe()}: {method} {path.split('?')[0]} answered HTTP {exc.code}") from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise PacsError(f"{self.describe()}: {method} {path.split('?')[0]} failed ({reason})") from exc

    def get_json(self, path: str) -> Any:
        return json.loads(self._request("GET", path))

    def changes(self, since: int, limit: int = 100) -> tuple[list[dict[str, Any]], int, bool]:
        data = self.get_json(f"/changes?since={int(since)}&limit={int(limit)}")
        return list(data.get("Changes", [])), int(data.get("Last", since)), bool(data.get("Done", True))

    def last_change(self) -> int:
        data = self.get_json("/changes?last")
        return int(data.get("Last", 0))

    def study_instances(self, orthanc_study: str) -> list[dict[str, Any]]:
        return list(self.get_json(f"/studies/{urllib.parse.quote(orthanc_study, safe='')}/instances"))

    def instance_file(self, orthanc_instance: str) -> bytes:
        return self._request("GET", f"/instances/{urllib.parse.quote(orthanc_instance, safe='')}/file")

    def upload(self, data: bytes) -> dict[str, Any]:
        answer = json.loads(self._request("POST", "/instances", data, "application/dicom"))
        if isinstance(answer, dict) and answer.get("Status") not in ("Success", "AlreadyStored"):
            raise PacsError(f"{self.describe()}: upload answered {answer.get('Status')!r}")
        return answer if isinstance(answer, dict) else {}

    def send(self, paths: Sequence[Path]) -> None:
        for p in paths:
            self.upload(p.read_bytes())


def _header(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


class Follower:
    """Turns Orthanc StableStudy changes into stored studies and queued jobs."""

    def __init__(self, client: OrthancClient, *, store: StudyStore, db: PacsDB,
                 on_stable: Callable[[str], None], poll_seconds: float = 1.0) -> None:
        self.client = client
        self.store = store
        self.db = db
        self.on_stable = on_stable
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self.cursor_key = "orthanc_cursor:" + hashlib.sha256(client.describe().encode()).hexdigest()[:12]

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.poll_once()
            except PacsError as exc:
                log.warning("orthanc poll failed: %s", exc)
                busy = False
            except AuditWriteError as exc:
                log.error("orthanc import held back: %s", exc)
                busy = False
            if not busy:
                self._stop.wait(self.poll_seconds)

    def poll_once(self) -> bool:
        """Process one page of changes; True when more may be waiting."""
        since = int(self.db.get_value(self.cursor_key, 0))
        changes, last, done = self.client.changes(since)
        for change in changes:
            if change.get("ChangeType") == "StableStudy" and change.get("ResourceType") == "Study":
                self.import_study(str(change["ID"]))
            # Advance only past what was handled: a crash re-reads this change.
            self.db.set_value(self.cursor_key, int(change.get("Seq", last)))
        self.db.set_value(self.cursor_key, last)
        return not done

    def import_study(self, orthanc_study: str) -> str | None:
        """Fetch the study's instances we do not hold yet; queue it as stable.

        Instances already held and our own uploaded results are skipped, so a
        change seen twice (restart, or Orthanc announcing our upload) costs a
        listing and nothing else; stabilising is idempotent."""
        info = self.client.get_json(f"/studies/{urllib.parse.quote(orthanc_study, safe='')}")
        study_uid = validate_uid(info.get("MainDicomTags", {}).get("StudyInstanceUID"), "Study Instance UID")
        fetched: list[str] = []
        patient: tuple[str | None, str | None] = (None, None)
        for inst in self.client.study_instances(orthanc_study):
            sop_hint = str(inst.get("MainDicomTags", {}).get("SOPInstanceUID", ""))
            if sop_hint and (self.db.has_instance(sop_hint) or self.db.is_output(sop_hint)):
                continue
            data = self.client.instance_file(str(inst["ID"]))
            try:
                ds = _header(data)
                sop_uid = validate_uid(ds.get("SOPInstanceUID"), "SOP Instance UID")
                if validate_uid(ds.get("StudyInstanceUID"), "Study Instance UID") != study_uid:
                    raise UnsafeInputError(None, "instance belongs to another study")
                series_uid = validate_uid(ds.get("SeriesInstanceUID"), "Series Instance UID")
                sop_class = validate_uid(ds.get("SOPClassUID"), "SOP Class UID")
            except Exception as exc:  # noqa: BLE001 - skip one bad instance, not the study
                log.warning("orthanc instance skipped: %s", getattr(exc, "reason", type(exc).__name__))
                continue
            if self.db.is_output(sop_uid):
                continue
            if not fetched:
                patient = (str(ds.get("PatientID", "")) or None, str(ds.get("PatientName", "")) or None)
                # Fail closed: no trail, no import.
                _audit.record("import", patient_id=patient[0], patient_name=patient[1], study_uid=study_uid,
                              detail={"phase": "begin", "via": "orthanc", "source": self.client.describe()})
            stored = self.store.put(data, study_uid, series_uid, sop_uid)
            info_s = SeriesInfo(study_uid, series_uid, str(ds.get("Modality", "")),
                                str(ds.get("BodyPartExamined", "")), str(ds.get("SeriesDescription", "")), sop_class)
            self.db.record_instance(sop_uid=sop_uid, study_uid=study_uid, series_uid=series_uid,
                                    sop_class_uid=sop_class, size=stored.size, sha256=stored.sha256, series=info_s,
                                    source="orthanc")
            fetched.append(sop_uid)
        if fetched:
            _audit.record("instances_transferred", patient_id=patient[0], patient_name=patient[1],
                          study_uid=study_uid, instance_uids=tuple(fetched),
                          detail={"direction": "received", "via": "orthanc", "source": self.client.describe(),
                                  "count": len(fetched)})
            log.info("orthanc study imported study=%s instances=%d", _audit.key(study_uid), len(fetched))
        if self.db.study_source(study_uid) is not None:
            self.on_stable(study_uid)
        return study_uid


def wait_for(client: OrthancClient, timeout: float = 30.0) -> None:
    """Block until Orthanc answers (startup helper for the CLI and tests)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.get_json("/system")
            return
        except PacsError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
