"""The train loop's prefetch thread: same items, same order, errors raised in the caller."""

import threading
import time

import pytest

from draftsmith.train.prefetch import Prefetcher


def test_items_come_in_order_and_ahead_of_time():
    made = []

    def make(step):
        made.append((step, threading.current_thread().name))
        return [step * 10]

    with Prefetcher(make, range(3, 8)) as feed:
        got = [feed.get(step) for step in range(3, 8)]
    assert got == [[30], [40], [50], [60], [70]]
    assert [s for s, _ in made] == [3, 4, 5, 6, 7]
    assert all(name == "draftsmith-prefetch" for _, name in made)  # made on the background thread


def test_queue_is_bounded():
    made = []
    feed = Prefetcher(made.append, range(100), depth=1)
    time.sleep(0.3)
    # one item queued, one made and waiting to be queued: never the whole range
    assert len(made) <= 3
    feed.get(0)
    feed.close()
    assert not feed._thread.is_alive()


def test_errors_are_raised_in_the_callers_thread():
    def make(step):
        if step == 2:
            raise ValueError("bad shard 2")
        return step

    feed = Prefetcher(make, range(5))
    assert feed.get(0) == 0 and feed.get(1) == 1
    with pytest.raises(ValueError, match="bad shard 2"):
        feed.get(2)
    assert not feed._thread.is_alive()


def test_asking_out_of_order_fails():
    feed = Prefetcher(lambda s: s, range(4))
    with pytest.raises(RuntimeError, match="asked for step 1"):
        feed.get(1)
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(lambda s: s, range(4), depth=3)
