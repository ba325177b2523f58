"""Certificates: a development certificate for the gateway's TLS listener, and the mesh's
own CA and certificates for mutual TLS between the gateway and the services.

    python -m services.launcher dev-cert [--dir .mlmesh/tls]

writes ``gateway.crt`` and ``gateway.key`` (mode 0600): a self-signed ECDSA P-256 certificate
for localhost, 127.0.0.1 and ::1, valid for 90 days. Clients trust it by taking the
certificate itself as their CA (``curl --cacert``, ``grpc.ssl_channel_credentials``). For
anything but development, use a certificate from your CA.

    python -m services.launcher mesh-certs [--dir .mlmesh/mtls]

writes the mesh's CA and the certificates it issues (``MeshTlsFiles``): the services present
``service.crt`` (issued to MESH_SERVICE_NAME) and require a client certificate from the CA;
the gateway presents ``gateway.crt``. The launcher makes them on first start and renews them
before they expire; compose and Kubernetes mount them from Secrets.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common.settings import MESH_GATEWAY_NAME, MESH_SERVICE_NAME, MeshTlsFiles

CERT_FILE = "gateway.crt"
KEY_FILE = "gateway.key"
VALID_DAYS = 90
# The mesh's CA outlives many leaf certificates; a leaf with less than RENEW_DAYS left is
# issued again when the launcher starts.
MESH_CA_DAYS = 3650
MESH_LEAF_DAYS = 365
RENEW_DAYS = 30


def write_dev_certificate(directory: Path, hosts: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """Write a self-signed certificate and its key into ``directory``; their paths.

    ``hosts`` are DNS names or IP addresses added to localhost, 127.0.0.1 and ::1.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    for host in ("127.0.0.1", "::1", *hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mlmesh development gateway")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        # Its own CA: clients trust exactly this certificate.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    _write_pair(cert, key, cert_path, key_path)
    return cert_path, key_path


def _write_pair(
    cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, cert_path: Path, key_path: Path
) -> None:
    """Write a certificate (PEM) and its key (PEM, PKCS#8, mode 0600)."""
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


# -- the mesh's CA (mutual TLS between the gateway and the services) ---------------------------


def _issue(
    ca_cert: x509.Certificate | None,
    ca_key: ec.EllipticCurvePrivateKey | None,
    name: str,
    days: int,
    usages: list[x509.ObjectIdentifier],
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for ``name`` signed by the CA, or a self-signed CA when ca_cert is None."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject if ca_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )
    if ca_cert is None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=0), critical=True
        ).add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        return builder.sign(key, hashes.SHA256()), key
    builder = (
        builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    assert ca_key is not None
    return builder.sign(ca_key, hashes.SHA256()), key


def _expires_within(path: Path, days: int) -> bool:
    """Whether the certificate at ``path`` is missing, unreadable or expires within ``days``."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return True
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    return left < datetime.timedelta(days=days)


def ensure_mesh_certificates(files: MeshTlsFiles) -> list[str]:
    """Make what is missing of the mesh's CA and certificates in ``files.directory``, and
    issue again those that expire within RENEW_DAYS; the names of the files written.

    A new CA (none yet, or its own expiry near) re-issues every certificate, since the old
    ones would no longer be trusted.
    """
    files.directory.mkdir(parents=True, exist_ok=True)
    os.chmod(files.directory, 0o700)
    written: list[str] = []
    new_ca = files.missing(files.ca_cert, files.ca_key) or _expires_within(
        files.ca_cert, RENEW_DAYS
    )
    if new_ca:
        ca_cert, ca_key = _issue(None, None, "mlmesh mesh CA", MESH_CA_DAYS, [])
        _write_pair(ca_cert, ca_key, files.ca_cert, files.ca_key)
        written.append(files.ca_cert.name)
    else:
        ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        loaded = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        ca_key = loaded
    leaves = [
        (files.service_cert, files.service_key, MESH_SERVICE_NAME,
         [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
        (files.gateway_cert, files.gateway_key, MESH_GATEWAY_NAME,
         [ExtendedKeyUsageOID.CLIENT_AUTH]),
    ]  # fmt: skip
    for cert_path, key_path, name, usages in leaves:
        if new_ca or not key_path.is_file() or _expires_within(cert_path, RENEW_DAYS):
            cert, key = _issue(ca_cert, ca_key, name, MESH_LEAF_DAYS, usages)
            _write_pair(cert, key, cert_path, key_path)
            written.append(cert_path.name)
    return written
