"""Input limits for untrusted DICOM: everything that could exhaust memory, recurse
without bound or escape a directory is refused here, before pydicom or a codec
gets to allocate for it.

Why a separate module: the index (headers only) and the volume loader (pixels)
must apply the *same* limits, and a reviewer should find them in one place.

The limits:

* **Element lengths.** A data element whose declared length runs past the end of
  the file is a truncated file (or a forged length); it is reported before a read
  of that size is attempted (a ``read(0xFFFFFFF0)`` would otherwise allocate 4 GiB).
* **Decompression bombs.** The decoded size of the pixel data (Rows x Columns x
  Frames x Samples x BitsAllocated / 8) must be at most :data:`MAX_PIXEL_BYTES`;
  for native (uncompressed) transfer syntaxes it must be backed by the bytes in
  the file; for encapsulated ones the ratio decoded / stored may not exceed
  :data:`MAX_COMPRESSION_RATIO` once the image is large. Deflated datasets are
  inflated with a hard output cap instead of pydicom's unbounded ``zlib.decompress``.
* **Nesting.** Sequences nested deeper than :data:`MAX_SEQUENCE_DEPTH` are refused
  (pydicom parses them recursively).
* **UIDs.** A UID is a key, never a path: anything but digits and dots (after
  stripping padding), or longer than 64 characters, is refused.
"""

from __future__ import annotations

import io
import os
import re
import zlib
from pathlib import Path
from typing import Any, Literal

import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.fileutil import read_undefined_length_value
from pydicom.tag import SequenceDelimiterTag, Tag

from medai.errors import DicomInputError, UnsafeInputError

#: Largest decoded pixel data of one instance (bytes). 4 GiB holds e.g. 2,000
#: frames of 1024 x 1024 x 16 bit; anything larger is refused as a likely bomb.
MAX_PIXEL_BYTES = 4 * 1024**3
#: Largest decoded / stored ratio accepted for encapsulated pixel data once the
#: decoded size exceeds :data:`RATIO_CHECK_FLOOR`. Lossless codecs reach 2-5x,
#: lossy JPEG/JPEG 2000 20-100x; a blank RLE frame about 64x.
MAX_COMPRESSION_RATIO = 2000
#: Below this decoded size the compression ratio is not checked (small images
#: of constant value legitimately compress very well).
RATIO_CHECK_FLOOR = 64 * 1024**2
#: Deepest sequence nesting accepted (real objects: functional groups ~4, SR trees ~15).
MAX_SEQUENCE_DEPTH = 48
#: Largest single element value accepted in a header (besides pixel data).
MAX_ELEMENT_BYTES = 256 * 1024**2
#: Largest inflated dataset for the Deflated transfer syntax.
MAX_INFLATED_BYTES = MAX_PIXEL_BYTES + 64 * 1024**2

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class TruncatedInputError(DicomInputError):
    """The file ends inside a data element (cut short in transfer or on disk)."""


class _DeflatedDataset(Exception):
    """Raised by the guarded reader when pydicom asks for the whole rest of the
    file, which it only does to inflate a Deflated transfer syntax dataset."""


class _GuardedReader(io.BufferedReader):
    """A file reader that refuses reads running past the end of the file.

    pydicom reads an element value with ``fp.read(length)`` using the declared
    length; checking here catches forged and truncated lengths before the
    allocation, without re-implementing the DICOM parser.
    """

    def __init__(self, raw: io.FileIO, size: int, path: Path) -> None:
        super().__init__(raw, buffer_size=65536)
        self._size = size
        self._path = path
        self.short_read = False

    @property
    def size(self) -> int:
        return self._size

    def remaining(self) -> int:
        return self._size - self.tell()

    def read(self, n: int | None = -1) -> bytes:  # type: ignore[override]
        if n is None or n < 0:
            # pydicom reads "everything left" only to inflate a Deflated dataset.
            raise _DeflatedDataset()
        if n > 16:  # tag/VR/length headers: pydicom handles short reads at the end itself
            remaining = self._size - self.tell()
            if n > remaining:
                if n > MAX_ELEMENT_BYTES and n > 2 * self._size:
                    raise UnsafeInputError(
                        self._path, f"a data element declares {n} bytes in a file of {self._size} bytes "
                        "(absurd element length)")
                raise TruncatedInputError(
                    self._path, f"truncated: a data element needs {n} bytes at offset {self.tell()} "
                    f"but the file ends after {max(remaining, 0)}")
            if n > MAX_ELEMENT_BYTES:
                raise UnsafeInputError(self._path, f"a data element of {n} bytes exceeds the "
                                       f"{MAX_ELEMENT_BYTES}-byte limit")
        data = super().read(n)
        # pydicom tolerates short reads at the end of a file; a short read is
        # only clean when it is the 8-byte tag read exactly at the end.
        if len(data) < n and (len(data) > 0 or n != 8):
            self.short_read = True
        return data


def open_guarded(path: str | os.PathLike[str]) -> _GuardedReader:
    """Open ``path`` for pydicom with element-length checks (caller closes it)."""
    p = Path(path)
    raw = io.FileIO(p, "r")
    size = os.fstat(raw.fileno()).st_size
    return _GuardedReader(raw, size, p)


def _at_pixel_data(tag: Any, vr: Any, length: int) -> bool:
    return int(tag) in (0x7FE00010, 0x7FE00008, 0x7FE00009)


def read_dataset_safely(path: str | os.PathLike[str], *, stop_before_pixels: bool = False,
                        specific_tags: list[int] | None = None, force: bool = False,
                        size: int | None = None) -> tuple[FileDataset, int | None]:
    """Read one file with every limit in this module applied.

    Returns the dataset and, when ``stop_before_pixels`` is set, the declared
    length of the Pixel Data element that follows (``0xFFFFFFFF`` for
    encapsulated data, ``None`` when the file has no pixel data). A native pixel
    element that runs past the end of the file raises :class:`TruncatedInputError`.
    """
    p = Path(path)
    fast = _read_header_from_prefix(p, specific_tags, force, size, pixels=not stop_before_pixels)
    if fast is not None:
        check_depth(fast[0], p, parse=not stop_before_pixels)
        return fast
    with open_guarded(p) as fp:
        try:
            # Always stop at the pixel data: it is read below by one bounded read,
            # and whatever trails it (padding, signatures) is never parsed.
            ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=specific_tags,
                                 force=force)
            if fp.tell() > fp.size or fp.short_read:
                raise TruncatedInputError(p, "truncated: the file ends inside a header element")
            if stop_before_pixels:
                pixel_length = _peek_pixel_length(fp, ds, p)
            else:
                pixel_length = _read_pixel_element(fp, ds, p)
        except _DeflatedDataset:
            fp.seek(0)
            preamble = read_preamble(fp, force)
            file_meta = _read_file_meta_info(fp)
            ds, pixel_length = _read_deflated(fp, p, preamble, file_meta, stop_before_pixels,
                                              specific_tags)
    check_depth(ds, p, parse=not stop_before_pixels)
    return ds, pixel_length


#: Headers are parsed from the first bytes of a file held in memory (most
#: headers are a few KB); larger headers take the guarded file path.
HEADER_PREFIX_BYTES = 256 * 1024


def _read_header_from_prefix(path: Path, specific_tags: list[int] | None, force: bool,
                             size: int | None = None, *, pixels: bool = False) -> tuple[FileDataset, int | None] | None:
    """Fast header read from an in-memory prefix of the file.

    An in-memory buffer cannot be asked for more bytes than it holds (a forged
    length just yields a short value), so no per-read guard is needed; the short
    value is then reported as truncation. Returns ``None`` when the prefix does
    not hold the whole header or the dataset is deflated (guarded path instead).
    With ``pixels`` (a full read) only a file that fits the prefix whole is read here,
    its pixel data element included (most single-frame instances: the guarded reader's
    check on every read cost a third of a series' read time).
    """
    if size is None:
        size = path.stat().st_size
    if pixels and size > HEADER_PREFIX_BYTES:
        return None
    with open(path, "rb") as fh:
        data = fh.read(min(size, HEADER_PREFIX_BYTES))
    if pixels and len(data) != size:
        return None  # the file changed size under us: the guarded path reads what is there
    if b"1.2.840.10008.1.2.1.99" in data[:4096]:
        return None  # deflated: needs the bounded inflater
    buf = io.BytesIO(data)
    whole = len(data) == size
    try:
        ds = pydicom.dcmread(buf, stop_before_pixels=True, specific_tags=specific_tags, force=force)
    except Exception:
        if whole:
            raise
        return None  # the prefix ends inside a sequence: read the file itself
    pos = buf.tell()
    if not whole and pos + 12 > len(data):
        return None  # the header (or the pixel element header) continues past the prefix
    if pos > len(data):  # an unread (skipped) element runs past the end
        raise TruncatedInputError(path, "truncated: the file ends inside a data element")
    if pos + 8 <= len(data):  # stopped at the pixel data
        if pixels:
            try:
                return ds, _read_pixel_element(buf, ds, path)
            except EOFError:  # encapsulated fragments without their closing delimiter
                raise TruncatedInputError(path, "truncated: the file ends inside the pixel data") from None
        return ds, _peek_pixel_length(buf, ds, path, size=size)
    # Reached the end of the file without pixel data: was the last element complete?
    keys = list(ds.keys())
    if not keys and not len(getattr(ds, "file_meta", None) or ()):
        raise TruncatedInputError(path, "truncated: nothing follows the DICOM preamble")
    last = ds.get_item(keys[-1]) if keys else None
    if isinstance(last, RawDataElement) and last.value is not None and last.length != 0xFFFFFFFF:
        if len(last.value) < last.length:
            raise TruncatedInputError(path, f"truncated: element {last.tag} declares {last.length} "
                                      f"bytes but the file ends after {len(last.value)}")
        if not specific_tags and last.value_tell + last.length < size:
            raise TruncatedInputError(path, "truncated: the file ends inside a data element header")
    return ds, None


def _read_deflated(fp: "_GuardedReader", path: Path, preamble: bytes | None, file_meta: Dataset,
                   stop_before_pixels: bool,
                   specific_tags: list[int] | None) -> tuple[FileDataset, int | None]:
    """Inflate a Deflated Explicit VR dataset with an output cap (pydicom's own
    path inflates without a bound: a 1 MB file can become 1 GB)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    chunks: list[bytes] = []
    total = 0
    while True:
        block = fp.read(min(1 << 20, max(fp.remaining(), 0)))
        if not block:
            break
        out = inflater.decompress(block, MAX_INFLATED_BYTES + 1 - total)
        total += len(out)
        chunks.append(out)
        if total > MAX_INFLATED_BYTES or inflater.unconsumed_tail:
            raise UnsafeInputError(path, f"deflated dataset inflates beyond {MAX_INFLATED_BYTES} "
                                   "bytes (decompression bomb)")
    chunks.append(inflater.flush())
    buffer = DicomBytesIO(b"".join(chunks))
    stop = _at_pixel_data if stop_before_pixels else None
    tags = [Tag(t) for t in specific_tags] if specific_tags else None
    dataset = read_dataset(buffer, False, True, stop_when=stop, specific_tags=tags)
    ds = FileDataset(str(path), dataset, preamble, file_meta, False, True)
    ds.set_original_encoding(False, True, dataset._character_set)
    if stop_before_pixels:
        return ds, _peek_pixel_length(buffer, ds, path)
    return ds, _read_pixel_element(buffer, ds, path)


def _read_pixel_element(fp: Any, ds: Dataset, path: Path) -> int | None:
    """Read the pixel data element at the current position into ``ds`` and
    return its declared length (``None`` when there is none)."""
    start = fp.tell()
    length = _peek_pixel_length(fp, ds, path)
    if length is None:
        return None
    fp.seek(start)
    little = ds.is_little_endian if ds.is_little_endian is not None else True
    order: Literal["little", "big"] = "little" if little else "big"
    head = fp.read(8)
    tag = Tag(int.from_bytes(head[0:2], order), int.from_bytes(head[2:4], order))
    if ds.is_implicit_VR:
        vr = {0x7FE00008: "OF", 0x7FE00009: "OD"}.get(int(tag), "OW")
    else:
        vr = head[4:6].decode("ascii", "replace")
        if vr in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
            fp.read(4)
    if length == 0xFFFFFFFF:
        value = read_undefined_length_value(fp, little, SequenceDelimiterTag)
        elem = DataElement(tag, "OB" if vr not in ("OB", "OW") else vr, value,
                           is_undefined_length=True)
    else:
        value = fp.read(length)
        elem = DataElement(tag, vr, value)
    ds[tag] = elem
    return length


def _peek_pixel_length(fp: Any, ds: Dataset, path: Path, size: int | None = None) -> int | None:
    """Declared length of the pixel data element at the current position (pydicom
    rewinds to its start when ``stop_before_pixels`` stops there); ``None`` when
    no pixel data follows. ``size``: the file size when ``fp`` holds a prefix."""
    here = fp.tell()
    size = _size_of(fp) if size is None else size
    if size - here < 8:
        return None
    head = fp.read(8)
    little = ds.is_little_endian if ds.is_little_endian is not None else True
    order: Literal["little", "big"] = "little" if little else "big"
    group, elem = int.from_bytes(head[0:2], order), int.from_bytes(head[2:4], order)
    if group != 0x7FE0 or elem not in (0x0010, 0x0008, 0x0009):
        return None
    if ds.is_implicit_VR:
        length = int.from_bytes(head[4:8], order)
    elif head[4:6] in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN"):
        if size - fp.tell() < 4:
            raise TruncatedInputError(path, "truncated: the file ends inside the pixel data header")
        length = int.from_bytes(fp.read(4), order)
    else:
        length = int.from_bytes(head[6:8], order)
    if length != 0xFFFFFFFF and length > size - fp.tell():
        raise TruncatedInputError(path, f"truncated: pixel data declares {length} bytes but only "
                                  f"{size - fp.tell()} remain in the file")
    return length


def _size_of(fp: Any) -> int:
    if isinstance(fp, _GuardedReader):
        return fp.size
    here = fp.tell()
    fp.seek(0, os.SEEK_END)
    size = int(fp.tell())
    fp.seek(here)
    return size


def check_depth(ds: Dataset, path: Path, limit: int = MAX_SEQUENCE_DEPTH, *,
                parse: bool = True) -> None:
    """Refuse datasets whose sequences nest deeper than ``limit``.

    Walks iteratively (the check itself cannot overflow the stack). With
    ``parse`` it parses each sequence level as it goes: pydicom keeps
    defined-length sequences raw until first access, so a nested-sequence bomb
    would otherwise go off later, in whatever code touches it first. Without
    ``parse`` (the header index, which never touches those sequences) only the
    sequences pydicom already parsed are walked.
    """
    stack: list[tuple[Dataset, int]] = [(ds, 0)]
    try:
        while stack:
            node, depth = stack.pop()
            for tag in list(node.keys()):
                raw = node.get_item(tag)
                if getattr(raw, "VR", None) != "SQ" or int(tag) == 0x7FE00010:
                    continue
                if not parse and isinstance(raw, RawDataElement):
                    continue
                if depth + 1 > limit:
                    raise UnsafeInputError(path, f"sequences nested deeper than {limit} levels")
                value = node[tag].value
                for item in value or ():
                    stack.append((item, depth + 1))
    except RecursionError:
        raise UnsafeInputError(path, "sequences nested too deeply to parse") from None


def check_uid(value: Any, path: Path | None, what: str) -> str:
    """Return ``value`` as a clean UID string, or refuse it. UIDs are keys and may
    end up in file names downstream: anything path-like is refused here."""
    text = str(value if value is not None else "").strip().rstrip("\x00").strip()
    if not text:
        raise DicomInputError(path, f"missing {what}")
    if len(text) > 64 or not _UID_RE.match(text):
        shown = text[:64].encode("ascii", "backslashreplace").decode()
        raise UnsafeInputError(path, f"{what} is not a valid UID (digits and dots, at most 64 "
                               f"characters): {shown!r}")
    return text


def expected_pixel_bytes(ds: Dataset) -> int:
    """Decoded size in bytes the header declares for the pixel data."""
    rows = int(ds.get("Rows", 0) or 0)
    cols = int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if min(rows, cols, frames, samples) < 0 or bits < 0:
        return -1
    return (rows * cols * frames * samples * bits + 7) // 8


def check_pixel_budget(ds: Dataset, path: Path, stored_bytes: int | None,
                       encapsulated: bool) -> int:
    """:func:`check_pixel_budget_values` with the sizes read from ``ds``."""
    dims = tuple(int(ds.get(k, d) or d) for k, d in (("Rows", 0), ("Columns", 0), ("NumberOfFrames", 1),
                                                     ("SamplesPerPixel", 1), ("BitsAllocated", 0)))
    return check_pixel_budget_values(dims, path, stored_bytes, encapsulated)  # type: ignore[arg-type]


def check_pixel_budget_values(dims: tuple[int, int, int, int, int], path: Path,
                              stored_bytes: int | None, encapsulated: bool) -> int:
    """Refuse pixel data whose declared decoded size is absurd or not backed by
    the stored bytes (decompression bombs, forged Rows/Columns/NumberOfFrames).

    ``stored_bytes`` is the stored pixel data size (for encapsulated data the
    file size is a fine upper bound). Returns the declared decoded size.
    """
    rows, cols, frames, samples, bits = dims
    need = -1 if min(rows, cols, frames, samples, bits) < 0 else (
        rows * cols * frames * samples * bits + 7) // 8
    if need < 0:
        raise UnsafeInputError(path, "negative Rows/Columns/NumberOfFrames/BitsAllocated")
    if need > MAX_PIXEL_BYTES:
        raise UnsafeInputError(path, f"declared pixel data of {need} bytes "
                               f"(Rows x Columns x Frames x Samples x Bits) exceeds the "
                               f"{MAX_PIXEL_BYTES}-byte limit (decompression bomb?)")
    if stored_bytes is None:
        return need
    if not encapsulated:
        if bits != 1 and stored_bytes + 1 < need:
            raise UnsafeInputError(path, f"header declares {need} bytes of pixel data but the "
                                   f"file holds {stored_bytes} (forged size or truncated)")
    elif need > RATIO_CHECK_FLOOR and need > MAX_COMPRESSION_RATIO * max(stored_bytes, 1):
        raise UnsafeInputError(path, f"header declares {need} decoded bytes from {stored_bytes} "
                               f"stored bytes (ratio over {MAX_COMPRESSION_RATIO}: decompression bomb?)")
    return need


_QUOTED = re.compile(r"b?'[^']{0,400}'|b?\"[^\"]{0,400}\"")


def describe_error(exc: BaseException, limit: int = 160) -> str:
    """A parser exception as a one-line reason without the values it quotes.

    Third-party messages often quote the offending value (``invalid literal
    for int(): 'DOE^JOHN'``); a value from a header may be a patient
    identifier, so quoted literals are replaced by ``<value>``.
    """
    text = _QUOTED.sub("<value>", str(exc).replace("\n", " "))
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_dicom_preamble(path: Path) -> bool:
    """Cheap test: does the file carry the 'DICM' magic at offset 128?"""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


__all__ = [
    "MAX_PIXEL_BYTES", "MAX_COMPRESSION_RATIO", "MAX_SEQUENCE_DEPTH", "MAX_ELEMENT_BYTES",
    "TruncatedInputError", "open_guarded", "read_dataset_safely", "check_depth", "check_uid",
    "check_pixel_budget", "check_pixel_budget_values", "expected_pixel_bytes", "describe_error", "is_dicom_preamble",
]
