"""Claims: how runners sharing one store compute each cell once.

Before computing a cell, a runner claims its key in the store's ``claims`` table (owner ``host:pid:uuid``, a
heartbeat timestamp); a background thread refreshes the heartbeat of all its claims every ``heartbeat_s`` while
it works. A cell already finished (by an accepted code version) is skipped; a cell claimed by a live owner is
left for later and polled until it is finished or its claim expires (heartbeat older than ``timeout_s``, or the
owner's pid is gone on this host), then taken over. Every executor (inline, local processes, Ray) goes through
:class:`Claimer` and :meth:`Claimer.next_cell`, in the driver process.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Generic, TypeVar

from . import provenance
from .store import ResultStore, this_host

T = TypeVar("T")


class Claimer(Generic[T]):
    """One runner's claims on a store.

    Args:
        store: the store (its path is reopened by the heartbeat thread, which needs its own connection).
        reuse_stale: a finished row of another code version counts as done (else it is recomputed).
        timeout_s: heartbeat age after which another owner's claim expires.
        heartbeat_s: how often this runner refreshes its claims.
        poll_s: how long to wait before looking again at cells other owners are computing.
    """

    def __init__(self, store: ResultStore, *, reuse_stale: bool = False, timeout_s: float = 60.0,
                 heartbeat_s: float = 5.0, poll_s: float = 0.5) -> None:
        if heartbeat_s >= timeout_s:
            raise ValueError(f"heartbeat_s={heartbeat_s} must be below timeout_s={timeout_s}")
        self.store = store
        self.pid = os.getpid()
        self.owner = f"{this_host()}:{self.pid}:{uuid.uuid4().hex[:12]}"
        self.code_version = provenance.code_version()
        self.accept: set[str] | None = None if reuse_stale else {self.code_version}
        self.timeout_s, self.heartbeat_s, self.poll_s = timeout_s, heartbeat_s, poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ lifetime
    def __enter__(self) -> Claimer[T]:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="lmcompress-claims-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.store.release_all(self.owner)

    def _beat(self) -> None:
        store = ResultStore(self.store.path)
        try:
            while not self._stop.wait(self.heartbeat_s):
                store.heartbeat(self.owner)
        finally:
            store.close()

    # ----------------------------------------------------------------------------------------- claiming
    def claim(self, key: str) -> str:
        """``"done"``, ``"busy"`` or ``"claimed"`` (see :meth:`ResultStore.try_claim`)."""
        return self.store.try_claim(key, self.owner, self.pid, accept=self.accept, timeout_s=self.timeout_s)

    def release(self, key: str) -> None:
        self.store.release(key, self.owner)

    def next_cell(self, pending: list[tuple[T, str]], *, on_done: Callable[[str], None],
                  wait: bool) -> tuple[T, str] | None:
        """Take the first cell of ``pending`` this runner can compute now and claim it.

        Cells found finished are dropped from ``pending`` (``on_done(key)`` is called for each). Cells claimed by
        live owners stay. With ``wait`` (nothing else to do) this polls until a cell can be claimed or
        ``pending`` is empty; without, it returns None at once when none can be claimed.
        """
        while pending:
            for entry in list(pending):
                state = self.claim(entry[1])
                if state == "done":
                    pending.remove(entry)
                    on_done(entry[1])
                elif state == "claimed":
                    pending.remove(entry)
                    return entry
            if not wait or not pending:
                return None
            time.sleep(self.poll_s)
        return None
