"""The CI-sized slice of the network fuzzing (``bench/fuzz_pacs.py`` runs
>= 10^6 executions), and every input the fuzzer found crashing, replayed.

Regressions live in ``tests/data/pacs-fuzz-regressions`` (the harness's input
format: first byte the target, then the bytes). Found so far: an
A-ASSOCIATE-RQ proposing an unsupported abstract syntax with a non-ASCII
transfer syntax made the A-ASSOCIATE-AC encoder raise UnicodeEncodeError
(the association then ended without an answer)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pacs_peers import free_port, needs_dcmtk

from medai.pacs import pdu
from medai.pacs.scp import Listener, ListenerConfig

REPO = Path(__file__).resolve().parents[1]
REGRESSIONS = REPO / "tests" / "data" / "pacs-fuzz-regressions"
HARNESS = REPO / "bench" / "fuzz_pacs.py"


def _harness(tmp_path: Path):  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import fuzz_pacs
    finally:
        sys.path.remove(str(REPO / "bench"))
    return fuzz_pacs.Harness(tmp_path / "artifacts", 10**9, 5000.0, None)


def test_found_crashes_stay_fixed(tmp_path: Path) -> None:
    found = sorted(REGRESSIONS.iterdir())
    assert found
    harness = _harness(tmp_path)
    for path in found:
        harness(path.read_bytes())
    assert (harness.crashes, harness.hangs) == (0, 0)


def test_rejected_context_with_a_non_ascii_transfer_syntax_is_answered(medai_home: Path) -> None:
    """The first fuzzing finding, end to end: the listener answers with an
    A-ASSOCIATE-AC (the odd context rejected, Verification accepted)."""
    import socket

    rq = pdu.encode_associate_rq("FUZZ", "MEDAI", [(1, pdu.VERIFICATION_SOP_CLASS, ["1.2.840.10008.1.2"])])
    odd = pdu.item(0x20, bytes((3, 0, 0, 0)) + pdu.item(0x30, b"1.2.3.4") + pdu.item(0x40, "1.2.\xe9".encode("latin-1")))
    body = rq[6:]
    user = body.index(b"\x50\x00")  # the user information item follows the contexts
    body = body[:user] + odd + body[user:]
    lst = Listener(ListenerConfig(port=free_port(), acse_timeout=2.0))
    lst.start()
    try:
        with socket.create_connection(("127.0.0.1", lst.port), timeout=5) as s:
            s.sendall(pdu.pdu(pdu.A_ASSOCIATE_RQ, body))
            assert s.recv(1) == bytes((pdu.A_ASSOCIATE_AC,))
    finally:
        lst.stop()


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.skipif(not needs_dcmtk, reason="dcmtk not installed")
def test_fuzz_slice_from_captured_seeds(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(HARNESS), "--runs", "1500", "--report", str(report),
                           "--artifacts", str(tmp_path / "artifacts")], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert report.exists(), done.stdout[-2000:] + done.stderr[-2000:]
    figures = json.loads(report.read_text())
    assert figures["executions"] == 1500
    assert (figures["crashes"], figures["hangs"]) == (0, 0), done.stderr[-2000:]
    assert figures["largest_single_read"] <= figures["read_bound"]
    assert figures["max_allocation_bytes"] < 16 * 1024**2
