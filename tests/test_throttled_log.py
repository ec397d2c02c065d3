from twisted.internet.task import Clock
from twisted.logger import Logger

from aggregator.throttled_log import ThrottledLog


def test_one_line_per_burst_with_a_count_of_the_rest():
    events = []
    clock = Clock()
    log = ThrottledLog(Logger(observer=events.append), clock, window=10)
    for _ in range(1000):
        log.warn("bad_number", "rejected {what}", what="x")
    log.warn("malformed_json", "malformed")
    assert len(events) == 2
    clock.advance(10)
    log.warn("bad_number", "rejected {what}", what="y")
    assert len(events) == 3
    assert events[-1]["suppressed"] == 999
    assert "999 similar" in events[-1]["log_format"].format(**events[-1])
