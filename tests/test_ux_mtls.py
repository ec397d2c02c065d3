"""Who may connect (issue 11, section 4): mutual TLS with --tls-client-ca,
certificates made here (loopback only)."""

import asyncio
import datetime
import io
import ipaddress
import os
import json

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import REGISTRY
from twisted.internet import reactor
from twisted.logger import globalLogPublisher
from twisted.python import usage

from aggregator.client import main as client_main
from aggregator.simulator import SimulatorService
from tests.aio import aio, wait_until
from tests.e2e import plugin, start_daemon


class Authority:
    """A CA that signs server and client certificates, written as PEM files."""

    def __init__(self, directory, name):
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.certificate = self._builder(self.name, self.key.public_key()).add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        ).sign(self.key, hashes.SHA256())
        self.path = directory / f"{name}.pem"
        self.path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject, public_key):
        now = datetime.datetime.now(datetime.timezone.utc)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(self.name)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1)))

    def issue(self, name):
        """(certificate path, key path) for `name`, valid for 127.0.0.1."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        certificate = self._builder(subject, key.public_key()).add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        ).sign(self.key, hashes.SHA256())
        cert_path, key_path = self.directory / f"{name}.crt", self.directory / f"{name}.key"
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        return cert_path, key_path


def test_client_ca_options(tmp_path):
    ca = Authority(tmp_path, "clients")
    cert, key = Authority(tmp_path, "servers").issue("server")
    with pytest.raises(usage.UsageError, match="--tls-client-ca needs --tls-cert and --tls-key"):
        plugin().options().parseOptions(["--tls-client-ca", str(ca.path)])
    with pytest.raises(usage.UsageError, match="TLS: .*no PEM certificate"):
        plugin().options().parseOptions(
            ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(key)])
    options = plugin().options()
    options.parseOptions(
        ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(ca.path)])
    assert options["tls"].client_ca == ca.path.read_bytes()


async def client(*argv):
    """aggregator-client in a thread (it blocks): (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = await aio(asyncio.to_thread(client_main, list(argv), out, err))
    return code, out.getvalue(), err.getvalue()


def refused_handshakes():
    return REGISTRY.get_sample_value("aggregator_tls_handshakes_refused_total") or 0.0


@pytest.fixture
def events():
    seen = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


@pytest_twisted.ensureDeferred
async def test_only_clients_with_a_certificate_the_ca_signed_may_connect(tmp_path, events):
    servers, clients, strangers = (Authority(tmp_path, n) for n in ("servers", "clients", "strangers"))
    server_cert, server_key = servers.issue("server")
    sim = SimulatorService(reactor=reactor, source="synthetic", seed=1, speed=1.0)
    sim.startService()
    daemon = await start_daemon(sim, "--tls-cert", str(server_cert), "--tls-key", str(server_key),
                                "--tls-client-ca", str(clients.path))
    address = f"127.0.0.1:{daemon.getServiceNamed('grpc').port}"
    tls = ["ethbtc", "--addr", address, "--tls-ca", str(servers.path), "--json", "--timeout", "2"]
    try:
        cert, key = clients.issue("alice")
        code, out, err = await client(*tls, "--tls-cert", str(cert), "--tls-key", str(key),
                                      "--count", "1")
        assert (code, err) == (0, "") and json.loads(out)["symbol"] == "ethbtc"

        # No certificate, or one another CA signed: the handshake is refused.
        refused_before = refused_handshakes()
        cert, key = strangers.issue("mallory")
        for extra in ([], ["--tls-cert", str(cert), "--tls-key", str(key)]):
            code, out, err = await client(*tls, *extra)
            assert (code, out) == (2, ""), err
            assert err == (f"aggregator-client: cannot reach the daemon at {address} (Socket closed); "
                           "or it refused the TLS handshake: check --tls-ca, --tls-cert and --tls-key\n")
        # Each client retried within its --timeout: every refusal is counted, and
        # logged once for the burst, with the reason.
        await aio(wait_until(lambda: refused_handshakes() >= refused_before + 2, timeout=5))
        logged = [e for e in events if e.get("log_format") == "TLS handshake refused: {reason}"]
        assert [e["reason"] for e in logged] == ["the client sent no certificate"], logged
    finally:
        await daemon.stopService()
        await sim.stopService()


def test_other_grpc_lines_go_through_and_reasons_are_in_words(events):
    from twisted.internet.task import Clock

    from aggregator.tls import RefusedHandshakes

    watch = RefusedHandshakes(Clock())
    read, watch._stderr = os.pipe()
    try:
        watch._line(b"E1206 01:15:08.05 1 add_port.cc:83] Failed to add port")
        watch._line(b"I1206 01:21:02.82 2 ssl_transport_security.cc:2563] Handshake failed with "
                    b"error SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
                    b"CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate")
        assert os.read(read, 1000) == b"E1206 01:15:08.05 1 add_port.cc:83] Failed to add port\n"
    finally:
        os.close(read)
        os.close(watch._stderr)
    assert [e["reason"] for e in events if "reason" in e] == [
        "the client's certificate is not one --tls-client-ca signed"]
