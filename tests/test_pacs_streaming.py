"""Received datasets stream to disk: ``medai pacs listen`` (a subprocess)
receiving large instances from dcmtk ``storescu`` over parallel associations
keeps its peak memory bounded and stores every byte intact.

The full-size run (16 associations x 1 GiB) is ``bench/pacs_memory.py``; this
is its CI-sized slice: large enough that holding the datasets in memory, as
the listener used to, would exceed the bound several times over."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pacs_peers import (
    DCMTK_ENV,
    Listener,
    needs_dcmtk,
    peak_rss_bytes,
    stored_files,
    tail_sha256,
    write_large_instance,
)

pytestmark = [pytest.mark.network, pytest.mark.skipif(not needs_dcmtk, reason="dcmtk not installed")]

#: The Done-when bound of issue 18 for the listener's peak RSS.
RSS_BOUND = 300 * 1024**2


@pytest.mark.slow
def test_parallel_large_instances_stream_to_disk_in_bounded_memory(medai_home: Path, tmp_path: Path) -> None:
    size = 128 * 1024**2  # two of them held in memory (plus their joined copies) would be ~600 MB
    sent = [write_large_instance(tmp_path / f"big{i}.dcm", size, seed=i) for i in range(2)]
    lst = Listener(medai_home, "--no-worker").start()
    try:
        assert lst.proc is not None
        senders = [subprocess.Popen(["/usr/bin/storescu", "-aec", "MEDAI", "-aet", f"BIG{i}", "127.0.0.1",
                                     str(lst.port), str(tmp_path / f"big{i}.dcm")], env=DCMTK_ENV,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(2)]
        for proc in senders:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err.decode(errors="replace")[-800:]
        peak = peak_rss_bytes(lst.proc.pid)
    finally:
        lst.terminate()
    assert peak < RSS_BOUND, f"listener peak RSS {peak / 2**20:.0f} MiB"
    stored = stored_files(medai_home)
    assert set(stored) == {sop for sop, _ in sent}
    for sop, digest in sent:
        assert tail_sha256(stored[sop], size) == digest
    # Nothing left behind in the store's temporary folder.
    assert not list((medai_home / "store" / ".incoming").iterdir())
