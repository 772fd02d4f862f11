"""DeferredStore: store calls leave the reactor thread in order, in batches."""

from __future__ import annotations

import queue
import threading

from twisted.python.threadpool import ThreadPool

from nekojump.store import DeferredStore


class ThreadedReactor:
    """Collects what the store thread hands back, for the test to run."""

    def __init__(self) -> None:
        self.calls: queue.Queue = queue.Queue()

    def callFromThread(self, f, *args) -> None:
        self.calls.put((f, args))


def test_calls_made_while_the_thread_is_busy_go_over_together_and_in_order():
    reactor = ThreadedReactor()
    pool = ThreadPool(minthreads=1, maxthreads=1, name="test-store")
    pool.start()
    try:
        store = DeferredStore(object(), reactor, pool)
        busy = threading.Event()
        release = threading.Event()

        def slow() -> str:
            busy.set()
            release.wait(5)
            return "slow"

        results: list[object] = []
        store.call(slow).addCallback(results.append)
        assert busy.wait(5)
        for i in range(20):
            store.call(lambda i=i: i).addCallback(results.append)
        store.call(lambda: 1 / 0).addErrback(lambda f: results.append(f.type))
        release.set()
        hops = 0
        while len(results) < 22:
            f, args = reactor.calls.get(timeout=5)
            f(*args)
            hops += 1
    finally:
        pool.stop()
    assert results == ["slow", *range(20), ZeroDivisionError]
    assert hops == 2  # the slow call alone, then the 21 queued behind it
