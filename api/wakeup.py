"""Wake-up messages for committed jobs, sent by one background thread of the API process.

A request only hands the job id over, after its transaction commits; the thread sends what has
piled up and records the sends with one UPDATE per batch, so a burst of job creations costs one
extra write, not one per job. A send that never happens (the process died, the broker is down and
the circuit is open) leaves `enqueued_at` empty, and a worker's reaper sends the job instead.
"""

from __future__ import annotations

import logging
import queue
import threading

from store.queue import Sender, send_wake_ups
from store.settings import Settings

log = logging.getLogger(__name__)
MAX_BATCH = 500


class WakeUps:
    def __init__(self, sender: Sender, sessions, settings: Settings):
        self.sender, self.sessions, self.settings = sender, sessions, settings
        self._pending: queue.SimpleQueue[tuple[str, int | None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job_id: str, total_steps: int | None) -> None:
        self._pending.put((job_id, total_steps))
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, daemon=True,
                                                    name="driftsafe-wakeups")
                    self._thread.start()

    def _batch(self) -> list[tuple[str, int | None]]:
        batch = [self._pending.get()]
        while len(batch) < MAX_BATCH:
            try:
                batch.append(self._pending.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while True:
            try:
                self.send(self._batch())
            except Exception:  # noqa: BLE001 - the reaper covers whatever this pass missed
                log.exception("sending wake-up messages failed")

    def send(self, batch: list[tuple[str, int | None]]) -> None:
        send_wake_ups(self.sender.send, self.sessions, self.settings, batch)
