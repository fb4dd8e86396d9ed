"""Make the next steps' inputs on one background thread while the current step trains.

`Prefetcher(make, steps)` calls `make(step)` for `steps` in order on a single thread and hands
the results back in that order through a bounded queue (`depth` steps ahead, 1 or 2), so the
batches are exactly the ones the loop would make itself, only earlier. An exception in `make`
is re-raised by `get` in the caller's thread. `close()` stops the thread (it is also a daemon,
so an interrupted run never hangs on it).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch

_DONE = object()


class Prefetcher:
    def __init__(self, make: Callable[[int], Any], steps: Iterable[int], depth: int = 1):
        if depth not in (1, 2):
            raise ValueError(f"prefetch depth {depth}: 1 or 2 steps")
        self._make, self._steps = make, list(steps)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._threads = torch.get_num_threads()  # the run's intra-op threads, in this thread too
        self._thread = threading.Thread(target=self._work, name="draftsmith-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        """Queue `item` unless stopped meanwhile; False once stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        torch.set_num_threads(self._threads)
        for step in self._steps:
            if self._stop.is_set():
                return
            try:
                item = (step, self._make(step), None)
            except BaseException as e:  # handed to the main thread, raised there
                self._put((step, None, e))
                return
            if not self._put(item):
                return
        self._put((None, _DONE, None))

    def get(self, step: int):
        """The inputs of `step` (the next one in order); re-raises the worker's exception."""
        got, value, error = self._queue.get()
        if error is not None:
            self.close()
            raise error
        if value is _DONE or got != step:
            self.close()
            raise RuntimeError(f"prefetch: asked for step {step}, the next one made is {got}")
        return value

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a worker waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=60)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
