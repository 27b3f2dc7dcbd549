"""DICOM TLS contexts (PS3.15 B.1 "Basic TLS Secure Transport Connection
Profile" in its BCP 195 form, B.9/B.10): the listener's and the sender's.

Both sides speak TLS 1.2 or later only, with forward-secret AEAD cipher suites
(the RFC 7525 / BCP 195 recommendations, ECDHE or DHE with AES-GCM, and
ChaCha20-Poly1305; TLS 1.3 suites are all of that kind), and no compression
or renegotiation. Configured like dcmtk's ``+tls`` options: our certificate
and private key (dcmtk ``+tls KEY CERT``), and the CA certificates peers are
verified against (dcmtk ``+cf``). On the listener, a CA turns client
verification on: a peer without a certificate issued by it fails the
handshake. On the sender the destination is always verified, against the CA
when one is given, else against the system's trust store.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from collections.abc import Mapping
from pathlib import Path

from medai.errors import ConfigError

#: TLS 1.2 suites BCP 195 recommends (forward secrecy, AEAD), in OpenSSL's names.
BCP195_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384",
))


@dataclass(frozen=True)
class TlsConfig:
    """Our certificate and key (PEM files), and the CA file peers are checked against."""

    certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.certificate or self.private_key)

    def check(self, *, server: bool) -> None:
        if bool(self.certificate) != bool(self.private_key):
            raise ConfigError("pacs.tls_certificate and pacs.tls_private_key go together: set both or neither")
        if server and self.ca_certificates and not self.enabled:
            raise ConfigError("pacs.tls_ca_certificates without pacs.tls_certificate: the listener needs its own "
                              "certificate and key to speak TLS")
        for name, value in (("pacs.tls_certificate", self.certificate), ("pacs.tls_private_key", self.private_key),
                            ("pacs.tls_ca_certificates", self.ca_certificates)):
            if value and not Path(value).expanduser().is_file():
                raise ConfigError(f"{name} {value}: no such file")


def _base(purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


def _load_own(ctx: ssl.SSLContext, cfg: TlsConfig) -> None:
    if cfg.certificate and cfg.private_key:
        try:
            ctx.load_cert_chain(str(Path(cfg.certificate).expanduser()), str(Path(cfg.private_key).expanduser()))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"pacs.tls_certificate / pacs.tls_private_key: cannot be loaded ({exc})") from exc


def _load_ca(ctx: ssl.SSLContext, cfg: TlsConfig) -> None:
    try:
        ctx.load_verify_locations(cafile=str(Path(cfg.ca_certificates or "").expanduser()))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"pacs.tls_ca_certificates {cfg.ca_certificates}: cannot be loaded ({exc})") from exc


def server_context(cfg: TlsConfig) -> ssl.SSLContext:
    """The listener's context: our certificate; client certificates required
    and verified when a CA is configured."""
    cfg.check(server=True)
    ctx = _base(ssl.PROTOCOL_TLS_SERVER)
    _load_own(ctx, cfg)
    if cfg.ca_certificates:
        _load_ca(ctx, cfg)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(cfg: TlsConfig) -> ssl.SSLContext:
    """The sender's context: the destination's certificate verified (against
    the CA, else the system store, host name included); ours presented when set."""
    cfg.check(server=False)
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT)
    if cfg.ca_certificates:
        _load_ca(ctx, cfg)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    _load_own(ctx, cfg)
    return ctx


def certificate_subject(cert: Mapping[str, object] | None) -> str:
    """An RFC 4514-like one-line subject (``CN=...,O=...``) of a peer certificate
    as :meth:`ssl.SSLSocket.getpeercert` returns it ("" when there is none)."""
    if not cert:
        return ""
    parts = []
    for rdn in cert.get("subject", ()):  # type: ignore[union-attr]
        for key, value in rdn:
            parts.append(f"{_SHORT_NAMES.get(key, key)}={value}")
    return ",".join(parts)


#: RFC 4514 short names of the attribute names :mod:`ssl` spells out.
_SHORT_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
                "stateOrProvinceName": "ST", "localityName": "L", "domainComponent": "DC", "userId": "UID"}
