"""A one-minute soak in CI (`benchmarks/soak.py` runs it for 30): the serving stack under bursty traffic with
random cancels, disconnects and deadlines, kunserve dropping and restoring, and nothing leaking."""

from __future__ import annotations

import pytest

from benchmarks.soak import check, run

pytestmark = pytest.mark.timeout(600)


def test_a_minute_of_bursts_cancels_disconnects_and_deadlines_leaks_nothing(tmp_path):
    report = run(60.0, model_dir=None, log=lambda *_: None)
    assert not check(report), (check(report), report)
    assert report["streams"] > 100 and {"cancelled", "disconnected"} <= set(report["outcomes"])
