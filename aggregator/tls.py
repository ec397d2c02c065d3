"""TLS for the gRPC port: the certificate chain and key, and the CA that
client certificates must be signed by (mutual TLS), checked at start-up.

gRPC only parses them when a client connects, so a wrong file would start a
daemon whose every TLS handshake fails; reading and checking them while the
options are parsed makes that a startup error instead (before twistd
daemonizes, while the terminal still shows it).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization


class BadKeyPair(ValueError):
    pass


@dataclass(frozen=True)
class KeyPair:
    cert_chain: bytes  # PEM, the server's certificate first
    private_key: bytes  # PEM, unencrypted
    # PEM CA certificates: if set, a client must present a certificate one of
    # them signed, or the handshake fails (mutual TLS).
    client_ca: bytes | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        # Created only in GrpcServer.startService: gRPC must not be set up
        # before twistd forks.
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


def read_key_pair(cert_path: str, key_path: str) -> KeyPair:
    """Raises BadKeyPair naming the file and what is wrong with it."""
    cert_pem, key_pem = _read(cert_path), _read(key_path)
    try:
        certificate = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        raise BadKeyPair(f"{cert_path}: no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as error:  # TypeError: encrypted
        raise BadKeyPair(f"{key_path}: not an unencrypted PEM private key ({error})") from None
    if _public(key.public_key()) != _public(certificate.public_key()):
        raise BadKeyPair(f"{key_path} is not the key of the certificate in {cert_path}")
    return KeyPair(cert_pem, key_pem)


def read_client_ca(path: str) -> bytes:
    """The CA certificates clients' certificates must be signed by (PEM)."""
    pem = _read(path)
    try:
        x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise BadKeyPair(f"{path}: no PEM certificate") from None
    return pem


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise BadKeyPair(f"cannot read {path}: {error.strerror}") from None


def _public(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
