"""`host:port` listen addresses, as the options take them."""

from __future__ import annotations

import ipaddress
import socket


class CannotListen(RuntimeError):
    """A listen address is in use or unavailable: a startup error."""


def split_host_port(address: str) -> tuple[str, int]:
    """"127.0.0.1:9101" → ("127.0.0.1", 9101); "[::1]:0" → ("::1", 0).

    Raises ValueError unless there is a host and a port in 0..65535.
    """
    host, _, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"an IPv6 address needs brackets: [{host}]:{port}, got {address!r}")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {address!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (a name other than
    localhost may resolve to anything, so it counts as reachable)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_can_listen(what: str, address: str) -> None:
    """Raise CannotListen, in words, if `address` cannot be bound now.

    Called before twistd daemonizes, while the terminal still shows the
    error: binding for real must wait until after the fork (gRPC must not be
    set up before it), and by then a failure only reaches the log. The real
    bind still reports the rare port taken in between.
    """
    host, port = split_host_port(address)
    try:
        candidates = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        raise CannotListen(f"cannot {what} on {address}: unknown host {host!r} ({error.strerror})")
    reason = "no address"
    for family, kind, protocol, _, sockaddr in candidates:
        with socket.socket(family, kind, protocol) as probe:
            # As the servers set it: a port in TIME_WAIT is free for them.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
                return
            except OSError as error:
                reason = (error.strerror or str(error)).lower()
    raise CannotListen(f"cannot {what} on {address}: {reason}")
