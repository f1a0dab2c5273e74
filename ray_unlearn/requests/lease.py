"""Keep a processor's leases alive while it works: renew every held request every lease/3."""

from __future__ import annotations

import logging
import threading

from ray_unlearn.requests.models import BatchAborted, LeaseLost

logger = logging.getLogger(__name__)


class LeaseKeeper:
    """A daemon thread renewing the leases of the requests still held. A request is dropped
    before its final transition (complete / fail / release), so that renewing it then is not
    mistaken for a lost lease. `check()` raises once any held lease was lost."""

    def __init__(self, queue, holder: str, ids: list[str], interval: float):
        self.queue, self.holder, self.interval = queue, holder, max(interval, 0.05)
        self._held = list(ids)
        self._lost: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-keeper-{holder}", daemon=True)
        self._thread.start()

    def held_ids(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def drop(self, rid: str) -> None:
        with self._lock:
            if rid in self._held:
                self._held.remove(rid)

    def lost(self) -> dict[str, str]:
        with self._lock:
            return dict(self._lost)

    def check(self) -> None:
        lost = self.lost()
        if lost:
            rid, why = next(iter(lost.items()))
            raise BatchAborted(f"lost the lease of {rid} ({why}); its result must not ship")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            for rid in self.held_ids():
                try:
                    self.queue.renew(rid, self.holder)
                except LeaseLost as err:
                    with self._lock:
                        if rid in self._held:  # not a request we just finished ourselves
                            self._lost[rid] = str(err)
                except Exception as err:  # a store hiccup: the next round retries; the lease has slack
                    logger.warning("renewing %s failed (%s: %s); retrying", rid, type(err).__name__, err)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
