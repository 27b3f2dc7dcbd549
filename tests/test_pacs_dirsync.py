"""Group commit of directory fsyncs (``medai.pacs.store.DirSync``): every
caller returns only after an fsync that began after its change, and
concurrent callers share fsyncs."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from medai.pacs import store


def test_each_change_is_covered_by_an_fsync_started_after_it(tmp_path: Path, monkeypatch) -> None:
    changed: set[int] = set()
    lock = threading.Lock()
    completed: list[frozenset[int]] = []  # what each finished fsync covered (changes made before it began)
    real = store.fsync_dir

    def slow_fsync(path: Path) -> None:
        with lock:
            covered = frozenset(changed)
        real(path)
        time.sleep(0.02)  # a slow disk: callers pile up behind the running fsync
        with lock:
            completed.append(covered)

    monkeypatch.setattr(store, "fsync_dir", slow_fsync)
    sync = store.DirSync()
    failures: list[int] = []
    start = threading.Barrier(12)

    def writer(i: int) -> None:
        start.wait()
        for round_ in range(5):
            ident = i * 100 + round_
            with lock:
                changed.add(ident)
            sync.after_change(tmp_path)
            with lock:
                if not any(ident in covered for covered in completed):
                    failures.append(ident)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failures
    assert len(changed) == 60
    assert len(completed) < 60  # shared, not one per change
    assert sync._state == {}  # nothing left pending


def test_a_failed_fsync_reaches_its_caller_and_the_next_one_retries(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def flaky(path: Path) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(store, "fsync_dir", flaky)
    sync = store.DirSync()
    with pytest.raises(OSError):
        sync.after_change(tmp_path)
    sync.after_change(tmp_path)
    assert len(calls) == 2


def test_store_put_uses_one_fsync_per_lone_write(tmp_path: Path, monkeypatch) -> None:
    calls: list[Path] = []
    real = store.fsync_dir
    monkeypatch.setattr(store, "fsync_dir", lambda p: (calls.append(p), real(p)))
    st = store.StudyStore(tmp_path / "s")
    st.put(b"x" * 10, "1.2.3", "1.2.3.4", "1.2.3.4.5")  # new series: study/store dirs synced too
    calls.clear()
    stored = st.put(b"y" * 10, "1.2.3", "1.2.3.4", "1.2.3.4.6")
    assert calls == [stored.path.parent]
    assert stored.path.read_bytes() == b"y" * 10
