"""Per-image progress from engine actors to the driver's bar.

Ray Data hands the driver an actor's output only when a whole ``map_batches`` call returns, i.e. a batch at a
time, while an engine actor finishes the images of a batch one by one (one flow per image). So the actors also
push tiny events into a :class:`ProgressChannel` (a Ray actor that needs no CPU): ``engine_ready`` once an engine
is up, ``image`` as each image's generation ends. The driver's :class:`ImageProgress` drains it twice a second.

What the bar counts is honest about what it knows: an image counts when its generation ends; it is committed (and
survives an interruption) with the rest of its batch, shown as ``committed=``. The bar says "starting engine…"
and its clock (rate, ETA) starts only once the first engine is up, so start-up does not inflate the first ETA.
Events are best effort (a lost one costs a late tick, never a count): the batch results the driver reads anyway
are the authority, and both are counted once per image id.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

POLL_S = 0.5


class ProgressChannel:
    """Ray actor body: engine actors :meth:`push` small dicts, the driver :meth:`drain` s them in order."""

    def __init__(self) -> None:
        self._events: list[dict[str, Any]] = []

    def push(self, event: dict[str, Any]) -> None:
        """Append one event (called fire-and-forget: ``channel.push.remote(event)``)."""
        self._events.append(event)

    def drain(self) -> list[dict[str, Any]]:
        """Every event pushed since the last drain, oldest first."""
        events, self._events = self._events, []
        return events


def start_channel() -> Any:
    """A new :class:`ProgressChannel` actor (0 CPUs: it never competes with the engines); Ray must be running."""
    import ray

    return ray.remote(num_cpus=0)(ProgressChannel).remote()


def report(channel: Any, event: dict[str, Any]) -> None:
    """Push ``event`` to ``channel`` without waiting; a missing or broken channel never fails the caller."""
    if channel is None:
        return
    try:
        channel.push.remote(event)
    except Exception:  # noqa: BLE001 - progress is cosmetic; the batch results are the record
        pass


class ImageProgress:
    """The driver's bar over ``total`` images, fed by a channel's events and by committed batch rows.

    Use as a context manager; :meth:`committed` takes each summary row the pipeline yields.
    """

    def __init__(self, total: int, channel: Any, desc: str = "construct") -> None:
        from tqdm import tqdm

        self.total, self.channel, self.desc = total, channel, desc
        self.engine_up = False
        self.done: dict[str, str] = {}  # image id -> status (generation ended)
        self.counts: dict[str, int] = {}  # status -> images
        self.n_committed = 0
        self._committed_ids: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.bar = tqdm(total=total, desc=f"{desc} (starting engine…)", unit="img", dynamic_ncols=True)
        # rms_ray's console log lines (milestones, warnings) print above the bar instead of through it
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger("rms_ray")])
        self._redirect.__enter__()
        self._thread = threading.Thread(target=self._poll, name="progress-poll", daemon=True)
        self._thread.start()

    def __enter__(self) -> "ImageProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _poll(self) -> None:
        import ray

        while not self._stop.wait(POLL_S):
            try:
                events = ray.get(self.channel.drain.remote(), timeout=10)
            except ray.exceptions.GetTimeoutError:  # the channel's process is still starting (busy machine)
                continue
            except Exception:  # noqa: BLE001 - Ray shutting down, channel gone: the rows still count
                return
            for ev in events:
                self.event(ev)

    def event(self, ev: dict[str, Any]) -> None:
        """Apply one channel event (``engine_ready`` or ``image``)."""
        with self._lock:
            if ev.get("kind") == "engine_ready" and not self.engine_up:
                self.engine_up = True
                self.bar.set_description(self.desc, refresh=False)
                n = self.bar.n
                self.bar.reset(total=self.total)  # restarts the clock: rate and ETA from engine-up on
                self.bar.update(n)
            elif ev.get("kind") == "image":
                self._count(str(ev["image_id"]), str(ev.get("status", "")))

    def committed(self, row: dict[str, Any]) -> None:
        """Count a committed image (a summary row of the pipeline's output)."""
        with self._lock:
            image_id = str(row["image_id"])
            if image_id not in self._committed_ids:
                self._committed_ids.add(image_id)
                self.n_committed += 1
            self._count(image_id, str(row["status"]))

    def _count(self, image_id: str, status: str) -> None:
        new = image_id not in self.done
        if new:
            self.done[image_id] = status
            self.counts[status] = self.counts.get(status, 0) + 1
        self.bar.set_postfix({**self.counts, "committed": self.n_committed}, refresh=False)
        if new:
            self.bar.update(1)  # redraws (at most every tqdm mininterval); a commit alone waits for the next one

    def close(self) -> None:
        """Stop polling and close the bar (idempotent)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * POLL_S + 10)
        with self._lock:
            if self._redirect is not None:
                self._redirect.__exit__(None, None, None)
                self._redirect = None
            self.bar.close()
