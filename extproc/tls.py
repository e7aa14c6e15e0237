"""TLS for the picker's gRPC port: given PEM files, or a self-signed pair made at start.

Gateways that implement the Inference Extension differ: some speak plaintext h2c to the picker (the Service's
``appProtocol: kubernetes.io/h2c``), others expect TLS and, like GIE's own picker, accept a self-signed
certificate without verifying it. ``bind`` opens the gRPC port either way and says which it did.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger("kvswitch.extproc")


@dataclass(frozen=True, slots=True)
class TlsPair:
    cert_pem: bytes
    key_pem: bytes


def self_signed(hosts: list[str] | None = None, days: int = 365) -> TlsPair:
    """A fresh EC P-256 key and a self-signed certificate for ``hosts`` (DNS names or IPs)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    names = hosts or ["localhost", "127.0.0.1", socket.gethostname()]
    sans: list[x509.GeneralName] = []
    for h in dict.fromkeys(names):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvswitch")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return TlsPair(cert.public_bytes(serialization.Encoding.PEM),
                   key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))


def load_pair(cert_file: str, key_file: str) -> TlsPair:
    try:
        return TlsPair(Path(cert_file).read_bytes(), Path(key_file).read_bytes())
    except OSError as exc:
        raise OSError(f"cannot read TLS certificate/key: {exc.filename}: {exc.strerror}") from None


def bind(server: grpc.aio.Server, address: str, cert: str | None, key: str | None,
         self_signed_cert: bool) -> tuple[int, str]:
    """Add the listening port; returns (port, "tls" | "tls-self-signed" | "plaintext")."""
    if cert and key:
        pair, how = load_pair(cert, key), "tls"
    elif self_signed_cert:
        pair, how = self_signed(), "tls-self-signed"
    else:
        return server.add_insecure_port(address), "plaintext"
    creds = grpc.ssl_server_credentials([(pair.key_pem, pair.cert_pem)])
    return server.add_secure_port(address, creds), how
