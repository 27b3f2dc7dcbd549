"""A minimal DICOM header walker for the index.

Why not pydicom here: an index reads tens of thousands of headers and needs ~25
values from each. pydicom builds an element object for every element it meets;
this walker only steps over lengths and slices out the values asked for, which
is several times cheaper. It understands the Part 10 preamble and meta group,
explicit/implicit VR little endian and explicit big endian, sequences and items
of defined and undefined length, and stops at the pixel data.

Anything it is not sure about (no preamble, deflated dataset, header longer
than the bytes given, odd structure) returns ``None`` and the caller falls back
to pydicom. What it is sure about raises the same typed errors as
:mod:`medai.dicom.safety`: truncation, absurd lengths, nesting beyond the limit.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from medai.dicom.safety import MAX_SEQUENCE_DEPTH, TruncatedInputError
from medai.errors import UnsafeInputError

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
_IMPLICIT = "1.2.840.10008.1.2"
_BIG = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"


@dataclass
class Header:
    """Raw values of the requested top-level elements."""

    values: dict[int, bytes]
    vrs: dict[int, str]
    little_endian: bool
    implicit_vr: bool
    transfer_syntax_uid: str
    media_sop_class_uid: str
    #: Declared length of the pixel data element (``0xFFFFFFFF`` encapsulated), or None.
    pixel_length: int | None


class _NeedMore(Exception):
    """The bytes given end before the header does (caller reads more or falls back)."""


def _uid(value: bytes) -> str:
    return value.decode("latin-1").strip(" \x00")


def walk(data: bytes, size: int, wanted: frozenset[int] | set[int], path: Path) -> Header | None:
    """Parse the header in ``data`` (the first bytes of a file of ``size`` bytes)."""
    if len(data) < 132 or data[128:132] != b"DICM":
        return None
    whole = len(data) == size
    try:
        return _walk(data, size, wanted, path)
    except _NeedMore:
        if whole:
            raise TruncatedInputError(path, "truncated: the file ends inside a data element") from None
        return None
    except (struct.error, IndexError, ValueError):
        return None


def _walk(data: bytes, size: int, wanted: frozenset[int] | set[int], path: Path) -> Header | None:
    n = len(data)
    whole = n == size
    off = 132
    meta: dict[int, bytes] = {}
    # File meta group: always explicit VR little endian.
    while off + 8 <= n and data[off:off + 2] == b"\x02\x00":
        tag = 0x00020000 | struct.unpack_from("<H", data, off + 2)[0]
        vr = data[off + 4:off + 6]
        if not (vr.isalpha() and vr.isupper()):
            return None  # meta group not in explicit VR: a broken writer, let pydicom cope
        if vr in _LONG_VRS:
            if off + 12 > n:
                raise _NeedMore
            length = struct.unpack_from("<I", data, off + 8)[0]
            off += 12
        else:
            length = struct.unpack_from("<H", data, off + 6)[0]
            off += 8
        if length == _UNDEFINED or off + length > n:
            raise _NeedMore
        meta[tag] = data[off:off + length]
        off += length
    ts = _uid(meta.get(0x00020010, b""))
    if not ts or ts == _DEFLATED:
        return None
    implicit = ts == _IMPLICIT
    little = ts != _BIG
    e = "<" if little else ">"
    u16, u32, tag_fmt = struct.Struct(e + "H"), struct.Struct(e + "I"), struct.Struct(e + "HH")
    values: dict[int, bytes] = {}
    vrs: dict[int, str] = {}
    pixel_length: int | None = None
    # Nesting: each open sequence/item is (kind, end offset or None when undefined).
    stack: list[tuple[str, int | None]] = []
    while True:
        # Close defined-length containers that end here.
        while stack and stack[-1][1] is not None and off >= stack[-1][1]:  # type: ignore[operator]
            stack.pop()
        if off == n:
            if stack or not whole:
                raise _NeedMore
            break
        if off + 8 > n:
            raise _NeedMore
        group, elem = tag_fmt.unpack_from(data, off)
        tag = (group << 16) | elem
        if tag in (_ITEM, _ITEM_END, _SEQ_END):
            # Item tags are always little/big as the dataset, implicit style (tag + 4-byte length).
            length = u32.unpack_from(data, off + 4)[0]
            off += 8
            if tag == _ITEM:
                if not stack or stack[-1][0] != "seq":
                    return None
                if len(stack) // 2 + 1 > MAX_SEQUENCE_DEPTH:
                    raise UnsafeInputError(path, f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels")
                stack.append(("item", None if length == _UNDEFINED else off + length))
            elif tag == _ITEM_END:
                if not stack or stack[-1][0] != "item" or stack[-1][1] is not None:
                    return None
                stack.pop()
            else:
                if not stack or stack[-1][0] != "seq" or stack[-1][1] is not None:
                    return None
                stack.pop()
            continue
        if implicit:
            vr = b""
            length = u32.unpack_from(data, off + 4)[0]
            off += 8
        else:
            vr = data[off + 4:off + 6]
            if vr in _LONG_VRS:
                if off + 12 > n:
                    raise _NeedMore
                length = u32.unpack_from(data, off + 8)[0]
                off += 12
            elif vr.isalpha() and vr.isupper():
                length = u16.unpack_from(data, off + 6)[0]
                off += 8
            else:
                return None  # not what the transfer syntax promised: let pydicom judge
        if not stack and tag in _PIXEL_TAGS:
            pixel_length = length
            if length != _UNDEFINED and off + length > size:
                raise TruncatedInputError(path, f"truncated: pixel data declares {length} bytes but only "
                                          f"{size - off} remain in the file")
            break
        if length == _UNDEFINED:
            # Undefined length: a sequence (SQ, or UN/implicit read as SQ per PS3.5 6.2.2).
            if vr not in (b"SQ", b"UN", b""):
                return None
            stack.append(("seq", None))
            continue
        if off + length > n:
            if whole and length > 2 * n and length > 256 * 1024 * 1024:
                raise UnsafeInputError(path, f"a data element declares {length} bytes in a file of {n} bytes "
                                       "(absurd element length)")
            raise _NeedMore
        if not stack and tag in wanted:
            values[tag] = data[off:off + length]
            if vr:
                vrs[tag] = vr.decode("ascii")
        off += length
    return Header(values, vrs, little, implicit, ts, _uid(meta.get(0x00020002, b"")), pixel_length)


__all__ = ["Header", "walk"]
