"""A development certificate for the gateway's TLS listener.

    python -m services.launcher dev-cert [--dir .mlmesh/tls]

writes ``gateway.crt`` and ``gateway.key`` (mode 0600): a self-signed ECDSA P-256 certificate
for localhost, 127.0.0.1 and ::1, valid for 90 days. Clients trust it by taking the
certificate itself as their CA (``curl --cacert``, ``grpc.ssl_channel_credentials``). For
anything but development, use a certificate from your CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CERT_FILE = "gateway.crt"
KEY_FILE = "gateway.key"
VALID_DAYS = 90


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
    return cert_path, key_path
