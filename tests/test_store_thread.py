"""DeferredStore: store calls leave the reactor thread in order, in batches."""

from __future__ import annotations

import queue
import sqlite3
import threading

import pytest
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool

from nekojump.store import DeferredStore, SQLiteStore


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


class ClockAndThreads(Clock):
    """A ``Clock`` that also collects what the store thread hands back."""

    def __init__(self) -> None:
        super().__init__()
        self.handed_back: queue.Queue = queue.Queue()

    def callFromThread(self, f, *args) -> None:
        self.handed_back.put((f, args))

    def deliver(self, count: int = 1) -> None:
        for _ in range(count):
            f, args = self.handed_back.get(timeout=5)
            f(*args)


@pytest.fixture
def sqlite(tmp_path) -> SQLiteStore:
    store = SQLiteStore.open(tmp_path)
    yield store
    store.close()


@pytest.fixture
def threaded(sqlite):
    reactor = ClockAndThreads()
    pool = ThreadPool(minthreads=1, maxthreads=1, name="test-store")
    store = DeferredStore(sqlite, reactor, pool)
    store.start()
    yield store, reactor
    store.stop()


def test_writes_nobody_waits_for_commit_together_and_each_fails_alone(threaded, sqlite):
    store, reactor = threaded
    in_transaction: list[bool] = []

    def audit(event: str) -> str:
        in_transaction.append(sqlite._db.in_transaction)
        sqlite.audit(event, member="alice")
        return event

    def broken() -> None:
        sqlite._db.execute("INSERT INTO no_such_table VALUES (1)")

    results: list[object] = []
    for event in ("ssh-login", "bind"):
        store.write_later(audit, event).addCallback(results.append)
    store.write_later(broken).addErrback(lambda f: results.append(f.type))
    store.write_later(audit, "unbind").addCallback(results.append)
    assert reactor.handed_back.empty() and results == []  # waiting for company

    reactor.advance(DeferredStore.WRITE_DELAY)
    reactor.deliver()

    assert results == ["ssh-login", "bind", sqlite3.OperationalError, "unbind"]
    assert in_transaction == [True, True, True]  # one transaction for all
    assert [e["event"] for e in sqlite.audit_events(member="alice")] == [
        "unbind",
        "bind",
        "ssh-login",
    ]


def test_stopping_commits_the_waiting_writes(tmp_path):
    sqlite = SQLiteStore.open(tmp_path)
    reactor = ClockAndThreads()
    store = DeferredStore(sqlite, reactor, ThreadPool(1, 1, name="test-store"))
    store.start()
    store.write_later(sqlite.audit, "disconnect", member="alice")
    store.stop()
    sqlite.close()
    again = SQLiteStore.open(tmp_path)
    assert [e["event"] for e in again.audit_events(member="alice")] == ["disconnect"]
    again.close()


def test_a_transaction_inside_another_takes_back_only_its_own_statements(sqlite):
    with sqlite.transaction():
        sqlite.audit("kept", member="alice")
        with pytest.raises(sqlite3.IntegrityError), sqlite.transaction():
            sqlite.audit("taken-back", member="alice")
            sqlite.audit(None)  # event may not be NULL
    assert [e["event"] for e in sqlite.audit_events(member="alice")] == ["kept"]
