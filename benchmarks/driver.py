"""The gRPC client driver of the benchmarks: many BookSummary streams in one asyncio process
(grpc.aio), controlled over stdin/stdout with JSON lines.

    python -m benchmarks.driver --address 127.0.0.1:PORT

prints {"ready": true}, then answers requests:

    {"op": "open", "group": G, "streams": N, "symbols": [...], "channels": C,
     "record": K, "slow": S, "wait": W}
        N streams, stream i on symbols[i % len] and channel i % C (each channel its own
        TCP connection); K of them (spread evenly) keep (arrival time, raw Summary) while
        recording is on; S > 0: the stream reads one message every S seconds (a slow
        client). Answers once every stream has its first Summary (or after W seconds).
    {"op": "counts"}                   Summaries received so far, per group
    {"op": "record", "on": true|false} start (clearing) / stop keeping recorded Summaries
    {"op": "dump", "path": P}          recorded Summaries to P (pickle)
    {"op": "close", "group": G}        cancel the group's streams, close its channels
    {"op": "first", "symbol": S, "wait": T}
        one new stream: ms to its first Summary and to its first Summary with levels
    {"op": "cpu"}                      this process's CPU seconds
    {"op": "quit"}

Summaries are not parsed on arrival (raw bytes; the identity deserializer), so the driver
spends as little as possible per message; the analysis parses the recorded ones afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import pickle
import sys
import time
from typing import Any

import grpc

from benchmarks import use_uvloop
from benchmarks.procs import ProcStat

METHOD = "/orderbook.Aggregator/BookSummary"


def _request(symbol: str) -> bytes:
    from aggregator._proto import orderbook_pb2

    return orderbook_pb2.Request(symbol=symbol).SerializeToString()


class Stream:
    __slots__ = ("index", "symbol", "record", "slow", "received", "first_at", "error", "task", "records")

    def __init__(self, index: int, symbol: str, record: bool, slow: float) -> None:
        self.index = index
        self.symbol = symbol
        self.record = record
        self.slow = slow
        self.received = 0
        self.first_at: float | None = None
        self.error: str | None = None
        self.task: asyncio.Task | None = None
        self.records: list[tuple[float, bytes]] = []


class Group:
    def __init__(self, name: str) -> None:
        self.name = name
        self.channels: list[grpc.aio.Channel] = []
        self.streams: list[Stream] = []


class Driver:
    def __init__(self, address: str) -> None:
        self.address = address
        self.groups: dict[str, Group] = {}
        self.recording = False
        self.process = ProcStat()

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(
            self.address,
            options=[
                # Its own connection, not the process-wide shared subchannel.
                ("grpc.use_local_subchannel_pool", 1),
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ],
        )

    async def run_stream(self, call_factory: Any, stream: Stream) -> None:
        now = time.time
        try:
            call = call_factory(_request(stream.symbol))
            async for message in call:
                t = now()
                if stream.first_at is None:
                    stream.first_at = t
                stream.received += 1
                if stream.record and self.recording:
                    stream.records.append((t, message))
                if stream.slow:
                    await asyncio.sleep(stream.slow)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as error:
            stream.error = f"{error.code().name}: {error.details()}"
        except Exception as error:  # reported in counts
            stream.error = repr(error)

    async def open(self, request: dict) -> dict:
        name = request["group"]
        n = int(request["streams"])
        symbols = list(request["symbols"])
        n_channels = max(1, min(int(request.get("channels", n)), n))
        record = int(request.get("record", 0))
        slow = float(request.get("slow", 0.0))
        group = self.groups.setdefault(name, Group(name))
        group.channels = [self.channel() for _ in range(n_channels)]
        factories = [
            ch.unary_stream(METHOD, request_serializer=None, response_deserializer=None)
            for ch in group.channels
        ]
        every = max(1, n // record) if record else 0
        started = time.time()
        for i in range(n):
            stream = Stream(i, symbols[i % len(symbols)], bool(every) and i % every == 0, slow)
            stream.task = asyncio.ensure_future(self.run_stream(factories[i % n_channels], stream))
            group.streams.append(stream)
        deadline = time.monotonic() + float(request.get("wait", 60.0))
        while time.monotonic() < deadline:
            if all(s.first_at is not None or s.error for s in group.streams):
                break
            await asyncio.sleep(0.05)
        firsts = sorted((s.first_at - started) * 1000 for s in group.streams if s.first_at is not None)
        errors = [s.error for s in group.streams if s.error]
        return {
            "opened": len(firsts),
            "errors": len(errors),
            "first_error": errors[0] if errors else None,
            "first_ms_max": firsts[-1] if firsts else None,
        }

    def counts(self) -> dict:
        out = {}
        for name, group in self.groups.items():
            out[name] = {
                "received": sum(s.received for s in group.streams),
                "streams": len(group.streams),
                "errors": sum(1 for s in group.streams if s.error),
                "per_stream_min": min((s.received for s in group.streams), default=0),
            }
        return {"t": time.time(), "groups": out, "cpu": self.process.cpu_seconds()}

    def record(self, on: bool) -> dict:
        if on:
            for group in self.groups.values():
                for stream in group.streams:
                    stream.records = []
        self.recording = on
        return {"ok": True, "t": time.time()}

    def dump(self, path: str) -> dict:
        data = {}
        for name, group in self.groups.items():
            for stream in group.streams:
                if stream.record:
                    data[f"{name}/{stream.index}"] = (stream.symbol, stream.records)
                    stream.records = []
        with open(path, "wb") as f:
            pickle.dump(data, f)
        return {"ok": True, "streams": len(data), "summaries": sum(len(r) for _, r in data.values())}

    async def close(self, name: str) -> dict:
        group = self.groups.pop(name, None)
        if group is None:
            return {"ok": True}
        for stream in group.streams:
            if stream.task is not None:
                stream.task.cancel()
        await asyncio.gather(*(s.task for s in group.streams if s.task), return_exceptions=True)
        await asyncio.gather(*(ch.close() for ch in group.channels), return_exceptions=True)
        return {"ok": True}

    async def first(self, symbol: str, timeout: float) -> dict:
        from aggregator._proto import orderbook_pb2

        channel = self.channel()
        try:
            await asyncio.wait_for(channel.channel_ready(), 10.0)
            call = channel.unary_stream(METHOD, request_serializer=None, response_deserializer=None)
            started = time.perf_counter()
            first = levels = both = None
            async def read() -> None:
                nonlocal first, levels, both
                async for message in call(_request(symbol)):
                    t = (time.perf_counter() - started) * 1000
                    if first is None:
                        first = t
                    summary = orderbook_pb2.Summary.FromString(message)
                    if levels is None and (summary.bids or summary.asks):
                        levels = t
                    exchanges = {level.exchange for level in list(summary.bids) + list(summary.asks)}
                    if len(exchanges) >= 2:
                        both = t
                        return
            try:
                await asyncio.wait_for(read(), timeout)
            except asyncio.TimeoutError:
                pass
            return {"first_ms": first, "levels_ms": levels, "both_ms": both}
        finally:
            await channel.close()

    async def handle(self, request: dict) -> Any:
        op = request["op"]
        if op == "open":
            return await self.open(request)
        if op == "counts":
            return self.counts()
        if op == "record":
            return self.record(bool(request["on"]))
        if op == "dump":
            return self.dump(request["path"])
        if op == "close":
            return await self.close(request["group"])
        if op == "first":
            return await self.first(request["symbol"], float(request.get("wait", 10.0)))
        if op == "cpu":
            return {"cpu": self.process.cpu_seconds(), "t": time.time()}
        raise ValueError(f"unknown op {op!r}")


async def serve(address: str) -> None:
    # As in the simulator process: no collector pauses in the load generator's timings.
    gc.collect()
    gc.freeze()
    gc.disable()
    driver = Driver(address)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout

    def reply(obj: Any) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    reply({"ready": True})
    while True:
        line = await reader.readline()
        if not line:
            break
        if not line.strip():
            continue
        request = json.loads(line)
        if request.get("op") == "quit":
            reply({"ok": True})
            break
        try:
            reply(await driver.handle(request))
        except Exception as error:
            print(f"driver: {request.get('op')}: {error!r}", file=sys.stderr, flush=True)
            reply({"error": repr(error)})
    for name in list(driver.groups):
        await driver.close(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.driver")
    parser.add_argument("--address", required=True)
    args = parser.parse_args(argv)
    use_uvloop()  # the clients on the daemon's loop, as the floors
    asyncio.run(serve(args.address))
    return 0


if __name__ == "__main__":
    sys.exit(main())
