"""``makeService``: the SSH server, its store and watchers, as one twistd service."""

from __future__ import annotations

import os
import random
import signal
import sqlite3

from prometheus_client.twisted import MetricsResource
from twisted.application.service import MultiService
from twisted.conch.ssh.keys import Key
from twisted.internet.address import UNIXAddress
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site

from nekojump import __version__
from nekojump.capacity import DescriptorBudget, raise_descriptor_limit
from nekojump.config import Config
from nekojump.datalock import lock_data_dir, record_pid
from nekojump.hostkey import host_key_fingerprint, load_or_create_host_key
from nekojump.metrics import Metrics
from nekojump.model import Identity
from nekojump.revocation import RevocationWatcher
from nekojump.ssh.auth import TunnelKeyChecker
from nekojump.ssh.avatar import TunnelAvatar
from nekojump.ssh.factory import TunnelSSHFactory
from nekojump.ssh.registry import ActiveForward, TunnelRegistry
from nekojump.ssh.sending import SharedReadServer, gather_writes
from nekojump.store import DeferredStore, SQLiteStore
from nekojump.web.app import Dashboard
from nekojump.web.auth import LoginThrottle
from nekojump.web.backend import Backend
from nekojump.web.site import BoundedSite


class NekojumpService(MultiService):
    """Runs the SSH listener and keeps the live-forwards table and revocations current."""

    log = Logger()

    def __init__(self, config: Config, reactor, store: SQLiteStore, host_key: Key):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.store = DeferredStore.with_own_thread(store, reactor)
        self.host_key = host_key
        self.registry = TunnelRegistry(on_change=self._forward_changed)
        self.metrics = Metrics()
        self.budget = DescriptorBudget(
            raise_descriptor_limit(),
            lambda: (
                self.registry.descriptors_in_use()
                + sum(self.factory.startups.values())
                + self.site.open_connections
            ),
        )
        self.rng = random.Random()
        checker = TunnelKeyChecker(
            self.store, config.ssh.user, self.metrics, changes=lambda: self.watcher.changes
        )
        self.factory = TunnelSSHFactory(
            checker, self._make_avatar, host_key, config, reactor, self.metrics, self.budget
        )
        self.metrics.watch(self.registry, lambda: sum(self.factory.startups.values()))
        self.watcher = RevocationWatcher(self.store, self.registry, reactor)
        self.ssh_port: IListeningPort | None = None
        self.web_port: IListeningPort | None = None
        self.listening: list[IListeningPort] = []
        self._stopping_for_listen_failure = False
        #: The data directory's lock file (``datalock``), when ``make_service`` took it.
        self.data_lock: int | None = None
        backend = Backend(
            config=config,
            store=self.store,
            registry=self.registry,
            host_key=host_key,
            throttle=LoginThrottle(clock=reactor.seconds),
            metrics=self.metrics,
            clock=reactor,
        )
        self.site = BoundedSite(
            Dashboard(backend).resource(),
            clock=reactor,
            max_per_source=config.web.max_connections_per_source,
            request_timeout=config.web.request_timeout,
            trusted=config.web.trusted_proxies,
            budget=self.budget.refusal,
        )
        self.site.noisy = False

    def _make_avatar(self, identity: Identity) -> TunnelAvatar:
        return TunnelAvatar(
            identity,
            registry=self.registry,
            config=self.config,
            store=self.store,
            reactor=self.reactor,
            rng=self.rng,
            metrics=self.metrics,
            budget=self.budget,
        )

    def _forward_changed(self, forward: ActiveForward | None, port: int) -> None:
        sqlite = self.store.store
        if forward is None:
            d = self.store.write_later(sqlite.drop_live_forward, port)
        else:
            d = self.store.write_later(sqlite.put_live_forward, forward.live())
        d.addErrback(
            lambda f: self.log.failure("could not record live forward {port}", f, port=port)
        )

    # -- life cycle ----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        # Ports first: without them there is nothing to run (and no thread to stop).
        self._listen(self.config.ssh.listen, self.factory, "SSH", self._listening)
        self._listen(self.config.web.listen, self.site, "the dashboard", self._web_listening)
        if self.config.metrics.listen:
            root = Resource()
            root.putChild(b"metrics", MetricsResource(registry=self.metrics.registry))
            metrics_site = Site(root)
            metrics_site.noisy = False
            metrics_site.log = lambda request: None  # scrapes would flood the access log
            self._listen(
                self.config.metrics.listen, metrics_site, "metrics", self._metrics_listening
            )
        self.store.store.start_server(os.getpid())
        if self.data_lock is not None:
            record_pid(self.data_lock)  # after twistd's fork, if it daemonized
        self._survive_sighup()
        self.store.start()
        self.watcher.start()
        self.pruner = LoopingCall(self._prune_audit)
        self.pruner.clock = self.reactor
        self.pruner.start(24 * 3600, now=True)

    def _survive_sighup(self) -> None:
        """``kill -HUP`` (a reload elsewhere; a closed terminal) killed the server
        without a word: twistd sets no handler for it (it reopens its log file on
        SIGUSR1).  Now it is logged, and the server runs on.  A handler someone
        else set, or SIGHUP ignored (``nohup``), is left alone."""
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_DFL:
            return

        def hangup(_signal: int, _frame: object) -> None:
            self.reactor.callFromThread(
                self.log.warn,
                "SIGHUP received: nekojump reads its config only when it starts, so it "
                "runs on unchanged; restart it to apply config changes",
            )

        signal.signal(signal.SIGHUP, hangup)

    def _prune_audit(self) -> None:
        cutoff = self.reactor.seconds() - self.config.audit.retention_days * 86400
        d = self.store.call(self.store.store.prune_audit, cutoff)
        d.addCallback(lambda n: n and self.log.info("pruned {n} old audit events", n=n))
        d.addErrback(lambda f: self.log.failure("audit pruning failed", f))

    def _listen(self, description: str, factory, what: str, listening) -> None:
        """Listen, or stop the process with one clear message if the port can't be had."""
        failures: list[Failure] = []
        d = serverFromString(self.reactor, description).listen(factory)
        d.addCallbacks(listening, failures.append)
        if failures:  # TCP listens fail at once: refuse to start without the port
            raise SystemExit(
                f"nekojump: cannot listen for {what} on {description}: "
                f"{failures[0].getErrorMessage()}"
            )
        d.addErrback(lambda f: self._late_listen_failure(what, description, f))

    def _late_listen_failure(self, what: str, description: str, failure: Failure) -> None:
        self.log.critical(
            "cannot listen for {what} on {listen}: {error}",
            what=what,
            listen=description,
            error=failure.getErrorMessage(),
        )
        if not self._stopping_for_listen_failure:  # metrics can fail as well as the web
            self._stopping_for_listen_failure = True
            self.reactor.callWhenRunning(self.reactor.stop)

    def _metrics_listening(self, port: IListeningPort) -> None:
        self.listening.append(port)
        address = port.getHost()
        if isinstance(address, UNIXAddress):
            self.log.info("metrics on unix:{path} (/metrics)", path=_path_of(address))
            return
        self.log.info(
            "metrics on http://{host}:{port}/metrics", host=address.host, port=address.port
        )

    def _web_listening(self, port: IListeningPort) -> None:
        self.web_port = port
        address = port.getHost()
        if isinstance(address, UNIXAddress):  # behind a proxy on this machine
            self.log.info("dashboard on unix:{path}", path=_path_of(address))
            return
        self.log.info("dashboard on http://{host}:{port}/", host=address.host, port=address.port)

    def _listening(self, port: IListeningPort) -> None:
        self.ssh_port = port
        gather_writes(port, SharedReadServer)
        cfg = self.config
        address = port.getHost()
        self.log.info(
            "nekojump {version}: SSH on {host}:{port} for user {user!r}; forwards bind on "
            "{bind} ports {low}-{high}; data in {data_dir} ({source})",
            version=__version__,
            host=address.host,
            port=address.port,
            user=cfg.ssh.user,
            bind=cfg.forwarding.bind_address,
            low=cfg.forwarding.port_min,
            high=cfg.forwarding.port_max,
            data_dir=cfg.data_dir.resolve(),
            source=cfg.source,
        )
        self.log.info(
            "host key {fingerprint} ({kind})",
            fingerprint=host_key_fingerprint(self.host_key),
            kind=self.host_key.type().upper(),  # an operator's restored RSA key says RSA
        )
        self.log.info(
            "file descriptor limit {limit}: room for about {tunnels} idle tunnels",
            limit=self.budget.limit,
            tunnels=self.budget.tunnel_room,
        )
        self.store.call(self.store.store.list_members).addCallback(self._first_start_hint, address)

    def _first_start_hint(self, members: list[object], address) -> None:
        cfg = self.config
        if not members:
            self.log.info(
                "No members yet. Add the first one and their key:\n"
                "    nekojump-admin{config} member add NAME --password-stdin\n"
                "    nekojump-admin{config} key add NAME ~/.ssh/nekotopia_jump.pub\n"
                "then connect: ssh -N -p {port} -R {example}:localhost:8000 "
                "-i ~/.ssh/nekotopia_jump {user}@{host}",
                config="" if cfg.source == "built-in defaults" else f" --config {cfg.source}",
                port=address.port,
                example=cfg.forwarding.port_min + 80,
                user=cfg.ssh.user,
                # The name members use, as How to Connect shows: the listen address
                # may be 0.0.0.0, which no member can connect to.
                host=cfg.web.public_hostname,
            )

    def stopService(self):
        self.watcher.stop()
        if self.pruner.running:
            self.pruner.stop()
        for avatar in self.registry.avatars():
            avatar.disconnect("server shutting down")
        for port in [self.ssh_port, self.web_port, *self.listening]:
            if port is not None:
                port.stopListening()
        d = super().stopService()

        def stopped(result: object) -> object:
            self.store.stop()
            try:
                self.store.store.stop_server()
            except sqlite3.Error as error:
                self.log.error(
                    "could not record the stop in the database ({error}): it still lists "
                    "this server's pid and tunnels until the next start clears them",
                    error=str(error),
                )
            # The last connection's close moves the WAL into the database
            # file: after a clean stop that file alone holds everything.
            self.store.store.close()
            return result

        return d.addBoth(stopped) if d is not None else stopped(None)


def _path_of(address: UNIXAddress) -> str:
    name = address.name
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


def make_service(config: Config, reactor) -> NekojumpService:
    """Lock and open the data directory and build the service (raises OSError on
    a bad dir, ``DataDirectoryInUse`` if another server has it)."""
    lock = lock_data_dir(config.data_dir)  # held until the process ends
    store = SQLiteStore.open(config.data_dir)
    host_key = load_or_create_host_key(config.data_dir)
    service = NekojumpService(config, reactor, store, host_key)
    service.data_lock = lock
    return service
