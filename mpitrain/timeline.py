"""A timeline of every step, as Chrome trace events (Perfetto, chrome://tracing).

One recorder per process (``RECORDER``), off unless ``--timeline FILE.json``
is given; then each phase of a step is a complete event (``"ph": "X"``) on
its thread: data wait, each layer's forward and backward, each bucket's
exchange (on the exchange thread, so overlap shows as two rows at once),
the optimizer, checkpoints, pipeline sends and receives, recoveries.  Only
the steps of a window (``--timeline-steps A:B``) are recorded, so a long run
stays small.  At the end rank 0 gathers every rank's events (buffer-based,
as JSON bytes) and writes one file: one process per rank, one row per
thread, times from a barrier all ranks left together::

    with span("forward", "compute", layer="0: Linear(784, 1024)"):
        ...

A span costs one attribute test when the recorder is off.
"""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple

__all__ = ["Recorder", "RECORDER", "span"]


class Recorder:
    """Events of this process, recorded while ``on`` (a step of the window runs)."""

    def __init__(self) -> None:
        self.enabled = False  # a timeline was asked for
        self.on = False  # recording now (the current step is in the window)
        self.window: Tuple[int, int] = (1, 1 << 62)  # 1-based steps, inclusive
        self.events: List[Dict[str, Any]] = []
        self._t0 = time.perf_counter()
        self._tids: Dict[int, Tuple[int, str]] = {}
        self._lock = threading.Lock()

    def start(self, comm, window: Optional[Tuple[int, int]] = None) -> None:
        """Begin (collective): times count from a barrier every rank leaves together."""
        self.enabled, self.events, self._tids = True, [], {}
        self.window = window or (1, 1 << 62)
        comm.Barrier()
        self._t0 = time.perf_counter()

    def at_step(self, step: int) -> None:
        """Step ``step`` (1-based) begins: record it if it lies in the window."""
        self.on = self.enabled and self.window[0] <= step <= self.window[1]

    def _tid(self) -> int:
        ident = threading.get_ident()
        if ident not in self._tids:
            with self._lock:
                name = threading.current_thread().name
                self._tids[ident] = (len(self._tids), "main" if name == "MainThread" else name)
        return self._tids[ident][0]

    def add(self, name: str, cat: str, start: float, end: float, args: Dict[str, Any]) -> None:
        """A complete event from perf_counter times ``start`` to ``end``."""
        event = {"name": name, "cat": cat, "ph": "X", "tid": self._tid(),
                 "ts": round((start - self._t0) * 1e6, 1),
                 "dur": round((end - start) * 1e6, 1)}
        if args:
            event["args"] = args
        self.events.append(event)  # list.append is atomic under the GIL

    def encoded(self, rank: int) -> bytes:
        """This rank's events and thread names as JSON, with ``pid`` = ``rank``."""
        events = [dict(e, pid=rank) for e in self.events]
        events.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0,
                       "args": {"name": f"rank {rank}"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0,
                       "args": {"sort_index": rank}})
        for tid, name in self._tids.values():
            events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid,
                           "args": {"name": name}})
        return json.dumps(events).encode()

    def write(self, comm, path: str, meta: Optional[Dict[str, Any]] = None) -> Optional[int]:
        """Gather every rank's events on rank 0 and write ``path`` there (collective);
        return the number of events (rank 0; None elsewhere)."""
        import numpy as np

        mine = np.frombuffer(self.encoded(comm.Get_rank()), np.uint8)
        sizes = comm.gather(int(mine.size), root=0)
        buf = np.empty(sum(sizes), np.uint8) if comm.Get_rank() == 0 else None
        comm.Gatherv(mine, [buf, (sizes, [sum(sizes[:k]) for k in range(len(sizes))])]
                     if comm.Get_rank() == 0 else None, root=0)
        self.enabled = self.on = False
        if comm.Get_rank() != 0:
            return None
        events: List[Dict[str, Any]] = []
        offset = 0
        for size in sizes:
            events += json.loads(bytes(buf[offset:offset + size]).decode())
            offset += size
        from .paths import replace

        with replace(path) as f:  # whole or not at all
            json.dump({"traceEvents": events, "displayTimeUnit": "ms",
                       "otherData": dict(meta or {})}, f)
        return len(events)


RECORDER = Recorder()


@contextmanager
def _span(name: str, cat: str, args: Dict[str, Any]) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        RECORDER.add(name, cat, start, time.perf_counter(), args)


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


_NOTHING = _Nothing()


def span(name: str, cat: str, **args: Any):
    """A context manager recording ``name`` (category ``cat``) while the recorder is on."""
    if not RECORDER.on:
        return _NOTHING
    return _span(name, cat, args)
