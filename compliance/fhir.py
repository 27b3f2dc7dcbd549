"""Audit records as a FHIR R4 ``Bundle`` of ``AuditEvent`` resources.

Mapping (FHIR R4 AuditEvent, which follows the DICOM audit message):

* ``type`` is the DICOM event ID (DCM 1101xx; medai's model run uses its local
  scheme), ``subtype`` the event type code when there is one;
* ``action`` and ``outcome`` are the DICOM EventActionCode and EventOutcomeIndicator;
* ``agent`` is the OS user (and AE title) that caused the event, ``source`` this host;
* ``entity`` holds the patient (by pseudonym, or clear identifiers when revealed),
  the study (Study Instance UID) and the record's details.

Resource ids are the record hashes, so an exported event can be traced back to its
line in the trail.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
PSEUDONYM_SYSTEM = "urn:medai:pseudonym"


def _coding(code: Mapping[str, str]) -> dict[str, str]:
    system = DCM_SYSTEM if code.get("scheme") == "DCM" else str(code.get("scheme"))
    return {"system": system, "code": str(code["code"]), "display": str(code["display"])}


def _entities(rec: Mapping[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for part in rec.get("participants", ()):
        if part.get("type") == "patient":
            clear = part.get("clear") or {}
            ident = ({"system": "urn:medai:patient-id", "value": clear["id"]} if "id" in clear else
                     {"system": PSEUDONYM_SYSTEM, "value": part.get("pseudonym") or part.get("name_pseudonym")})
            entity: dict[str, Any] = {
                "what": {"identifier": ident},
                "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
                "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"},
            }
            if "name" in clear:
                entity["name"] = clear["name"]
            out.append(entity)
        elif part.get("type") == "study":
            entity = {
                "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                "role": {"system": OBJECT_ROLE, "code": "3", "display": "Report"},
            }
            if part.get("study_uid"):
                entity["what"] = {"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{part['study_uid']}"}}
            details = [{"type": k, "valueString": str(part[k])} for k in ("series_uid",) if part.get(k)]
            if part.get("instances"):
                details.append({"type": "instances", "valueString": json.dumps(part["instances"], sort_keys=True)})
            if details:
                entity["detail"] = details
            out.append(entity)
    if rec.get("detail"):
        out.append({
            "type": {"system": ENTITY_TYPE, "code": "4", "display": "Other"},
            "description": "medai event detail",
            "detail": [{"type": "detail", "valueString": json.dumps(rec["detail"], sort_keys=True)}],
        })
    return out


def audit_event(rec: Mapping[str, Any]) -> dict[str, Any]:
    """One AuditEvent resource for one audit record (as read from the trail)."""
    actor = rec.get("actor", {})
    agent: dict[str, Any] = {
        "type": {"coding": [{"system": DCM_SYSTEM, "code": "110150", "display": "Application"}]},
        "who": {"display": f"{actor.get('user', '?')} ({actor.get('role', '?')}, pid {actor.get('pid', '?')})"},
        "altId": str(actor.get("session", "")),
        "requestor": True,
    }
    if actor.get("ae_title"):
        agent["name"] = str(actor["ae_title"])
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(rec["hash"]),
        "type": _coding(rec["code"]),
        "action": rec["action"],
        "recorded": rec["time"],
        "outcome": str(rec["outcome"]),
        "agent": [agent],
        "source": {
            "site": str(rec.get("host", "")),
            "observer": {"display": f"medai on {rec.get('host', '')}"},
            "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
        "entity": _entities(rec),
    }
    if rec.get("subtype"):
        event["subtype"] = [_coding(rec["subtype"])]
    if rec.get("outcome_text") and rec.get("outcome") != 0:
        event["outcomeDesc"] = str(rec["outcome_text"])
    if not event["entity"]:
        del event["entity"]
    return event


def bundle(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """A FHIR R4 ``collection`` Bundle of AuditEvents."""
    entries = [{"fullUrl": f"urn:medai:audit:{rec['hash']}", "resource": audit_event(rec)} for rec in records]
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}
