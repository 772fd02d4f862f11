"""DeferredStore: store calls leave the reactor thread in order, in batches."""

from __future__ import annotations

import queue
import sqlite3
import threading

import pytest
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool

from nekojump.store import DONE_REQUESTS_KEPT, DeferredStore, SQLiteStore


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


def test_a_write_that_fails_halfway_leaves_nothing_and_the_others_commit(threaded, sqlite):
    store, reactor = threaded

    def two_steps() -> None:
        sqlite.audit("half", member="alice")
        raise ValueError("second step failed")

    results: list[object] = []
    store.write_later(two_steps).addErrback(lambda f: results.append(f.type))
    store.write_later(sqlite.audit, "kept", member="alice").addCallback(results.append)
    reactor.advance(DeferredStore.WRITE_DELAY)
    reactor.deliver()
    assert results == [ValueError, None]
    assert [e["event"] for e in sqlite.audit_events(member="alice")] == ["kept"]


def test_an_error_that_undoes_the_whole_group_fails_every_write_with_that_error(threaded, sqlite):
    store, reactor = threaded
    db = sqlite._db
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages + 2}")  # a disk that is nearly full
    results: list[object] = []
    store.write_later(sqlite.audit, "first", member="alice").addErrback(results.append)
    store.write_later(sqlite.audit, "huge", member="alice", detail={"x": "y" * 200_000}).addErrback(
        results.append
    )
    store.write_later(sqlite.audit, "third", member="alice").addErrback(results.append)
    reactor.advance(DeferredStore.WRITE_DELAY)
    reactor.deliver()
    assert [str(f.value) for f in results] == ["database or disk is full"] * 3
    assert not db.in_transaction  # the next writes are not swallowed by a dangling one
    db.execute("PRAGMA max_page_count = 1000000")
    store.write_later(sqlite.audit, "later", member="alice")
    reactor.advance(DeferredStore.WRITE_DELAY)
    reactor.deliver()
    assert [e["event"] for e in sqlite.audit_events(member="alice")] == ["later"]


def test_stopping_runs_everything_queued_however_long_the_queue(tmp_path):
    sqlite = SQLiteStore.open(tmp_path)
    reactor = ClockAndThreads()
    store = DeferredStore(sqlite, reactor, ThreadPool(1, 1, name="test-store"))
    store.start()
    busy = threading.Event()
    store.call(busy.wait, 5)  # the store thread is in a slow call
    answered: list[int] = []
    for _ in range(3 * DeferredStore.BATCH):
        store.call(sqlite.data_version).addCallback(answered.append)
    store.write_later(sqlite.audit, "disconnect", member="alice")
    threading.Timer(0.2, busy.set).start()
    store.stop()
    while not reactor.handed_back.empty():  # what the thread handed back before it ended
        reactor.deliver()
    assert [e["event"] for e in sqlite.audit_events(member="alice")] == ["disconnect"]
    assert len(answered) == 3 * DeferredStore.BATCH
    sqlite.close()


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


def test_requests_from_the_cli_are_forgotten_a_day_after_they_were_done(tmp_path):
    now = [1_000_000.0]
    store = SQLiteStore.open(tmp_path, clock=lambda: now[0])
    try:
        store.request_kill("kill-port", "10080")
        assert store.take_control_requests() == [("kill-port", "10080")]
        assert store.take_control_requests() == []
        now[0] += DONE_REQUESTS_KEPT + 1
        store.request_kill("kill-member", "alice")
        assert store.take_control_requests() == [("kill-member", "alice")]
        count = store._db.execute("SELECT COUNT(*) FROM control_requests").fetchone()[0]
        assert count == 1  # the old one is gone, today's is kept
    finally:
        store.close()
