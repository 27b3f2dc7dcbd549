"""Pixel decoders: which library decodes which transfer syntax, and why.

pydicom picks a decoder plugin per transfer syntax. Out of the box it can use
pylibjpeg-libjpeg for the JPEG family, which is GPL-3 and therefore not shipped
with medai. This module registers a plugin backed by **imagecodecs** (BSD-3;
libjpeg-turbo, liblj92 and CharLS inside are BSD/IJG/zlib-style licences) for
the JPEG family, so every syntax below decodes with permissively licensed code:

=============================================  ==========================================
transfer syntax                                decoder (licence)
=============================================  ==========================================
JPEG Baseline 8-bit (1.2.840.10008.1.2.4.50)   Pillow/libjpeg-turbo (MIT-CMU), then imagecodecs
JPEG Extended 12-bit (.4.51)                   imagecodecs libjpeg-turbo (BSD-3)
JPEG Lossless (.4.57, .4.70)                   imagecodecs libjpeg-turbo / liblj92 (BSD-3)
JPEG-LS lossless/near-lossless (.4.80, .4.81)  pyjpegls/CharLS (MIT/BSD-3), then imagecodecs CharLS
JPEG 2000 (.4.90, .4.91)                       pylibjpeg-openjpeg (MIT; OpenJPEG BSD-2)
RLE Lossless (.5)                              pydicom's own (MIT), pylibjpeg-rle (MIT)
Deflated Explicit VR (.1.99)                   zlib, bounded by :mod:`medai.dicom.safety`
=============================================  ==========================================

Importing :mod:`medai.dicom.volume` calls :func:`register` once. The volume loader decodes
single-frame, unsigned, monochrome JPEG-LS itself, with imagecodecs' CharLS straight from the
codestream and in worker threads (``medai.dicom.volume._jpeg_ls_codestream``); every other case,
and a codestream it refuses, comes through the plugins above.
"""

from __future__ import annotations

import logging
from typing import Any

from pydicom import uid

log = logging.getLogger("medai.dicom")

DECODER_DEPENDENCIES = {
    uid.JPEGBaseline8Bit: ("numpy", "imagecodecs"),
    uid.JPEGExtended12Bit: ("numpy", "imagecodecs"),
    uid.JPEGLossless: ("numpy", "imagecodecs"),
    uid.JPEGLosslessSV1: ("numpy", "imagecodecs"),
    uid.JPEGLSLossless: ("numpy", "imagecodecs"),
    uid.JPEGLSNearLossless: ("numpy", "imagecodecs"),
}

_JPEG = {uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1}
_JPEGLS = {uid.JPEGLSLossless, uid.JPEGLSNearLossless}
_LABEL = "medai-imagecodecs"
_registered = False


def is_available(transfer_syntax: str) -> bool:
    """pydicom plugin hook: can imagecodecs decode this syntax here?"""
    try:
        import imagecodecs
    except ImportError:
        return False
    if transfer_syntax in _JPEGLS:
        return bool(imagecodecs.JPEGLS.available)
    if transfer_syntax in _JPEG:
        return bool(imagecodecs.JPEG8.available or imagecodecs.LJPEG.available)
    return False


def _decode_frame(src: bytes, runner: Any) -> bytes:
    """pydicom plugin hook: decode one frame into raw (native) bytes."""
    import imagecodecs
    import numpy as np

    ts = runner.transfer_syntax
    if ts in _JPEGLS:
        arr = imagecodecs.jpegls_decode(src)
    else:
        if runner.samples_per_pixel != 1:
            # Colour JPEG needs the YBR handling Pillow implements; leave it there.
            raise NotImplementedError("imagecodecs plugin decodes monochrome JPEG only")
        try:
            arr = imagecodecs.jpeg8_decode(src)
        except Exception:
            # Lossless JPEG with predictors libjpeg-turbo refuses: liblj92.
            arr = imagecodecs.ljpeg_decode(src)
    arr = np.ascontiguousarray(arr)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3:
        runner.set_option("planar_configuration", 0)
    bits = arr.dtype.itemsize * 8
    runner.set_option("bits_allocated", bits)
    return arr.tobytes()


def preferred_plugin(ds: Any) -> str:
    """The plugin to ask first for this dataset ("" lets pydicom try each in turn).

    12-bit JPEG goes straight to imagecodecs: Pillow's libjpeg is 8-bit only and
    would print an error for every frame before pydicom falls back.
    """
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts == uid.JPEGExtended12Bit and int(ds.get("BitsStored", 8) or 8) > 8:
        return _LABEL
    if ts in (uid.JPEGLossless, uid.JPEGLosslessSV1):
        return _LABEL
    return ""


def register() -> None:
    """Add the imagecodecs plugin to pydicom's JPEG decoders (idempotent).

    It goes after the plugins pydicom already has (Pillow, pyjpegls), so it is
    the fallback where those exist and the decoder where none does (JPEG
    lossless, 12-bit JPEG). pylibjpeg-libjpeg (GPL) is never installed by medai.
    """
    global _registered
    if _registered:
        return
    from pydicom.pixels import get_decoder

    for ts in DECODER_DEPENDENCIES:
        decoder = get_decoder(ts)
        try:
            decoder.add_plugin(_LABEL, (__name__, "_decode_frame"))
        except ValueError:
            pass  # already added (module reloaded)
    _registered = True


__all__ = ["register", "preferred_plugin", "is_available", "DECODER_DEPENDENCIES"]
