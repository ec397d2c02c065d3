from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock

from aggregator.ratelimit import RestLimiter


def granted_times(limiter, clock, weights, until=120.0, step=0.05):
    times, pending = [], []
    for weight in weights:
        d = limiter.acquire(weight)
        d.addCallback(lambda _: (times.append(clock.seconds()), limiter.release()))
        pending.append(d)
    while clock.seconds() < until and len(times) < len(weights):
        clock.advance(step)
    return times


def test_weight_budget_is_never_exceeded_and_requests_are_staggered():
    clock = Clock()
    limiter = RestLimiter(clock, weight_per_minute=600, burst_seconds=5)  # 10/s, burst 50
    times = granted_times(limiter, clock, [50] * 20)
    assert len(times) == 20
    # Within any 60 s window: at most the budget plus the initial burst allowance.
    for i, start in enumerate(times):
        in_window = sum(50 for t in times[i:] if t < start + 60)
        assert in_window <= 600 + 50
    assert times[-1] >= 19 * 5 - 1  # one 50-weight request per 5 s after the burst


def test_concurrency_cap():
    clock = Clock()
    limiter = RestLimiter(clock, weight_per_minute=60000, concurrency=2)
    granted = []
    for i in range(5):
        limiter.acquire(1).addCallback(lambda _, i=i: granted.append(i))
    assert granted == [0, 1]
    limiter.release()
    assert granted == [0, 1, 2]


def test_retry_after_stops_everything_until_it_elapses():
    clock = Clock()
    limiter = RestLimiter(clock, weight_per_minute=60000)
    limiter.block(30, 429)
    granted = []
    limiter.acquire(1).addCallback(lambda _: granted.append(clock.seconds()))
    clock.advance(29.9)
    assert granted == []
    clock.advance(0.2)
    assert granted and granted[0] >= 30


def test_cancelled_waiter_leaves_the_queue():
    clock = Clock()
    limiter = RestLimiter(clock, weight_per_minute=60, burst_seconds=1)
    limiter.acquire(1)
    waiting = limiter.acquire(1)
    failures = []
    waiting.addErrback(lambda f: failures.append(f.check(CancelledError)))
    waiting.cancel()
    assert failures == [CancelledError]
    limiter.stop()
    assert clock.getDelayedCalls() == []
