"""The --nats* options: one-line option errors, defaults, and no change without --nats."""

import pytest
from twisted.python import usage

from aggregator.nats.names import Names
from tests.e2e import plugin


def parse(*args):
    options = plugin().options()
    options.parseOptions(list(args))
    return options


def test_without_nats_nothing_changes():
    assert parse()["nats-config"] is None


def test_defaults_with_nats_are_both_roles_prefix_aggregator_lease_ten_seconds():
    config = parse("--nats", "nats://127.0.0.1:4222")["nats-config"]
    assert (config.role, config.names, config.lease) == ("both", Names("aggregator"), 10.0)
    assert config.ingest and config.edge
    assert config.tls_context() is None


@pytest.mark.parametrize("url", [
    "127.0.0.1:4222", "http://127.0.0.1:4222", "nats://127.0.0.1", "nats://:4222",
    "nats://127.0.0.1:99999", "nats://127.0.0.1:x", ",",
])
def test_a_malformed_url_is_a_one_line_option_error(url):
    with pytest.raises(usage.UsageError) as caught:
        parse("--nats", url)
    assert str(caught.value).startswith("--nats: ") and "\n" not in str(caught.value)


@pytest.mark.parametrize("args, message", [
    (["--nats-role", "leader"], "--nats-role must be one of ingest, edge, both, got 'leader'"),
    (["--nats-prefix", "a.b"], "--nats-prefix: prefix must be"),
    (["--nats-lease", "0.1"], "--nats-lease must be at least 0.5 seconds"),
    (["--nats-tls-cert", "x.pem"], "--nats-tls-cert and --nats-tls-key go together"),
    (["--nats-creds", "/nonexistent.creds"], "--nats-creds: no such file"),
])
def test_bad_nats_options_are_one_line_errors(args, message):
    with pytest.raises(usage.UsageError) as caught:
        parse("--nats", "nats://127.0.0.1:4222", *args)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_a_cluster_of_urls_and_tls_are_accepted():
    config = parse("--nats", "tls://a.example:4222, nats://b.example:4223",
                   "--nats-role", "edge", "--nats-prefix", "prod-1")["nats-config"]
    assert config.servers == ("tls://a.example:4222", "nats://b.example:4223")
    assert config.tls_context() is not None
    assert config.names.summary_subject("ethbtc") == "prod-1.summary.ethbtc"
    assert config.names.leases_bucket == "prod-1_leases"


def test_reconnections_back_off_exponentially_up_to_the_lease_on_the_least_tried_server():
    import random
    from urllib.parse import urlparse

    from nats.aio.client import Server
    from twisted.internet.task import Clock

    from aggregator.nats.bus import Bus

    config = parse("--nats", "nats://a:4222,nats://b:4222", "--nats-lease", "4")["nats-config"]
    bus = Bus(config, clock=Clock(), rng=random.Random(1))
    delays = []
    for tried in range(6):
        servers = [Server(uri=urlparse("nats://a:4222"), reconnects=tried + 1),
                   Server(uri=urlparse("nats://b:4222"), reconnects=tried)]
        server, delay = bus._next_server(servers, {})
        assert server.uri.hostname == "b"
        delays.append(delay)
    for tried, delay in enumerate(delays):
        ceiling = min(4.0, 0.25 * 2 ** tried)
        assert ceiling / 2 <= delay <= ceiling


@pytest.mark.parametrize("role", ["ingest", "edge", "both"])
@pytest.mark.parametrize("mode", ["tuned", "python"])
def test_every_nats_role_applies_the_gc_option(role, mode):
    from twisted.internet import reactor

    from aggregator.gcpause import GcTuning

    options = parse("--nats", "nats://127.0.0.1:4222", "--nats-role", role, "--gc", mode)
    # Built, not started: nothing connects.
    daemon = plugin().makeService(options, reactor)
    tunings = [service for service in daemon if isinstance(service, GcTuning)]
    assert [tuning.mode for tuning in tunings] == [mode]
