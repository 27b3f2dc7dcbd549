"""Audit trail speed: durable single records, bulk appends, and verification of a
100,000-record trail, against references measured in the same run:

* verify vs. "parse only" (read every line and ``json.loads`` it: what any checker
  that looks at the records must at least do) and vs. one SHA-256 over the file;
* durable ``audit.record`` vs. a bare ``write`` + ``fsync`` of a line of the same size
  (the floor any fail-closed logger pays).

Run: ``.venv/bin/python bench/audit.py [--records 100000]`` (uses a temporary MEDAI_HOME).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--single", type=int, default=200, help="durable single records to time")
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="medai-bench-")
    os.environ["MEDAI_HOME"] = home
    from medai.compliance import audit, trail, verify

    # durable single records vs bare write+fsync of the same bytes
    t0 = time.perf_counter()
    for i in range(args.single):
        audit.record("instances_accessed", patient_id=f"P{i}", study_uid=f"1.2.3.{i}", detail={"i": i})
    single = (time.perf_counter() - t0) / args.single
    line = trail.trail_path().read_bytes().splitlines(keepends=True)[-1]
    fd = os.open(os.path.join(home, "floor.bin"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    t0 = time.perf_counter()
    for _ in range(args.single):
        os.write(fd, line)
        os.fsync(fd)
    floor = (time.perf_counter() - t0) / args.single
    os.close(fd)

    # bulk: the rest of the trail, in batches (one lock + fsync per batch)
    t0 = time.perf_counter()
    batch = 5_000
    done = len(list(trail.iter_lines()))
    while done < args.records:
        n = min(batch, args.records - done)
        bodies = [audit.build("instances_accessed", patient_id=f"P{(done + k) % 977}",
                              study_uid=f"1.2.826.0.1.{done + k}", detail={"i": done + k}) for k in range(n)]
        trail.append(bodies)
        done += n
    bulk = time.perf_counter() - t0
    size = trail.trail_path().stat().st_size

    t0 = time.perf_counter()
    report = verify.verify()
    t_verify = time.perf_counter() - t0
    assert report.ok and report.records == done, report.problems

    t0 = time.perf_counter()
    with open(trail.trail_path(), "rb") as fh:
        parsed = sum(1 for line in fh if json.loads(line))
    t_parse = time.perf_counter() - t0
    t0 = time.perf_counter()
    hashlib.sha256(trail.trail_path().read_bytes()).hexdigest()
    t_sha = time.perf_counter() - t0
    assert parsed == done

    print(f"trail: {done} records, {size / 1e6:.1f} MB, {report.checkpoints} signed checkpoints")
    print(f"durable record():       {single * 1e3:7.2f} ms/record  (bare write+fsync {floor * 1e3:.2f} ms; "
          f"ratio {single / floor:.2f}x)")
    print(f"bulk append:            {bulk:7.2f} s  ({(done - args.single) / bulk:,.0f} records/s)")
    print(f"verify:                 {t_verify:7.2f} s  ({done / t_verify:,.0f} records/s)")
    print(f"reference parse-only:   {t_parse:7.2f} s  -> verify/parse {t_verify / t_parse:.2f}x")
    print(f"reference sha256(file): {t_sha:7.2f} s  -> verify/sha256 {t_verify / t_sha:.1f}x")


if __name__ == "__main__":
    main()
