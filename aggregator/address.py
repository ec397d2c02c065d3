"""`host:port` listen addresses, as the options take them."""

from __future__ import annotations


class CannotListen(RuntimeError):
    """A listen address is in use or unavailable: a startup error."""


def split_host_port(address: str) -> tuple[str, int]:
    """"127.0.0.1:9101" → ("127.0.0.1", 9101); "[::1]:0" → ("::1", 0).

    Raises ValueError unless there is a host and a port in 0..65535.
    """
    host, _, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {address!r}")
    return host, int(port)
