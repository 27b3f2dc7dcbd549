"""Nothing leaves the machine, checked by the kernel's view rather than medai's own:

* the CLI's main job (``medai demo``: the installed models on the bundled real T1
  study, SEG/NIfTI/JSON outputs, audit check, signed attestation) under ``strace -f -e trace=network`` makes no connect/sendto/sendmsg to a
  non-loopback address — this also sees native code such as onnxruntime's;
* the same job inside a network namespace with no interfaces (``unshare -rn``)
  gives identical outputs;
* a canary Patient ID and name planted in the study never appear in clear in
  MEDAI_HOME (trail, checkpoints, keys, caches) or in the job's log output;
* with the audit directory read-only the job refuses to start.

The strace parser is checked against a process that does connect to a public
address, so the test can fail.
"""

from __future__ import annotations

import csv
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MEDAI = [sys.executable, "-m", "medai"]
_SYSCALL = re.compile(r"\b(connect|sendto|sendmsg|sendmmsg)\((.*)")
_INET = re.compile(r'sa_family=AF_INET6?,.*?(?:inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6?, "([^"]+)"\))')


def _have(tool: str, *probe: str) -> bool:
    return shutil.which(tool) is not None and subprocess.run([tool, *probe], capture_output=True).returncode == 0


HAVE_STRACE = _have("strace", "-f", "-e", "trace=network", "true")
HAVE_NETNS = _have("unshare", "-rn", "true")


def non_loopback_sends(strace_log: str) -> list[str]:
    """Lines of an strace log where a process connected or sent to a non-loopback
    IPv4/IPv6 address (Unix and netlink sockets are local)."""
    bad = []
    for line in strace_log.splitlines():
        match = _SYSCALL.search(line)
        if not match:
            continue
        for v4, v6 in _INET.findall(match.group(2)):
            addr = ipaddress.ip_address(v4 or v6)
            mapped = getattr(addr, "ipv4_mapped", None)
            if not (addr.is_loopback or (mapped is not None and mapped.is_loopback)):
                bad.append(line.strip())
    return bad


@pytest.mark.skipif(not (HAVE_STRACE and HAVE_NETNS), reason="needs strace and unshare -rn")
def test_strace_parser_sees_a_real_public_connect(tmp_path):
    """Positive control, with no guard and no network: the connect to a public address is
    attempted by the kernel (and fails: the namespace has no interfaces) and the parser
    reports it; a loopback connect is not reported."""
    log = tmp_path / "strace.log"
    code = ("import socket\nfor a in [('127.0.0.1', 9), ('203.0.113.1', 443)]:\n"
            "    try: socket.create_connection(a, timeout=1)\n    except OSError: pass\n")
    subprocess.run(["unshare", "-rn", "strace", "-f", "-qq", "-e", "trace=network", "-o", str(log),
                    sys.executable, "-c", code], capture_output=True, timeout=60, check=True)
    bad = non_loopback_sends(log.read_text())
    assert len(bad) == 1 and "203.0.113.1" in bad[0]


CANARY_ID = "CANARY-NET-60417"
CANARY_NAME = "Zqcanary^Ottoline"


@pytest.fixture(scope="module")
def t1_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled real T1 study (synthetic headers) with canary patient identity planted."""
    import pydicom

    from medai.data import demo_t1_dir

    out = tmp_path_factory.mktemp("canary-t1")
    for path in sorted(demo_t1_dir().glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.PatientName = CANARY_ID, CANARY_NAME
        ds.save_as(out / path.name)
    return out


def _canary_free(text: str) -> bool:
    low = text.lower()
    return all(c.lower() not in low for c in (CANARY_ID, CANARY_NAME, CANARY_NAME.split("^")[0]))


def _main_job(work: Path, study: Path, wrap: list[str]) -> subprocess.CompletedProcess[str]:
    """``medai demo``: every installed model on the study, outputs, audit check and a
    signed attestation (what scripts/demo runs)."""
    env = {**os.environ, "MEDAI_HOME": str(work / "home"), "PYTHONPATH": str(REPO)}
    env.pop("MEDAI_CONFIG", None)
    return subprocess.run([*wrap, *MEDAI, "--json", "demo", "--study", str(study), "--out", str(work / "out")],
                          capture_output=True, text=True, timeout=540, env=env, cwd=work)


# "breakdown": the parts of the planner's prediction (already scrubbed as "predicted"): they
# start from the memory resident when the run plans, which depends on how far the background
# session thread has got by then.
_VOLATILE = re.compile(r"time|timing|measured|seconds|elapsed|duration|started|finished|created|issued|uid|pid|run_id|predicted|breakdown|"
                       r"session|host|signature|head",
                       re.IGNORECASE)


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if not _VOLATILE.search(k)}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def _content(path: Path) -> Any:
    """What must be identical between two runs of the job: JSON/CSV without clock and
    UID fields, DICOM pixel data and coded content, NIfTI voxels, other bytes."""
    name = path.name
    if name.endswith(".json"):
        return _scrub(json.loads(path.read_text()))
    if name.endswith(".csv"):
        return _scrub([dict(r) for r in csv.DictReader(path.open())])
    if name.endswith(".dcm"):
        import pydicom

        ds = pydicom.dcmread(path)
        keep = {k: str(ds.get(k, "")) for k in ("SOPClassUID", "Modality", "SeriesDescription", "Rows",
                                                 "Columns", "NumberOfFrames")}
        if "PixelData" in ds:
            keep["pixels"] = __import__("hashlib").sha256(ds.PixelData).hexdigest()
        return keep
    if name.endswith((".nii", ".nii.gz")):
        import SimpleITK as sitk

        image = sitk.ReadImage(str(path))
        return (image.GetSize(), image.GetSpacing(), sitk.GetArrayViewFromImage(image).tobytes())
    if name.endswith((".sqlite", ".db", ".db-wal", ".db-shm", ".log", ".lock")):
        return None  # state databases and logs carry timestamps by design
    return path.read_bytes()


def _outputs(work: Path) -> dict[str, Any]:
    return {str(p.relative_to(work)): _content(p) for p in sorted(work.rglob("*"))
            if p.is_file() and "home" not in p.relative_to(work).parts[:1]}


@pytest.mark.skipif(not (HAVE_STRACE and HAVE_NETNS), reason="needs strace and unshare -rn")
def test_main_job_sends_nothing_off_machine_and_runs_identically_without_network(tmp_path, t1_study):
    # Both runs use the same paths (paths appear in outputs); the first is moved aside.
    work = tmp_path / "job"
    work.mkdir()
    log = tmp_path / "strace.log"
    traced = _main_job(work, t1_study, ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=network",
                                        "-o", str(log)])
    first = tmp_path / "first"
    work.rename(first)
    work.mkdir()
    # same install keys, so pseudonymous study keys (folder names) match
    shutil.copytree(first / "home" / "keys", work / "home" / "keys")
    isolated = _main_job(work, t1_study, ["unshare", "-rn"])

    assert non_loopback_sends(log.read_text()) == []
    # no patient name or ID in clear in the trail, keys, caches or logs (outputs are DICOM
    # for the PACS and JSON for the user: they may name the patient)
    assert _canary_free(traced.stderr) and _canary_free(isolated.stderr)
    runs = first / "home" / "results"
    for path in (first / "home").rglob("*"):
        if path.is_file() and path.parent.parent != runs:  # a run's own outputs may name the patient
            assert _canary_free(path.read_bytes().decode("latin-1")), path
    assert (runs / "index.sqlite").is_file()  # the results index holds pseudonyms only (checked above)
    assert traced.returncode == isolated.returncode == 0, (traced.stderr[-2000:], isolated.stderr[-2000:])
    demo = json.loads(traced.stdout)  # the main job ran every automatic model, left the prompted one to a reader
    assert {r["model"] for r in demo["runs"]} == {"brain-extraction", "brain-volumetry"}
    assert demo["interactive"] == ["medsam-lite"] and demo["failures"] == [] and demo["audit"]["ok"]
    assert _scrub(json.loads(traced.stdout)) == _scrub(json.loads(isolated.stdout))
    a, b = _outputs(first), _outputs(work)
    assert a and a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name
    # both runs were audited, and the trails verify
    for home in (first / "home", work / "home"):
        env = {**os.environ, "MEDAI_HOME": str(home)}
        check = subprocess.run([*MEDAI, "audit", "verify"], capture_output=True, text=True, env=env, timeout=120)
        assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.skipif(not _have("unshare", "-rm", "true"), reason="needs unshare -rm for a read-only mount")
def test_main_job_fails_closed_with_read_only_audit_dir(tmp_path, t1_study):
    """With the audit directory read-only (a read-only bind mount, which binds root too)
    the job stops before processing the study, says why, and writes nothing."""
    home = tmp_path / "home"
    env = {**os.environ, "MEDAI_HOME": str(home)}
    subprocess.run([*MEDAI, "audit", "checkpoint"], check=True, capture_output=True, env=env, timeout=120)
    audit_dir = home / "audit"
    before = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", f'mount --bind -o ro "{audit_dir}" "{audit_dir}" && '
                           'exec "$@"', "sh", *MEDAI, "demo", "--study", str(t1_study), "--out",
                           str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "cannot open the audit trail (Read-only file system); the operation was not performed" in proc.stderr
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == before  # no output file at all
