"""GcTuning: the collector's pauses measured, the heap frozen, everything undone on stop."""

import gc

import pytest
from prometheus_client import REGISTRY
from twisted.internet.task import Clock

from aggregator.gcpause import YOUNG_THRESHOLD, GcTuning
from aggregator.tap import Options


def pauses(generation):
    return REGISTRY.get_sample_value(
        "aggregator_gc_pause_seconds_count", {"generation": str(generation)}) or 0.0


def test_tuned_freezes_the_heap_raises_the_threshold_and_measures_pauses():
    before_threshold = gc.get_threshold()
    clock = Clock()
    service = GcTuning("tuned", clock, settle=(60.0, 300.0))
    service.startService()
    try:
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD
        frozen = gc.get_freeze_count()
        assert frozen > 0
        counted = pauses(2)
        gc.collect()
        assert pauses(2) == counted + 1
        garbage = [[] for _ in range(1000)]  # settled objects are frozen after `settle`
        clock.advance(60.0)
        assert gc.get_freeze_count() > frozen
        del garbage
        more = [[] for _ in range(1000)]
        frozen = gc.get_freeze_count()
        clock.advance(239.0)
        assert gc.get_freeze_count() == frozen
        clock.advance(1.0)  # 300 s after start
        assert gc.get_freeze_count() > frozen
        assert not clock.getDelayedCalls()  # a bounded number of freezes
        del more
    finally:
        service.stopService()
    assert gc.get_threshold() == before_threshold
    assert gc.get_freeze_count() == 0
    counted = pauses(2)
    gc.collect()
    assert pauses(2) == counted  # no longer measured
    assert not clock.getDelayedCalls()


def test_python_mode_only_measures():
    before_threshold = gc.get_threshold()
    service = GcTuning("python", Clock())
    service.startService()
    try:
        assert gc.get_threshold() == before_threshold
        assert gc.get_freeze_count() == 0
        counted = pauses(1)
        gc.collect(1)
        assert pauses(1) == counted + 1
    finally:
        service.stopService()


def test_the_gc_option_takes_only_known_modes():
    options = Options()
    options.parseOptions(["--gc", "python"])
    assert options["gc"] == "python"
    with pytest.raises(Exception, match="--gc must be one of tuned, python"):
        Options().parseOptions(["--gc", "off"])
    with pytest.raises(ValueError):
        GcTuning("off", Clock())
