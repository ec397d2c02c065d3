"""TLS for the gRPC port: the certificate chain and key, and the CA that
client certificates must be signed by (mutual TLS), checked at start-up.

gRPC only parses them when a client connects, so a wrong file would start a
daemon whose every TLS handshake fails; reading and checking them while the
options are parsed makes that a startup error instead (before twistd
daemonizes, while the terminal still shows it).
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from aggregator import metrics
from aggregator.throttled_log import ThrottledLog


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


def _public(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class RefusedHandshakes:
    """Counts and logs, once per burst, the TLS handshakes gRPC refuses.

    gRPC reports a refused handshake only as a line its C core writes to
    file descriptor 2 ("Handshake failed with error SSL_ERROR_SSL: ...
    PEER_DID_NOT_RETURN_A_CERTIFICATE"), one per attempt, and a client
    without a valid certificate retries every second or so: that would bury
    the terminal or log, and Python never hears of it. So while the server
    runs, fd 2 is a pipe read on the event loop: handshake lines are counted
    (aggregator_tls_handshakes_refused_total) and logged once per burst,
    every other line goes through to the real stderr unchanged.
    """

    log = Logger()
    _FAILED = re.compile(rb"Handshake failed with error \S+: (?:.*OPENSSL_internal:)?(\w+)(.*)")
    # OpenSSL's reasons for the refusals mutual TLS is about, in words.
    _REASONS = {
        b"PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client sent no certificate",
        b"CERTIFICATE_VERIFY_FAILED": "the client's certificate is not one --tls-client-ca signed",
    }

    def __init__(self, clock: IReactorTime) -> None:
        self._throttled = ThrottledLog(self.log, clock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stderr = -1  # the real stderr while we hold fd 2
        self._pipe = -1
        self._pending = b""

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """On grpc.aio's loop (the reactor's): its threads write, the loop reads."""
        read, write = os.pipe()
        self._stderr = os.dup(2)
        os.dup2(write, 2)
        os.close(write)
        # gRPC's threads must never wait for the reactor: with the pipe full
        # (a stalled reactor) a line is lost rather than a thread blocked.
        os.set_blocking(2, False)
        os.set_blocking(read, False)
        self._pipe = read
        self._loop = loop
        loop.add_reader(read, self._read)

    def stop(self) -> None:
        if self._loop is None:
            return
        self._loop.remove_reader(self._pipe)
        self._loop = None
        self._read()
        os.dup2(self._stderr, 2)  # the real stderr again, as it was (blocking)
        os.close(self._stderr)
        os.close(self._pipe)
        self._pipe = self._stderr = -1
        self._pass_through(self._pending)
        self._pending = b""

    def _read(self) -> None:
        try:
            data = os.read(self._pipe, 65536)
        except BlockingIOError:
            return
        *lines, self._pending = (self._pending + data).split(b"\n")
        for line in lines:
            self._line(line)

    def _line(self, line: bytes) -> None:
        failed = self._FAILED.search(line)
        if failed is None:
            self._pass_through(line + b"\n")
            return
        metrics.TLS_HANDSHAKES_REFUSED.inc()
        code, detail = failed.groups()
        reason = self._REASONS.get(code) or (code + detail).decode(errors="replace").strip()
        self._throttled.warn("handshake", "TLS handshake refused: {reason}", reason=reason)

    def _pass_through(self, data: bytes) -> None:
        if data:
            try:
                os.write(self._stderr, data)
            except OSError:
                pass  # stderr closed: nowhere to report it either
