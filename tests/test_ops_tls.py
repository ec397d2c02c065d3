"""Optional TLS on the gRPC port, with a self-signed certificate made here."""

import asyncio
import io
import json

import grpc
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.python import usage

from aggregator._proto import orderbook_pb2, orderbook_pb2_grpc
from aggregator.client import main as client_main
from aggregator.simulator import SimulatorService
from aggregator.tls import BadKeyPair, read_key_pair
from tests.aio import aio, within
from tests.e2e import plugin, start_daemon
from tests.ops import self_signed


def test_key_pair_is_checked_at_start_up(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cert, key = self_signed(tmp_path / "a")
    _, other_key = self_signed(tmp_path / "b")
    pair = read_key_pair(str(cert), str(key))
    assert pair.cert_chain == cert.read_bytes() and pair.private_key == key.read_bytes()
    with pytest.raises(BadKeyPair, match="is not the key of the certificate"):
        read_key_pair(str(cert), str(other_key))
    with pytest.raises(BadKeyPair, match="no PEM certificate"):
        read_key_pair(str(key), str(key))
    with pytest.raises(BadKeyPair, match="cannot read .*missing.crt: No such file"):
        read_key_pair(str(tmp_path / "missing.crt"), str(key))
    encrypted = tmp_path / "encrypted.key"
    loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
    encrypted.write_bytes(loaded.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(BadKeyPair, match="not an unencrypted PEM private key"):
        read_key_pair(str(cert), str(encrypted))


def test_tls_options(tmp_path):
    cert, key = self_signed(tmp_path)
    options = plugin().options()
    with pytest.raises(usage.UsageError, match="--tls-cert and --tls-key go together"):
        options.parseOptions(["--tls-cert", str(cert)])
    with pytest.raises(usage.UsageError, match="TLS: .*no PEM certificate"):
        plugin().options().parseOptions(["--tls-cert", str(key), "--tls-key", str(key)])
    options = plugin().options()
    options.parseOptions([])
    assert options["tls"] is None


@pytest_twisted.ensureDeferred
async def test_tls_stream_with_a_self_signed_certificate(tmp_path):
    cert, key = self_signed(tmp_path)
    sim = SimulatorService(reactor=reactor, source="synthetic", seed=1, speed=1.0)
    sim.startService()
    daemon = await start_daemon(sim, "--tls-cert", str(cert), "--tls-key", str(key))
    address = f"127.0.0.1:{daemon.getServiceNamed('grpc').port}"
    try:
        async def scenario():
            credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
            async with grpc.aio.secure_channel(address, credentials) as channel:
                stub = orderbook_pb2_grpc.AggregatorStub(channel)
                call = stub.BookSummary(orderbook_pb2.Request(symbol="ethbtc"))
                assert isinstance(await within(call.read(), 5), orderbook_pb2.Summary)
                call.cancel()
            # A plaintext client gets nowhere.
            async with grpc.aio.insecure_channel(address) as channel:
                stub = orderbook_pb2_grpc.AggregatorStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await within(stub.BookSummary(orderbook_pb2.Request(symbol="ethbtc")).read(), 5)
                assert caught.value.code() is grpc.StatusCode.UNAVAILABLE

        await aio(scenario())
        # aggregator-client, trusting that certificate (blocking: off the reactor thread).
        out, err = io.StringIO(), io.StringIO()
        code = await aio(asyncio.to_thread(
            client_main,
            ["ethbtc", "--addr", address, "--tls-ca", str(cert), "--json", "--count", "2"],
            out, err))
        assert (code, err.getvalue()) == (0, "")
        assert [json.loads(line)["symbol"] for line in out.getvalue().splitlines()] == ["ethbtc"] * 2
    finally:
        await daemon.stopService()
        await sim.stopService()
