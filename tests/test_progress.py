"""The construct bar: per image, its clock starts when the engine is up, and nothing is counted twice.

Driven here with the events engine actors push (no Ray: the bar's poller finds no channel and stops); a real run's
bar is checked in test_resume (the resumed run shows it).
"""

from __future__ import annotations

import io
import time

from rms_ray.common.progress import ImageProgress, ProgressChannel


def test_bar_counts_each_image_once_and_starts_its_clock_with_the_engine(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    with ImageProgress(3, None) as bar:
        assert bar.bar.desc == "construct (starting engine…)"
        started = bar.bar.start_t
        time.sleep(0.05)  # engine start-up: must not count into rate or ETA
        bar.event({"kind": "engine_ready", "init_s": 0.05, "dtype": "bfloat16"})
        assert "starting engine" not in bar.bar.desc and bar.bar.start_t > started
        bar.event({"kind": "engine_ready"})  # a second replica: the clock keeps running
        clock = bar.bar.start_t
        bar.event({"kind": "image", "image_id": "a", "status": "accepted"})
        assert bar.bar.n == 1  # one image, not one batch
        bar.event({"kind": "image", "image_id": "a", "status": "accepted"})  # a retried batch reports again
        bar.committed({"image_id": "a", "status": "accepted"})
        assert bar.bar.n == 1 and bar.n_committed == 1
        bar.committed({"image_id": "b", "status": "rejected"})  # its event was lost: the batch result counts it
        bar.event({"kind": "image", "image_id": "c", "status": "rejected"})
        assert bar.bar.n == 3 and bar.counts == {"accepted": 1, "rejected": 2} and bar.bar.start_t == clock
    assert "committed=2" in err.getvalue().replace("\r", "\n").splitlines()[-1]


def test_channel_hands_out_events_once_in_order():
    ch = ProgressChannel()
    ch.push({"n": 1})
    ch.push({"n": 2})
    assert ch.drain() == [{"n": 1}, {"n": 2}] and ch.drain() == []
