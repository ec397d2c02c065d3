"""The results as one Markdown table (what the README's Performance section shows)."""

from __future__ import annotations

from typing import Any


def _n(v: Any, fmt: str = ",.0f", unit: str = "") -> str:
    if v is None:
        return "—"
    return f"{format(v, fmt)}{unit}"


def _ms(v: Any) -> str:
    return _n(v, ".2f", " ms")


def _met(ok: Any) -> str:
    if ok is None:
        return "—"
    return "yes" if ok else "**no**"


# What each venue sends for a book change.
MESSAGE_KINDS = {"bitstamp": "order_book_ whole book", "bybit": "delta",
                 "coinbase": "l2_data update", "kraken": "book update (checksummed)"}


def _venue_rows(bp: dict) -> list[tuple[str, str, str, str, str, str]]:
    """Each venue's own update message against a Binance diff changing as many levels."""
    us, ratios = bp.get("venue_us_per_msg"), bp.get("venue_ratio_to_binance")
    if not us or not ratios:
        return []
    changed = bp.get("venue_changed_levels")
    return [
        (
            f"{venue.capitalize()} {MESSAGE_KINDS.get(venue, 'update')} ({changed} levels of the top 10 changed)",
            _n(us[venue], ".1f", " µs/msg"),
            f"Binance diff, same changes {_n(us['binance'], '.1f', ' µs')}",
            f"{_n(ratios[venue], '.2f')}× Binance",
            "≤ 2× Binance",
            _met(ratios[venue] <= 2.0),
        )
        for venue in sorted(us)
        if venue != "binance"
    ]


def _market_rows(wm: dict | None) -> list[tuple[str, str, str, str, str, str]]:
    """The daemon's CPU share with the whole market in, two venues then five (issue 12:
    ≤ 0.5 of one core for both)."""
    rows = []
    for key in ("two_venues", "five_venues"):
        r = (wm or {}).get(key)
        if not r:
            continue
        venues = r["venues"]
        listing = ", ".join(f"{v['symbols']:,} {e}" for e, v in venues.items())
        cpu, floor = r["daemon_cpu"], r.get("floor")
        rows.append((
            f"Whole market, {len(venues)} venues ({listing} symbols), {r['streams']} streams "
            "(daemon CPU, fraction of one core)",
            f"{_n(cpu, '.3f')} at {_n(r['received_msgs_per_s'])} msgs/s in"
            f"{' (simulator-limited)' if r.get('simulator_limited') else ''}; "
            f"{_n(r['summaries_per_s'])} Summaries/s out",
            f"bare Autobahn + orjson, same input: {_n(floor['cpu'], '.3f')} at {_n(floor['msgs_per_s'])} msgs/s"
            if floor else "— (the floor client speaks Binance and Bitstamp only)",
            f"{_n(cpu / floor['cpu'], '.1f')}× floor" if floor and floor["cpu"] else "—",
            "≤ 0.5",
            _met(cpu <= 0.5),
        ))
    return rows


def render(results: dict, details: dict) -> str:
    rows: list[tuple[str, str, str, str, str, str]] = []
    ingest = details.get("ingest", {})
    for n, r in sorted(ingest.items(), key=lambda kv: int(kv[0])):
        rate, floor = r.get("msgs_per_s"), r.get("floor_msgs_per_s")
        ratio = rate / floor if rate is not None and floor else None
        limited = " (simulator-limited)" if r.get("simulator_limited") else ""
        target = "≥ 30,000/s and ≥ 28% of floor" if n == "1500" else ""
        met = (rate >= 30_000 and ratio is not None and ratio >= 0.28) if n == "1500" and rate is not None else None
        rows.append((
            f"Ingest, {int(n):,} symbols, 10 streams (msgs/s kept up with)",
            f"{_n(rate)}{limited}; lag p99 {_ms((r.get('lag') or {}).get('p99_ms'))}",
            f"bare Autobahn + orjson {_n(floor)}",
            _n(ratio, ".0%"),
            target,
            _met(met),
        ))
    bp = details.get("bookpath")
    if bp:
        ours, cf = bp.get("ours_us_per_msg"), bp.get("cryptofeed_us_per_msg")
        speedup = cf / ours if cf and ours else None
        comparison = (
            f"cryptofeed {bp.get('cryptofeed_version')} handler {_n(cf, '.1f', ' µs')}"
            if cf is not None
            else f"cryptofeed: {bp.get('cryptofeed_skipped', 'skipped')}"
        )
        if bp.get("floor_us_per_msg") is not None:
            comparison += f"; floor (decode + SortedDict apply + top 10) {_n(bp['floor_us_per_msg'], '.1f', ' µs')}"
        rows.append((
            f"Book path: parse + apply + re-merge + serialize ({bp.get('messages'):,} msgs)",
            _n(ours, ".1f", " µs/msg"),
            comparison,
            f"{_n(speedup, '.2f')}× cryptofeed's speed" if speedup else "—",
            "≥ 2× cryptofeed",
            _met(speedup >= 2.0 if speedup else None),
        ))
        floor = bp.get("floor_us_per_msg")
        if floor:
            rows.append((
                "Book path against its floor",
                _n(ours, ".1f", " µs/msg"),
                f"floor {_n(floor, '.1f', ' µs')}",
                f"{_n(ours / floor, '.2f')}× floor",
                "≤ 2× floor",
                _met(ours / floor <= 2.0),
            ))
        bs, bs_floor = bp.get("bitstamp_us_per_msg"), bp.get("bitstamp_floor_us_per_msg")
        if bs is not None:
            rows.append((
                "Bitstamp order_book_ message (100+100 levels, top 10 changed)",
                _n(bs, ".1f", " µs/msg"),
                f"orjson decode alone {_n(bs_floor, '.1f', ' µs')}",
                f"{_n(bs / bs_floor, '.2f')}× floor" if bs_floor else "—",
                "≤ 20 µs",
                _met(bs <= 20.0),
            ))
        rows += _venue_rows(bp)
    for key, r in (details.get("latency") or {}).items():
        target, met = "", None
        if key == "5k_100":
            target, met = "p99 ≤ 5 ms", (r.get("p99_ms") is not None and r["p99_ms"] <= 5.0)
        if key == "5k_1000":
            target, met = "p99.9 ≤ 25 ms", (r.get("p999_ms") is not None and r["p999_ms"] <= 25.0)
        rows.append((
            f"Latency {r['rate']:,} msgs/s in, {r['streams']:,} streams / {r['symbols']} symbols",
            f"p50 {_ms(r.get('p50_ms'))}, p99 {_ms(r.get('p99_ms'))}, p99.9 {_ms(r.get('p999_ms'))}",
            f"{r.get('samples', 0):,} samples; {_n(r.get('delivered_msgs_per_s'))} Summaries/s, "
            f"{_n(r.get('conflated_share'), '.0%')} conflated",
            "",
            target,
            _met(met),
        ))
    fo = details.get("fanout")
    if fo:
        floor = fo["floor"]
        streams = max(int(k) for k in floor if k.isdigit())
        f_n = floor[str(streams)]
        ratio = fo.get("ratio_to_floor")
        rows.append((
            f"Fan-out, {streams:,} streams (Summaries/s delivered)",
            f"{_n(fo['delivered_msgs_per_s'])}; daemon CPU {_n(fo['daemon_cpu'], '.0%')} "
            f"({_n(fo.get('daemon_cpu_us_per_summary'), '.1f')} µs/Summary); "
            f"{_n(fo['conflated_share'], '.0%')} conflated",
            f"bare grpc.aio {_n(f_n['msgs_per_s'])} (CPU {_n(f_n['server_cpu'], '.0%')}, "
            f"{_n(f_n.get('server_cpu_us_per_msg'), '.1f')} µs/msg); 1 stream {_n(floor['1']['msgs_per_s'])}",
            _n(ratio, ".0%"),
            "≥ 100% of floor",
            _met(ratio >= 1.0 if ratio is not None else None),
        ))
    rows += _market_rows(details.get("whole_market"))
    if results.get("rss_mb_live_books") is not None:
        rows.append((
            f"Memory: RSS with {results.get('ingest_symbols', 0):,} live symbol books",
            _n(results["rss_mb_live_books"], ".0f", " MiB"), "", "", "", "—",
        ))
    sc = details.get("slow_clients")
    if sc:
        growth = results.get("rss_growth_pct_slow_clients")
        n = len(sc.get("rss_samples_mb", []))
        rows.append((
            "Memory: RSS over the run with slow clients",
            f"{_n(sc['rss_start_mb'], '.1f')} → {_n(sc['rss_end_mb'], '.1f')} MiB ({_n(growth, '+.1f')}%), "
            f"max {_n(sc['rss_max_mb'], '.1f')}",
            f"{n} samples",
            "",
            "≤ 5% growth",
            _met(growth <= 5.0 if growth is not None else None),
        ))
        ratio = sc.get("p99_ratio")
        rows.append((
            "Fast clients' p99 with slow clients / without",
            f"{_ms(sc['fast_during'].get('p99_ms'))} / {_ms(sc['fast_before'].get('p99_ms'))}",
            "",
            _n(ratio, ".2f", "×"),
            "≤ 1.2×",
            _met(ratio <= 1.2 if ratio is not None else None),
        ))
    fs = details.get("first_summary")
    if fs:
        for key, r in fs.items():
            rows.append((
                f"Time to first Summary, snapshot latency {key}",
                f"both exchanges {_ms(r.get('both_ms'))}",
                f"first (empty) {_ms(r.get('first_ms'))}; first with levels {_ms(r.get('levels_ms'))}",
                "", "", "—",
            ))
    header = ("benchmark", "result", "floor / comparison, same run", "ratio", "target", "met")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
    return "\n".join(lines)
