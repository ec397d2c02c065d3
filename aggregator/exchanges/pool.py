"""A feed's connections: which carries which symbol, what each has yet to
send, and the make-before-break replacement of one.

Symbols are placed on shards of at most `max_symbols_per_connection`; a shard
is one connection, plus, while it is being replaced, the successor. Demand
changes are kept per connection as the wanted state of each symbol; the frames
are built only when the connection may send one, so a change undone before
then costs nothing and a symbol never has more than one change pending.
docs/DESIGN.md, "Connections and handover".
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from aggregator.exchanges.connection import Connection, Connector
from aggregator.exchanges.venue import VenueSettings


class PoolEvents(Protocol):
    """What the pool tells the feed, and the frames it asks the feed for."""

    def carrier_opened(self, connection: Connection, symbols: dict[str, bool]) -> None:
        """`connection` now carries `symbols` alone (a fresh connection, or a
        successor promoted early); the value says whether the venue already
        streams the symbol there."""

    def restart_sync(self, connection: Connection, symbol: str) -> None:
        """The venue still streams `symbol` on `connection`: sync it from there."""

    def carrier_lost(self, connection: Connection, symbols: list[str], reason: str) -> None: ...

    def handed_over(self, old: Connection, new: Connection) -> None: ...

    def frame_received(self, connection: Connection, payload: bytes, arrival: float) -> None: ...

    def subscribe_frame(self, connection: Connection, symbols: list[str], active: bool) -> Any: ...

    def unsubscribe_frame(self, connection: Connection, symbols: list[str]) -> Any: ...

    def idle(self, connection: Connection) -> None: ...

    def connectivity_changed(self) -> None: ...


class _Link:
    """One connection's subscriptions: sent, and still to send."""

    __slots__ = ("subscribed", "pending", "retries")

    def __init__(self) -> None:
        self.subscribed: set[str] = set()
        # Symbol → wanted (True: subscribe, False: unsubscribe); at most one each.
        self.pending: dict[str, bool] = {}
        self.retries: dict[str, IDelayedCall] = {}

    def want(self, symbol: str, wanted: bool) -> None:
        if (symbol in self.subscribed) == wanted:
            self.pending.pop(symbol, None)  # an opposite change still unsent: both cancel
        else:
            self.pending[symbol] = wanted

    def reset(self, symbols: set[str]) -> None:
        self.cancel_retries()
        self.subscribed = set()
        self.pending = dict.fromkeys(sorted(symbols), True)

    def cancel_retries(self) -> None:
        for timer in self.retries.values():
            if timer.active():
                timer.cancel()
        self.retries = {}

    @property
    def settled(self) -> bool:
        return not self.pending and not self.retries


class Shard:
    """Up to max_symbols_per_connection symbols and the connection carrying them."""

    def __init__(self, active: Connection) -> None:
        self.symbols: set[str] = set()
        self.active = active
        self.successor: Connection | None = None
        self.overlap: IDelayedCall | None = None
        self.overlap_done = False

    def carriers(self) -> list[Connection]:
        return [self.active] if self.successor is None else [self.active, self.successor]

    def cancel_overlap(self) -> None:
        if self.overlap is not None and self.overlap.active():
            self.overlap.cancel()
        self.overlap = None
        self.overlap_done = False


class ConnectionPool:
    log = Logger()

    def __init__(
        self,
        venue: str,
        url: Callable[[], str],
        settings: VenueSettings,
        events: PoolEvents,
        reactor: IReactorTime,
        retry_policy: Callable[[int], float],
        connector: Connector,
    ) -> None:
        self.venue = venue
        self._url = url
        self.settings = settings
        self._events = events
        self._reactor = reactor
        self._retry_policy = retry_policy
        self._connector = connector
        self.shards: list[Shard] = []
        self._shard_of_symbol: dict[str, Shard] = {}
        self._links: dict[Connection, _Link] = {}
        self._made = 0
        self.running = False

    # -- what the feed asks ---------------------------------------------------------

    @property
    def connections(self) -> list[Connection]:
        """The connections carrying symbols now (not successors being brought up)."""
        return [shard.active for shard in self.shards]

    @property
    def connected(self) -> bool:
        return any(connection.connected for connection in self.connections)

    def predecessor(self, connection: Connection) -> Connection | None:
        for shard in self.shards:
            if shard.successor is connection:
                return shard.active
        return None

    def start(self) -> None:
        self.running = True
        if not self.shards:
            self._add_shard()
        for shard in self.shards:
            for connection in shard.carriers():
                connection.start()

    def stop(self) -> Deferred[Any]:
        self.running = False
        stopping = []
        for shard in self.shards:
            shard.cancel_overlap()
            for connection in shard.carriers():
                stopping.append(connection.stop())
        for link in self._links.values():
            link.cancel_retries()
        self.shards = []
        self._shard_of_symbol.clear()
        self._links.clear()
        return DeferredList(stopping)

    def add(self, symbol: str) -> None:
        """Carry `symbol`; starts its sync at once if the venue still streams it."""
        shard = self._shard_of_symbol.get(symbol) or self._place(symbol)
        for connection in shard.carriers():
            self._link(connection).want(symbol, True)
            connection.wake()
        active = shard.active
        if active.connected and self._link(active).pending.get(symbol) is None:
            # Unsubscribed and resubscribed before the frame left: still streaming.
            self._events.restart_sync(active, symbol)

    def remove(self, symbol: str) -> None:
        shard = self._shard_of_symbol.pop(symbol, None)
        if shard is None:
            return
        shard.symbols.discard(symbol)
        for connection in shard.carriers():
            link = self._link(connection)
            retry = link.retries.pop(symbol, None)
            if retry is not None and retry.active():
                retry.cancel()
            link.want(symbol, False)
            connection.wake()
        if not shard.symbols and shard is not self.shards[0]:
            self._retire(shard)

    def resubscribe(self, connection: Connection, symbols: list[str], delay: float) -> None:
        """Subscribe `symbols` on `connection` again after `delay` (refused, or unanswered)."""
        link = self._links.get(connection)
        if link is None:
            return
        for symbol in symbols:
            old = link.retries.pop(symbol, None)
            if old is not None and old.active():
                old.cancel()
            link.subscribed.discard(symbol)
            link.retries[symbol] = self._reactor.callLater(
                delay, self._retry_due, connection, symbol
            )

    def rotate(self, connection: Connection, reason: str) -> None:
        """Replace `connection` make-before-break."""
        shard = self._shard_carried_by(connection)
        if shard is None or shard.active is not connection:
            return
        if shard.successor is not None or not connection.connected or not self.running:
            return
        self.log.info("{connection}: replacing it ({reason})", connection=connection.label,
                      reason=reason)
        shard.successor = self._new_connection()
        self._link(shard.successor).reset(shard.symbols)
        shard.successor.start()

    # -- placement ------------------------------------------------------------------

    def _place(self, symbol: str) -> Shard:
        for shard in self.shards:
            if len(shard.symbols) < self.settings.max_symbols_per_connection:
                break
        else:
            shard = self._add_shard()
            if self.running:
                shard.active.start()
        shard.symbols.add(symbol)
        self._shard_of_symbol[symbol] = shard
        return shard

    def _add_shard(self) -> Shard:
        shard = Shard(self._new_connection())
        self.shards.append(shard)
        return shard

    def _new_connection(self) -> Connection:
        self._made += 1
        connection = Connection(
            f"{self.venue} connection #{self._made}",
            self._url(),
            self.settings,
            self,
            self._reactor,
            self._retry_policy,
            self._connector,
        )
        self._links[connection] = _Link()
        return connection

    def _link(self, connection: Connection) -> _Link:
        return self._links.setdefault(connection, _Link())

    def _retire(self, shard: Shard) -> None:
        self.shards.remove(shard)
        shard.cancel_overlap()
        for connection in shard.carriers():
            self._drop_link(connection)
            connection.stop()
        self.log.info("{connection}: no symbols left; closed", connection=shard.active.label)

    def _drop_link(self, connection: Connection) -> None:
        link = self._links.pop(connection, None)
        if link is not None:
            link.cancel_retries()

    def _shard_carried_by(self, connection: Connection) -> Shard | None:
        for shard in self.shards:
            if connection is shard.active or connection is shard.successor:
                return shard
        return None

    def _retry_due(self, connection: Connection, symbol: str) -> None:
        link = self._links.get(connection)
        if link is None:
            return
        link.retries.pop(symbol, None)
        shard = self._shard_of_symbol.get(symbol)
        if shard is not None and connection in shard.carriers():
            link.want(symbol, True)
            connection.wake()

    # -- ConnectionEvents -------------------------------------------------------------

    def connection_opened(self, connection: Connection) -> None:
        shard = self._shard_carried_by(connection)
        if shard is None:
            connection.stop()  # retired while connecting
            return
        self._link(connection).reset(shard.symbols)
        if connection is shard.successor:
            self.log.info("{new}: open; subscribing before {old} is closed",
                          new=connection.label, old=shard.active.label)
            shard.cancel_overlap()
            shard.overlap = self._reactor.callLater(
                self.settings.handover_overlap, self._overlap_elapsed, shard
            )
            connection.wake()
            return
        self.log.info("{connection}: connected to {url}", connection=connection.label,
                      url=connection.url)
        self._events.carrier_opened(connection, dict.fromkeys(sorted(shard.symbols), False))
        connection.wake()
        self._events.connectivity_changed()

    def frame_received(self, connection: Connection, payload: bytes, arrival: float) -> None:
        self._events.frame_received(connection, payload, arrival)

    def connection_lost(self, connection: Connection, reason: str) -> None:
        shard = self._shard_carried_by(connection)
        link = self._links.get(connection)
        if link is not None:
            link.reset(set())
        if shard is None:
            return  # retired
        if connection is shard.successor:
            # It reconnects by itself (ClientService); the handover restarts then.
            shard.cancel_overlap()
            return
        if self.running:
            self.log.warn("{connection}: disconnected ({reason})", connection=connection.label,
                          reason=reason)
        self._events.carrier_lost(connection, sorted(shard.symbols), reason)
        successor = shard.successor
        if successor is not None and self.running:
            # Too late for a seamless handover: the successor takes over and
            # the books resync from it.
            self._promote(shard)
            if successor.connected:
                successor_link = self._link(successor)
                self._events.carrier_opened(
                    successor,
                    {symbol: symbol in successor_link.subscribed for symbol in sorted(shard.symbols)},
                )
        self._events.connectivity_changed()

    def connection_aged(self, connection: Connection) -> None:
        self.rotate(connection, "connection age limit")

    def connection_idle(self, connection: Connection) -> None:
        self._events.idle(connection)

    def next_frame(self, connection: Connection) -> Any:
        link = self._links.get(connection)
        shard = self._shard_carried_by(connection)
        if link is None or shard is None or not link.pending:
            return None
        wanted = next(iter(link.pending.values()))
        batch = []
        for symbol, change in list(link.pending.items()):
            if change is wanted:
                batch.append(symbol)
                del link.pending[symbol]
                if len(batch) == self.settings.symbols_per_frame:
                    break
        if wanted:
            link.subscribed.update(batch)
            return self._events.subscribe_frame(connection, batch, connection is shard.active)
        link.subscribed.difference_update(batch)
        return self._events.unsubscribe_frame(connection, batch)

    def all_sent(self, connection: Connection) -> None:
        shard = self._shard_carried_by(connection)
        if shard is not None and connection is shard.successor:
            self._try_handover(shard)

    # -- handover -----------------------------------------------------------------------

    def _overlap_elapsed(self, shard: Shard) -> None:
        shard.overlap = None
        shard.overlap_done = True
        self._try_handover(shard)

    def _try_handover(self, shard: Shard) -> None:
        successor = shard.successor
        if successor is None or not shard.overlap_done or not successor.connected:
            return
        if successor.sending or not self._link(successor).settled:
            return  # all_sent, or a retry coming due, brings us back
        old = shard.active
        self._promote(shard)
        self._events.handed_over(old, successor)
        self.log.info("{new}: took over from {old}", new=successor.label, old=old.label)

    def _promote(self, shard: Shard) -> None:
        successor = shard.successor
        assert successor is not None
        old, shard.active, shard.successor = shard.active, successor, None
        shard.cancel_overlap()
        self._drop_link(old)
        old.stop()
